"""The carry-chain task: a seeded, offline, long-horizon problem family whose answer needs evicted thoughts.

A problem is a worksheet: a start digit and ``steps`` labelled additions with blank results, and a blank mark
after each of ``carry`` chosen steps. The solution fills it in (a running sum mod 10), writes the running value into
each mark as a capital letter (A=0 ... J=9), and ends with the sum (mod 10) of the marked values and the last one::

    question:  3 a5=? b1=? c4=? @? d9=? e2=? f6=? g8=? h3=? i7=? j1=?
    solution:  3 a5=8 b1=9 c4=3 #D d9=2 e2=4 f6=0 g8=8 h3=1 i7=8 j1=9 ans #D+9=2 \\boxed{2}

A mark is a capital letter so that the value to carry is one distinctive token (with a plain digit among dozens of
digits, PTE did not learn to carry it within this project's CPU budget). The solution lines up token for token with
the question, and every lookup is the same copy ("what followed this token before?": the operand after a step's
label, the marked value after ``#``), so a small model learns it in a couple of minutes. Each step costs 5 tokens
under a character tokenizer, so the trace is several times longer than a tight thought window, and a marked value is
gone from the cache long before the last line needs it. The prompt (always retained) holds only operands and blanks:
rebuilding a marked value from it would take the marked step's whole prefix of additions, which the solution format
never does. Under a plain window the last line is a guess (about 1 in 10); a full cache or a state that carried the
marked value answers it. Graded like everything else (``\\boxed{}`` + math-verify).
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import numpy as np

LABELS = string.ascii_lowercase
CODES = "ABCDEFGHIJ"  # a marked value v is written as CODES[v]: the one capital letter of the trace
FORMAT = "worksheet-4"  # bump when questions or solutions change: cached toy base models are keyed by it


@dataclass(frozen=True)
class CarryProblem:
    """One problem: its question, the worked solution (the SFT target) and the gold answer."""

    question: str
    solution: str
    answer: str


def carry_problem(rng: np.random.Generator, steps: int, carry: int) -> CarryProblem:
    """Draw one problem: ``steps`` additions mod 10, ``carry`` marked steps in the first half of the chain.

    Args:
        rng: numpy generator (the caller seeds it).
        steps: chain length (2 to 26 labelled steps); the trace is about 5 tokens per step.
        carry: how many intermediate values the answer needs (1 to steps // 2).
    """
    if not 2 <= steps <= len(LABELS):
        raise ValueError(f"data.carry_steps={steps}: must be between 2 and {len(LABELS)}")
    if not 1 <= carry <= steps // 2:
        raise ValueError(f"data.carry_values={carry}: must be between 1 and steps // 2 = {steps // 2}")
    start = int(rng.integers(10))
    digits = rng.integers(1, 10, size=steps).tolist()
    marked = sorted(rng.choice(np.arange(1, steps // 2 + 1), size=carry, replace=False).tolist())  # 1-based steps
    value, lines, blanks, kept = start, [str(start)], [str(start)], []
    for i, d in enumerate(digits, start=1):
        value = (value + d) % 10
        lines.append(f"{LABELS[i - 1]}{d}={value}")
        blanks.append(f"{LABELS[i - 1]}{d}=?")
        if i in marked:
            lines.append(f"#{CODES[value]}")
            blanks.append("@?")  # not "#": in the solution "#" is followed only by marked values
            kept.append(value)
    answer = (sum(kept) + value) % 10
    terms = "+".join([*(f"#{CODES[v]}" for v in kept), str(value)])  # recalled as the same token pair
    return CarryProblem(
        question=" ".join(blanks),
        solution=" ".join(lines) + f" ans {terms}={answer} \\boxed{{{answer}}}",
        answer=str(answer),
    )


def carry_problems(size: int, seed: int, steps: int = 10, carry: int = 1) -> list[CarryProblem]:
    """``size`` distinct problems from ``seed`` (the same seed always gives the same list)."""
    rng = np.random.default_rng([seed, 7])
    out: dict[str, CarryProblem] = {}
    for _ in range(size * 20):
        if len(out) == size:
            break
        p = carry_problem(rng, steps, carry)
        out.setdefault(p.question, p)
    if len(out) < size:
        raise ValueError(f"data.size={size}: only {len(out)} distinct carry problems with steps={steps}")
    return list(out.values())
