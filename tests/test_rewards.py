"""Tests for pte.training.rewards: answer extraction, math-verify grading (method.md §6 traps), reward composition."""

import time

import math_verify
import pytest
import sympy
import torch

from pte.training.rewards import (
    CombinedReward,
    CorrectnessReward,
    FormatReward,
    GoldAnswerError,
    Grader,
    build_reward,
    extract_answer,
    parse_gold,
    verify_answer,
)

# (10^10)! parses instantly but math-verify's comparison then computes it: with timeouts disabled it was
# still running after 90 s on this machine.
PATHOLOGICAL = r"\boxed{(10^{10})!}"

# (response, gold, expected); every expectation was checked against math-verify 0.9 itself.
CASES = [
    pytest.param(r"The sum is \boxed{42}.", "42", True, id="int"),
    pytest.param(r"\boxed{41}", "42", False, id="int-wrong"),
    pytest.param(r"\boxed{042}", "42", True, id="int-leading-zero"),
    pytest.param(r"\boxed{1,000}", "1000", True, id="thousands-separator"),
    pytest.param(r"\boxed{2^{10}}", "1024", True, id="power"),
    pytest.param(r"\boxed{\binom{5}{2}}", "10", True, id="binomial"),
    pytest.param(r"\boxed{0.5}", r"\frac{1}{2}", True, id="decimal-vs-fraction"),
    pytest.param(r"\boxed{\frac{1}{2}}", "0.5", True, id="fraction-vs-decimal"),
    pytest.param(r"\boxed{\dfrac{3}{4}}", "0.75", True, id="dfrac"),
    pytest.param(r"\boxed{\frac{6}{8}}", r"\frac34", True, id="unreduced-fraction"),
    pytest.param(r"\boxed{0.333}", r"\frac{1}{3}", False, id="decimal-too-coarse"),
    pytest.param(r"\boxed{2\sqrt{3}}", r"\sqrt{12}", True, id="sqrt-simplified"),
    pytest.param(r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt 3}{2}", True, id="sqrt-fraction"),
    pytest.param(r"\boxed{1.414}", r"\sqrt{2}", False, id="sqrt-decimal-too-coarse"),
    pytest.param(r"\boxed{\frac{\pi}{2}}", r"\pi/2", True, id="pi"),
    pytest.param(r"\boxed{3.14}", r"\pi", False, id="pi-decimal-wrong"),
    pytest.param(r"\boxed{5 \text{ cm}}", "5", True, id="unit-cm-in-pred"),
    pytest.param(r"\boxed{5}", r"5\text{ cm}", True, id="unit-cm-in-gold"),
    pytest.param(r"\boxed{90^\circ}", "90", True, id="degrees"),
    pytest.param(r"\boxed{10\text{ dollars}}", "10", True, id="text-dollars"),
    pytest.param(r"\boxed{\$10}", "10", True, id="dollar-sign"),
    pytest.param(r"\boxed{11\text{ dollars}}", "10", False, id="unit-wrong-number"),
    pytest.param(r"\boxed{\{3, 2, 1\}}", r"\{1,2,3\}", True, id="set-order"),
    pytest.param(r"\boxed{\{1, 2\}}", r"\{1,2,3\}", False, id="set-missing-element"),
    pytest.param(r"\boxed{[1, 2)}", "[1,2)", True, id="interval"),
    pytest.param(r"\boxed{(1, 2]}", "[1,2)", False, id="interval-wrong-ends"),
    pytest.param(r"\boxed{(-\infty, 3]}", r"(-\infty,3]", True, id="interval-infinite"),
    pytest.param(r"\boxed{x \in [1, 2]}", "[1,2]", True, id="interval-membership"),
    pytest.param(r"\boxed{(1, 2, 3)}", "(1,2,3)", True, id="tuple"),
    pytest.param(r"\boxed{(1, 3, 2)}", "(1,2,3)", False, id="tuple-order"),
    pytest.param(r"\boxed{50\%}", r"50\%", True, id="percent"),
    pytest.param(r"\boxed{0.5}", r"50\%", True, id="percent-as-decimal"),
    pytest.param(r"\boxed{12.5\%}", r"15\%", False, id="percent-wrong"),
    pytest.param(r"\boxed{-3}", "-3", True, id="negative"),
    pytest.param(r"\boxed{3}", "-3", False, id="negative-sign-dropped"),
    pytest.param(r"\boxed{-\frac{1}{2}}", "-0.5", True, id="negative-fraction"),
    pytest.param(r"\boxed{(x+1)^2}", "x^2+2x+1", True, id="expanded-square"),
    pytest.param(r"\boxed{2(x+1)}", "2x+2", True, id="factored"),
    pytest.param(r"\boxed{x+1}", "x+2", False, id="expression-wrong"),
    pytest.param(r"\boxed{x = 5}", "5", True, id="assignment"),
    pytest.param(r"\boxed{\infty}", r"\infty", True, id="infinity"),
    pytest.param(r"\boxed{\text{(B)}}", "B", True, id="choice-letter"),
    pytest.param(r"\boxed{A}", "B", False, id="choice-wrong"),
    pytest.param("So the answer is 7.", "7", True, id="no-box-answer-is"),
    pytest.param(r"**Final Answer:** $\frac{2}{3}$", r"\frac{2}{3}", True, id="no-box-final-answer"),
    pytest.param("I computed 7 at the end.", "7", False, id="no-box-no-fallback"),
    pytest.param(r"First \boxed{3}, then corrected to \boxed{4}.", "4", True, id="last-box-wins"),
    pytest.param(r"First \boxed{3}, then corrected to \boxed{4}.", "3", False, id="earlier-box-ignored"),
    pytest.param(r"Answer: 5. Check: \boxed{4}", "4", True, id="box-beats-fallback"),
    pytest.param(r"\boxed{\frac{\sqrt{2}}{\sqrt{8}}}", r"\frac{1}{2}", True, id="nested-braces"),
    pytest.param(r"$\fbox{12}$", "12", True, id="fbox"),
    pytest.param(r"$\boxed 5$", "5", True, id="boxed-without-braces"),
    pytest.param(r"\boxed{}", "0", False, id="empty-box"),
    pytest.param("", "1", False, id="empty-response"),
    pytest.param("So 3 * 1200 + 850 = 4450 seats.\n#### 4,450", "4450", True, id="gsm8k-final-line"),
    pytest.param("#### 4,451", "4450", False, id="gsm8k-final-line-wrong"),
    pytest.param("#### Step 1\nThe answer is 7.", "7", True, id="markdown-heading-is-no-final-line"),
    pytest.param("The answer is 7.\n#### 8", "8", True, id="final-line-beats-answer-phrase"),
    pytest.param("\\boxed{4}\n#### 5", "4", True, id="box-beats-final-line"),
    pytest.param(r"so $\framebox{318}$ seconds", "318", True, id="framebox"),
    pytest.param(r"\boxed{\textbf{(073)}}", "73", True, id="bold-padded-number"),
    pytest.param(r"\boxed{\textbf{(B) } 36}", "36", True, id="choice-label-then-value"),
    pytest.param(r"\boxed{\textbf{(B) } 35}", "36", False, id="choice-label-then-wrong-value"),
    pytest.param(r"\boxed{a+$ $b}", "a+b", True, id="dollars-inside-box"),
    pytest.param(r"\boxed{E_5, E_2}", r"E_{2},E_{5}", True, id="subscripted-E"),
    pytest.param(r"\boxed{E_2}", r"E_{2},E_{5}", False, id="subscripted-E-missing"),
    pytest.param(r"\boxed{F_2, F_5}", r"E_{2},E_{5}", False, id="subscripted-E-other-letter"),
    pytest.param(r"\boxed{\frac{3E_1+E_2}{4}}", r"\frac{3}{4} E_{1}+\frac{1}{4} E_{2}", True, id="subscripted-E-sum"),
    pytest.param(
        r"\boxed{\frac{E_1+3E_2}{4}}", r"\frac{3}{4} E_{1}+\frac{1}{4} E_{2}", False, id="subscripted-E-sum-wrong"
    ),
    pytest.param(r"\boxed{2.718281828}", "e", True, id="bare-e-stays-euler"),
    pytest.param(r"\boxed{2 L_\odot}", r"2 L_{\odot}", True, id="command-subscript"),
    pytest.param(r"\boxed{3 L_\odot}", r"2 L_{\odot}", False, id="command-subscript-wrong"),
    pytest.param(r"\boxed{x_{\text{max}}+1}", r"x_{\max}+1", True, id="text-subscript"),
    pytest.param(r"\boxed{\arctan\frac{5}{12}}", "np.arctan(5/12)", True, id="numpy-gold"),
    pytest.param(r"\boxed{\arcsin(5/12)}", "np.arctan(5/12)", False, id="numpy-gold-wrong"),
    pytest.param(r"\boxed{n^2+1}", r"k_{\min }=n^{2}+1", True, id="gold-symbol-equation"),
    pytest.param(
        r"\boxed{\frac{4 L_\odot N^2}{c^2 M_\odot}}",
        r"\frac{dN}{dt}=\frac{4 L_{\odot}}{c^{2} M_{\odot}} N^{2}",
        True,
        id="gold-derivative-equation",
    ),
    pytest.param(
        r"\boxed{\frac{4 L_\odot N^3}{c^2 M_\odot}}",
        r"\frac{dN}{dt}=\frac{4 L_{\odot}}{c^{2} M_{\odot}} N^{2}",
        False,
        id="gold-derivative-equation-wrong",
    ),
    pytest.param(r"\boxed{3x^2}", r"\frac{dy}{dx}=3x^{2}", True, id="gold-derivative-equation-bare-pred"),
    pytest.param(r"\boxed{\frac{dy}{dx} = 3x^2}", r"\frac{dy}{dx}=3x^{2}", True, id="derivative-equation-both"),
    pytest.param(r"\boxed{5}", "2x+y=5", False, id="gold-equation-needs-equation"),
]
EXPECTED = [case.values[2] for case in CASES]


