"""The carry-chain task: a seeded, offline, long-horizon problem family whose answer needs evicted thoughts.

A problem is a worksheet: a start digit and ``steps`` labelled additions with blank results, and a blank mark
after each of ``values`` chosen steps in the first half of the chain. The solution fills it in (a running sum mod
10), writes the running value into each mark as a capital letter (A=0 ... J=9), and ends with an answer line that
starts from the last value and adds each marked value in turn, recalled as its letter and spelled as its digit::

    question:  8 a1=? b2=? @? c3=? d2=? &? e8=? f8=? g6=? h1=? i1=? j3=? ans ? @??=? &??=?
    solution:  8 a1=9 b2=1 #B c3=4 d2=6 $G e8=4 f8=2 g6=8 h1=9 i1=0 j3=3 ans 3 #B1=4 $G6=0 \\boxed{0}

The k-th mark has its own symbol (``#``, ``$``, ``%`` in the solution; ``@``, ``&``, ``^`` for its blanks in the
question), so every lookup is by content: which value a recall needs is named by the symbol before it, as a chain
step is named by its label, and where the chain stops and how many values come back are copied from the question's
last tokens, the answer line's shape. (With one symbol for every mark, a base trained on some variants recalled one
value too few on others, and a state holding two letters could not tell which came first.)

A family of variants: ``steps`` and ``values`` may each be one number or an inclusive ``(lo, hi)`` range drawn per
problem (``values`` capped at ``steps // 2`` and at 3), so one base and one adapter can be tested on chain lengths and
recall counts they were not tuned on. ``letters`` (``data.carry_letters``, default 10: any digit) draws every marked
value from the first ``letters`` codes (``A``, ``B``, ...; one number or a range drawn per problem): under a plain
window a recall is then a 1-in-``letters`` guess, so a mix of alphabets gives GRPO groups whose samples disagree.

A mark is a capital letter so that the value to carry is one distinctive token (with a plain digit among dozens of
digits, PTE did not learn to carry it within this project's CPU budget). Every step of the answer line is the
chain's own two-operand addition (``#D3=2`` as ``a5=8``), so one, two or three recalled values cost the base the
same skill; the only thing the line cannot compute locally is the letter after a mark's symbol. The solution lines up token for
token with the question, and every lookup is the same copy ("what followed this token before?"), so a small model
learns it in minutes. Each step costs 5 tokens under a character tokenizer, so the trace is several times longer than
a tight thought window, and a marked value is gone from the cache long before the answer line needs it. The prompt
(always retained) holds only operands and blanks: rebuilding a marked value from it would take the marked step's whole
prefix of additions, which the solution format never does. Under a plain window each recalled letter is a guess (1 in
10); a full cache or a state that carried the marked values answers it. Graded like everything else (``\\boxed{}`` +
math-verify).
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import numpy as np

LABELS = string.ascii_lowercase
CODES = "ABCDEFGHIJ"  # a marked value v is written as CODES[v]: the one capital letter of the trace
MARKS = "#$%"  # the k-th mark's symbol in the solution, before its letter
BLANKS = "@&^"  # the k-th mark's symbol in the question, where the solution has MARKS[k]
FORMAT = "worksheet-8"  # bump when questions or solutions change: cached toy base models are keyed by it


@dataclass(frozen=True)
class CarryProblem:
    """One problem: its question, the worked solution (the SFT target) and the gold answer."""

    question: str
    solution: str
    answer: str


Span = int | tuple[int, int] | list[int]  # one value, or an inclusive [lo, hi] range drawn per problem


def span(x: Span, key: str) -> tuple[int, int]:
    """``(lo, hi)`` of a task size given as one number or an inclusive ``[lo, hi]`` range; ``key`` names it in errors."""
    pair = [x, x] if isinstance(x, int) else list(x) if isinstance(x, (list, tuple)) else []
    if len(pair) != 2 or not all(type(v) is int for v in pair) or not 1 <= pair[0] <= pair[1]:
        raise ValueError(f"{key}={x!r}: expected a positive number or [lo, hi]")
    return pair[0], pair[1]


def letter_span(letters: Span) -> tuple[int, int]:
    """``(lo, hi)`` of ``data.carry_letters``: how many codes a marked value is drawn from, 2 to 10."""
    lo, hi = span(letters, "data.carry_letters")
    if not 2 <= lo <= hi <= len(CODES):
        raise ValueError(f"data.carry_letters={letters!r}: expected 2 to {len(CODES)} letters, or [lo, hi] within them")
    return lo, hi


def variants(steps: Span, values: Span) -> list[tuple[int, int]]:
    """Every ``(steps, values)`` combination in the ranges, values capped at half the chain."""
    (s_lo, s_hi), (v_lo, v_hi) = span(steps, "data.carry_steps"), span(values, "data.carry_values")
    if v_hi > len(MARKS):
        raise ValueError(f"data.carry_values={values!r}: at most {len(MARKS)} values (one mark symbol each)")
    return [(s, v) for s in range(s_lo, s_hi + 1) for v in range(v_lo, min(v_hi, s // 2) + 1)]


def variant_name(steps: Span, values: Span) -> str:
    """``10x1``, ``6-20x1-3``: the variant as it appears in problem ids."""
    (s_lo, s_hi), (v_lo, v_hi) = span(steps, "data.carry_steps"), span(values, "data.carry_values")
    return "x".join(f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in ((s_lo, s_hi), (v_lo, v_hi)))


def solution_chars(steps: Span, values: Span) -> int:
    """An upper bound on a solution's length in characters over the variants (= tokens under the toy base's character
    tokenizer): the start digit, 5 per step, 3 per mark, the answer line's head (6), 7 per recall (6 and one spare)
    and the boxed answer (10); the longest 10x1 solution is 76, the bound 77."""
    s_hi, v_hi = span(steps, "data.carry_steps")[1], span(values, "data.carry_values")[1]
    return 17 + 5 * s_hi + 10 * min(v_hi, s_hi // 2)


def problem_variant(question: str) -> tuple[int, int]:
    """``(steps, values)`` of a carry question, read from its blanks."""
    recalls = sum(question.count(f"{b}??=?") for b in BLANKS)
    return question.count("=?") - recalls, recalls


def carry_problem(rng: np.random.Generator, steps: int, carry: int, letters: int = 10) -> CarryProblem:
    """Draw one problem: ``steps`` additions mod 10, ``carry`` marked steps in the first half of the chain.

    Args:
        rng: numpy generator (the caller seeds it).
        steps: chain length (2 to 26 labelled steps); the trace is about 5 tokens per step.
        carry: how many intermediate values the answer needs (1 to steps // 2, at most 3).
        letters: marked values lie in ``0 .. letters - 1`` (2 to 10): a marked step's digit is drawn to land there,
            any digit but the one that keeps the value. At 10 nothing more is drawn (the same problems as before).
    """
    if not 2 <= steps <= len(LABELS):
        raise ValueError(f"data.carry_steps={steps}: must be between 2 and {len(LABELS)}")
    if not 1 <= carry <= min(steps // 2, len(MARKS)):
        raise ValueError(f"data.carry_values={carry}: must be between 1 and min(steps // 2, {len(MARKS)})")
    letter_span(letters)
    start = int(rng.integers(10))
    digits = rng.integers(1, 10, size=steps).tolist()
    marked = sorted(rng.choice(np.arange(1, steps // 2 + 1), size=carry, replace=False).tolist())  # 1-based steps
    value, lines, blanks, kept = start, [str(start)], [str(start)], []
    for i, d in enumerate(digits, start=1):
        if i in marked and letters < len(CODES):
            target = [t for t in range(letters) if t != value][int(rng.integers(letters - (value < letters)))]
            d = (target - value) % 10
        value = (value + d) % 10
        lines.append(f"{LABELS[i - 1]}{d}={value}")
        blanks.append(f"{LABELS[i - 1]}{d}=?")
        if i in marked:
            lines.append(f"{MARKS[len(kept)]}{CODES[value]}")
            blanks.append(f"{BLANKS[len(kept)]}?")  # in the solution a mark symbol is followed only by marked values
            kept.append(value)
    lines += ["ans", str(value)]
    blanks += ["ans", "?", *(f"{b}??=?" for b in BLANKS[: len(kept)])]  # the answer line's shape
    for k, v in enumerate(kept):  # recalled as the mark's own token pair ("$D"), then added like a chain step
        value = (value + v) % 10
        lines.append(f"{MARKS[k]}{CODES[v]}{v}={value}")
    return CarryProblem(
        question=" ".join(blanks),
        solution=" ".join(lines) + f" \\boxed{{{value}}}",
        answer=str(value),
    )


def carry_problems(
    size: int,
    seed: int,
    steps: Span = 10,
    carry: Span = 1,
    exclude: frozenset[tuple[int, int]] = frozenset(),
    letters: Span = 10,
) -> list[CarryProblem]:
    """``size`` distinct problems from ``seed`` (the same seed always gives the same list).

    ``steps`` and ``carry`` are one number or an inclusive range; with ranges each problem draws its chain length,
    then its number of values (capped at half the chain). ``exclude`` lists ``(steps, values)`` combinations never drawn
    (a toy base's held-out variants). ``letters`` (one number or a range drawn per problem, after its variant) bounds
    the marked values: see :func:`carry_problem`.
    """
    lo, hi = letter_span(letters)
    lowest = (span(steps, "data.carry_steps")[0], span(carry, "data.carry_values")[0])
    combos = [c for c in variants(steps, carry) if c not in exclude] or [lowest]  # one fixed combo validates below
    rng = np.random.default_rng([seed, 7])
    out: dict[str, CarryProblem] = {}
    for _ in range(size * 20):
        if len(out) == size:
            break
        s, v = combos[int(rng.integers(len(combos)))] if len(combos) > 1 else combos[0]
        k = hi if lo == hi else int(rng.integers(lo, hi + 1))
        p = carry_problem(rng, s, v, k)
        out.setdefault(p.question, p)
    if len(out) < size:
        raise ValueError(f"data.size={size}: only {len(out)} distinct carry problems with steps={steps}")
    return list(out.values())
