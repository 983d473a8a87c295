"""Property-based tests of answer extraction and grading on random and adversarial completions (method.md §6).

Examples are few and derandomised so the file stays fast and reproducible; each property says what must hold
for every completion: extraction never raises and stays linear, grading never raises, never runs past its
timeout and never scores a wrong answer correct.
"""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pte.training.answers import extract_answer, last_boxed
from pte.training.rewards import CorrectnessReward, Grader

FAST = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
GRADED = settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
TIMEOUT_S = 1.5

PIECES = [
    "\\boxed{",
    "\\boxed ",
    "\\fbox{",
    "{",
    "}",
    "\\{",
    "\\}",
    "\\",
    "$",
    "$$",
    "####",
    "answer: ",
    "The answer is ",
    "\\frac{",
    "^{",
    "\n",
    "\x00",
    "\x1b[31m",
    "\r",
    "\t",
    "\u202e",
    "\ufffd",
    "9" * 400,
    "-",
    ".",
    ",",
]
# Control characters, LaTeX punctuation, digits and ordinary text, in any order.
ALPHABET = st.characters(codec="utf-8", exclude_categories=("Cs",))
noise = st.text(alphabet=ALPHABET, max_size=200)
adversarial = st.lists(st.one_of(st.sampled_from(PIECES), noise), max_size=40).map("".join)


def huge(piece: str, size: int = 1_000_000) -> str:
    return (piece * (size // max(1, len(piece)) + 1))[:size]


@FAST
@given(st.one_of(noise, adversarial))
def test_extraction_never_raises(text: str) -> None:
    answer = extract_answer(text)
    assert answer is None or (isinstance(answer, str) and answer == answer.strip() and answer)
    boxed = last_boxed(text)
    assert boxed is None or boxed == boxed.strip()


@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(PIECES + ["\\boxed{{", "a}\\boxed{", "\\boxed{1}"]), st.sampled_from([100_000, 1_000_000]))
def test_extraction_is_linear_on_megabyte_completions(piece: str, size: int) -> None:
    """Repeated unclosed boxes, nesting or control characters: a 1 MB completion is read in well under a second."""
    text = huge(piece, size)
    start = time.perf_counter()
    extract_answer(text)
    assert time.perf_counter() - start < 2.0


@FAST
@given(st.lists(st.integers(-(10**60), 10**60), min_size=1, max_size=5), noise.filter(lambda s: "\\" not in s))
def test_last_complete_box_wins(values: list[int], filler: str) -> None:
    filler = filler.replace("{", "").replace("}", "")
    text = filler.join(f"\\boxed{{{v}}}" for v in values) + filler + "\\boxed{" + filler  # the last box is cut off
    assert last_boxed(text) == str(values[-1])


@pytest.fixture(scope="module")
def grader():
    with Grader(timeout_s=TIMEOUT_S, workers=2) as shared:
        yield shared


@GRADED
@given(
    gold=st.one_of(st.integers(-(10**45), 10**45), st.integers(0, 99)),
    offset=st.one_of(st.integers(1, 3), st.integers(10**3, 10**40)),
    prefix=adversarial,
)
def test_wrong_answers_never_score(grader: Grader, gold: int, offset: int, prefix: str) -> None:
    """The gold appears everywhere but in the final box: the completion is wrong and must score 0."""
    wrong = gold + offset
    responses = [
        f"{prefix} \\boxed{{{wrong}}}",
        f"\\boxed{{{gold}}} then {prefix} \\boxed{{{wrong}}}",  # several boxes: the last one is the answer
        f"{gold} {prefix} \\boxed{{{wrong}}} \\boxed{{{gold}",  # a correct box cut off by the budget
        f"\\boxed{{{{{{{{{wrong}}}}}}}}}",  # nested braces around a wrong value
    ]
    rewards = CorrectnessReward(grader)(responses, [str(gold)] * len(responses))
    assert rewards.tolist() == [0.0] * len(responses)


def test_adversarial_batch_never_raises_or_hangs(grader: Grader) -> None:
    """Megabyte, deeply nested, unclosed and control-character completions: graded False, within the timeout."""
    responses = [
        huge("\\boxed{"),
        "\\boxed{" + "{" * 50_000 + "1" + "}" * 50_001,
        "\\boxed{" + "9" * 100_000 + "}",
        "\\boxed{\x00\x1b\x07}",
        "The answer is " + huge("x^", 200_000),
        "\\boxed{2^{2^{2^{2^{2^{2^{2}}}}}}}",
    ]
    start = time.monotonic()
    rewards = CorrectnessReward(grader)(responses, ["7"] * len(responses))
    elapsed = time.monotonic() - start
    assert rewards.tolist() == [0.0] * len(responses)
    assert elapsed < len(responses) * TIMEOUT_S / 2 + 10, f"grading took {elapsed:.1f} s"
    assert CorrectnessReward(grader)(["\\boxed{7}"], ["7"]).tolist() == [1.0], "the grader recovers"