@pytest.fixture(scope="module")
def grader():
    with Grader(timeout_s=10.0, workers=2) as shared:
        yield shared


@pytest.mark.parametrize(("response", "gold", "expected"), CASES)
def test_verify_answer_table(response: str, gold: str, expected: bool) -> None:
    assert verify_answer(extract_answer(response), gold) is expected


def test_grader_matches_table_in_one_parallel_batch(grader: Grader) -> None:
    responses = [case.values[0] for case in CASES]
    golds = [case.values[1] for case in CASES]
    assert grader.grade([extract_answer(r) for r in responses], golds) == EXPECTED
    assert grader.timeouts == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so \boxed{\frac{a}{\sqrt{b}}} done", r"\frac{a}{\sqrt{b}}"),
        (r"\boxed{1} and later \boxed{2}", "2"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\boxed{1} then a cut-off \boxed{2", "1"),
        (r"$\boxed 5$ is it", "5"),
        (r"\fbox{x}", "x"),
        (r"\boxed{ }", None),
        (r"\boxeds{5}", None),
        ("The answer is 0.5.", "0.5"),
        ("**Answer**: 9", "9"),
        ("Final answer:\n 12", "12"),
        ("To answer this, compute 5.", None),
        ("", None),
        (r"$\framebox{318}$ in all", "318"),
        ("It holds 4,450 seats.\n#### 4,450", "4450"),
        ("#### \\$18.", "18"),
        ("#### -3\nsome trailing words", "-3"),
        ("#### Step 1: add\nno final answer here", None),
        (r"\boxed{\textbf{(073)}}", "073"),
        (r"\boxed{\mathbf{127} }", "127"),
        (r"\boxed{\textbf{(B) }36}", "36"),
        (r"\boxed{\text{(B)}}", r"\text{(B)}"),
        (r"\boxed{\text{Evelyn}}", r"\text{Evelyn}"),
        (r"\boxed{a+$ $b}", "a+ b"),
        (r"\boxed{\$10}", r"\$10"),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("gold", "value"),
    [
        (0.5, sympy.Rational(1, 2)),
        ("0.5", sympy.Rational(1, 2)),
        (27.0, 27),
        (27, 27),
        (r"\frac{1}{2}", sympy.Rational(1, 2)),
        (r"\sqrt{2}", sympy.sqrt(2)),
        ("$-3$", -3),
    ],
)
def test_parse_gold_wraps_bare_values(gold: str | float, value: sympy.Basic) -> None:
    parsed = parse_gold(gold)
    assert sympy.simplify(parsed[0] - value) == 0


@pytest.mark.parametrize(
    "gold", [r"E_{2},E_{5}", r"L_{\odot}", r"x_{\text{max}}", r"k_{\min }=n^{2}+1", "np.arctan(5/12)"]
)
def test_parse_gold_reads_what_raw_math_verify_cannot(gold: str) -> None:
    raw = math_verify.parse(f"${gold}$")
    assert not any(isinstance(item, sympy.Basic) for item in raw)
    assert isinstance(parse_gold(gold)[0], sympy.Basic)


def test_float_gold_without_exponent() -> None:
    assert verify_answer("0.0000001", 1e-7)
    assert not verify_answer("0.000001", 1e-7)


@pytest.mark.parametrize("bad", [r"\frac{1}{", "}{", "", "$$", "s(1,2]", float("nan"), True])
def test_unparseable_gold_raises_naming_row(bad: str | float) -> None:
    with pytest.raises(GoldAnswerError, match="row train-17"):
        parse_gold(bad, row="train-17")


def test_broken_gold_never_scores() -> None:
    broken = r"\frac{1}{"
    # The trap: raw math-verify keeps the unparsed string and then matches it against an identical pred.
    assert math_verify.verify(math_verify.parse(f"${broken}$"), math_verify.parse(f"${broken}$"))
    with pytest.raises(GoldAnswerError):
        verify_answer(broken, broken)


def test_grader_reports_broken_gold_by_row_and_recovers(grader: Grader) -> None:
    with pytest.raises(GoldAnswerError, match="row q-7") as info:
        grader.grade(["1", r"\frac{1}{"], ["1", r"\frac{1}{"], rows=["q-6", "q-7"])
    assert "q-6" not in str(info.value)
    with pytest.raises(GoldAnswerError, match="row 0"):
        grader.grade([None], ["}{"])
    assert grader.grade(["2", "3"], ["2", "2"]) == [True, False]


def test_grader_times_out_pathological_item_and_keeps_working() -> None:
    timeout_s, slack_s = 1.0, 1.5
    with Grader(timeout_s=timeout_s, workers=2) as fresh:
        assert fresh.grade(["1", "2"], ["1", "1"]) == [True, False]  # workers are up before the clock starts
        start = time.monotonic()
        assert fresh.grade([extract_answer(PATHOLOGICAL)], ["5"]) == [False]
        elapsed = time.monotonic() - start
        assert timeout_s <= elapsed < timeout_s + slack_s
        assert fresh.timeouts == 1
        assert fresh.grade(["5"], ["5"]) == [True]
        start = time.monotonic()
        batch = [extract_answer(PATHOLOGICAL), "4", r"\frac12", "7"]
        assert fresh.grade(batch, ["5", "4", "0.5", "8"]) == [False, True, True, False]
        assert time.monotonic() - start < timeout_s + slack_s
        assert fresh.timeouts == 2


def test_grader_rejects_bad_calls() -> None:
    with pytest.raises(ValueError, match="workers"):
        Grader(workers=0)
    closed = Grader(timeout_s=1.0, workers=1)
    with pytest.raises(ValueError, match="2 preds, 1 golds"):
        closed.grade(["1", "2"], ["1"])
    closed.close()
    with pytest.raises(RuntimeError, match="closed"):
        closed.grade(["1"], ["1"])


def test_format_reward() -> None:
    responses = [r"\boxed{3}", "The answer is 3", r"\boxed{}", r"\fbox{x}", r"\framebox{x}", "#### 3", ""]
    scores = FormatReward()(responses, ["3"] * len(responses))
    assert scores.dtype == torch.float32
    assert scores.tolist() == [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]


def test_correctness_reward(grader: Grader) -> None:
    responses = [r"\boxed{4}", "The answer is 4", r"\boxed{5}", ""]
    scores = CorrectnessReward(grader)(responses, ["4"] * len(responses))
    assert scores.dtype == torch.float32
    assert scores.tolist() == [1.0, 1.0, 0.0, 0.0]


class _Const:
    """A stub reward returning fixed values, to check the arithmetic exactly."""

    def __init__(self, name: str, values: list[float]) -> None:
        self.name = name
        self.values = torch.tensor(values)

    def __call__(self, responses: list[str], golds: list[str]) -> torch.Tensor:
        return self.values


def test_combined_reward_weights_and_components() -> None:
    a, b = _Const("a", [1.0, 0.0, 1.0]), _Const("b", [0.0, 1.0, 1.0])
    total, parts = CombinedReward([a, b], [0.5, 2.0])(["x"] * 3, ["y"] * 3)
    assert total.tolist() == [0.5, 2.0, 2.5]
    assert set(parts) == {"a", "b"}
    assert parts["a"].tolist() == [1.0, 0.0, 1.0] and parts["b"].tolist() == [0.0, 1.0, 1.0]


def test_combined_reward_validates() -> None:
    with pytest.raises(ValueError, match="one weight per"):
        CombinedReward([_Const("a", [1.0])], [1.0, 2.0])
    with pytest.raises(ValueError, match="distinct"):
        CombinedReward([_Const("a", [1.0]), _Const("a", [1.0])], [1.0, 1.0])
    with pytest.raises(ValueError, match="'a' returned shape"):
        CombinedReward([_Const("a", [1.0])], [1.0])(["x", "x"], ["y", "y"])


def test_build_reward_from_spec(grader: Grader) -> None:
    reward = build_reward({"correctness": 1.0, "format": 0.1}, grader)
    responses = [r"\boxed{4}", "The answer is 4", r"\boxed{5}"]
    total, parts = reward(responses, ["4"] * 3)
    assert parts["correctness"].tolist() == [1.0, 1.0, 0.0]
    assert parts["format"].tolist() == [1.0, 0.0, 1.0]
    assert torch.allclose(total, torch.tensor([1.1, 1.0, 0.1]))


def test_build_reward_rejects_unknown_name(grader: Grader) -> None:
    with pytest.raises(ValueError, match="'corectness'"):
        build_reward({"correctness": 1.0, "corectness": 1.0}, grader)
    with pytest.raises(ValueError, match="empty"):
        build_reward({}, grader)


SEPARATED = ["3$, $4", "$3$, $4$", "$3$,$4$", " 3 $,$ 4 "]  # OlympiadBench multi-part golds


@pytest.mark.parametrize("gold", SEPARATED)
def test_inline_math_separators_in_gold_parse_as_every_part(gold: str) -> None:
    assert parse_gold(gold)[0] == parse_gold("3, 4")[0] == {3, 4}
    assert verify_answer("3, 4", gold)
    assert not verify_answer("4", gold) and not verify_answer("3", gold)


def test_inline_math_separators_in_every_reward_path(grader: Grader) -> None:
    responses = [r"\boxed{3, 4}", r"\boxed{4}", "The answer is 3, 4", r"\boxed{3}"]
    golds = ["3$, $4"] * len(responses)
    assert grader.grade([extract_answer(r) for r in responses], golds) == [True, False, True, False]
    assert CorrectnessReward(grader)(responses, golds).tolist() == [1.0, 0.0, 1.0, 0.0]
