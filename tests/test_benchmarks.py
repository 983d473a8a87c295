"""Tests for pte/benchmarks.py: each benchmark's loader on rows in its own format (method.md §5 benchmarks)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from pte.benchmarks import BENCHMARKS, BenchmarkFormatError, Problem, last_boxed, load_benchmark, load_jsonl_problems

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"
SHARED = Path("/work/shared/data/benchmarks")
REAL_ROWS = {
    "math500": 500,
    "olympiadbench": 675,
    "minerva_math": 272,
    "amc23": 40,
    "aime24": 30,
    "aime25": 30,
    "gsm8k": 1319,
}

# Expected (id, gold) per fixture row, worked out by hand from the verbatim source rows.
EXPECTED = {
    "math500": [
        ("math500/test/precalculus/807.json", r"\left( 3, \frac{\pi}{2} \right)"),
        ("math500/test/intermediate_algebra/1994.json", "p - q"),
        ("math500/test/algebra/2584.json", r"\frac{14}{3}"),
    ],
    "olympiadbench": [  # ["2"], ["$(1,8,19), (2,7,13), (4,5,7)$"], ["$69$,$84$"]
        ("olympiadbench/1606", "2"),
        ("olympiadbench/1618", "(1,8,19), (2,7,13), (4,5,7)"),
        ("olympiadbench/1664", "69,84"),
    ],
    "minerva_math": [  # last \boxed{} of the solution, nested braces in the third
        ("minerva_math/0", "1.6"),
        ("minerva_math/1", "4.5e33"),
        ("minerva_math/102", r"\frac{\pi}{2}"),
    ],
    "amc23": [("amc23/0", "27"), ("amc23/1", "36"), ("amc23/17", "-1")],  # floats 27.0, 36.0, -1.0
    "aime24": [("aime24/60", "204"), ("aime24/61", "113"), ("aime24/67", "25")],  # "025" in the source
    "aime25": [("aime25/0", "70"), ("aime25/1", "588"), ("aime25/2", "16")],  # ints in the source
    "gsm8k": [("gsm8k/1", "18"), ("gsm8k/2", "3"), ("gsm8k/3", "2125")],  # "#### 2,125"; ids are line numbers
}
QUESTION_KEY = {"olympiadbench": "question", "gsm8k": "question"}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _write(tmp_path: Path, rows: list[dict | str]) -> str:
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return str(path)


def test_registry_covers_paper_benchmarks() -> None:
    assert set(BENCHMARKS) == set(REAL_ROWS)
    assert BENCHMARKS["gsm8k"].hf_id == "openai/gsm8k" and BENCHMARKS["gsm8k"].config == "main"
    assert all(spec.revision and spec.split for spec in BENCHMARKS.values())


def test_fixtures_keep_source_value_types() -> None:
    """The fixtures must stay in each source's own format, or the loader tests prove nothing."""
    assert isinstance(_rows(FIXTURES / "amc23.jsonl")[0]["answer"], float)
    assert isinstance(_rows(FIXTURES / "aime25.jsonl")[0]["answer"], int)
    assert isinstance(_rows(FIXTURES / "aime24.jsonl")[2]["answer"], str)
    assert isinstance(_rows(FIXTURES / "olympiadbench.jsonl")[0]["final_answer"], list)
    assert "answer" not in _rows(FIXTURES / "minerva_math.jsonl")[0]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_loader_on_own_format(name: str) -> None:
    path = FIXTURES / f"{name}.jsonl"
    problems = load_benchmark(name, str(path))
    assert [(p.id, p.answer) for p in problems] == EXPECTED[name]
    questions = [row[QUESTION_KEY.get(name, "problem")].strip() for row in _rows(path)]
    assert [p.question for p in problems] == questions
    assert all(isinstance(p, Problem) for p in problems)


def test_limit() -> None:
    problems = load_benchmark("gsm8k", str(FIXTURES / "gsm8k.jsonl"), limit=2)
    assert [p.id for p in problems] == ["gsm8k/1", "gsm8k/2"]


@pytest.mark.parametrize(
    ("name", "row", "message"),
    [
        ("math500", {"problem": "1+1?", "unique_id": "x"}, "'answer'"),
        ("math500", {"problem": "1+1?", "answer": "  "}, "empty gold answer"),
        ("amc23", {"id": 3, "answer": 2.0}, "'problem' / 'question'"),
        ("minerva_math", {"problem": "p", "solution": "so x = 3", "idx": 9}, "no complete \\boxed{}"),
        ("olympiadbench", {"id": 1, "question": "q", "final_answer": ["$ $"]}, "empty gold answer"),
        ("gsm8k", {"question": "q", "answer": "no final line"}, "'####'"),
    ],
)
def test_bad_row_error_names_benchmark_file_and_line(tmp_path: Path, name: str, row: dict, message: str) -> None:
    good = _rows(FIXTURES / f"{name}.jsonl")[0]
    path = _write(tmp_path, [good, "", row])  # the blank line still counts: the bad row is on line 3
    with pytest.raises(BenchmarkFormatError) as info:
        load_benchmark(name, path)
    text = str(info.value)
    assert f"'{name}'" in text and path in text and "row 3" in text and message in text


def test_unknown_benchmark_lists_known_names() -> None:
    with pytest.raises(ValueError, match="unknown benchmark 'math5000'") as info:
        load_benchmark("math5000")
    assert all(name in str(info.value) for name in BENCHMARKS)


def test_hub_field_names_and_source_quirks(tmp_path: Path) -> None:
    """Hub copies name fields differently from the local ones; the same converters must read both."""
    minerva = _write(tmp_path, [{"question": "Compute v.", "answer": "3.5"}])
    assert load_benchmark("minerva_math", minerva) == [Problem("minerva_math/1", "Compute v.", "3.5")]
    amc = _write(tmp_path, [{"id": 4, "question": "q", "answer": "12"}])
    assert load_benchmark("amc23", amc)[0] == Problem("amc23/4", "q", "12")
    aime = _write(tmp_path, [{"problem": "q", "answer": "070", "id": "7"}])
    assert load_benchmark("aime25", aime)[0].answer == "70"
    split = _write(tmp_path, [{"problem": "p", "solution": "x=\\boxed{a+$ $b}$.", "idx": 72}])
    assert load_benchmark("minerva_math", split)[0].answer == "a+ b"  # a boxed answer split across "$ $"
    olympiad = _write(tmp_path, [{"id": 5, "question": "q", "final_answer": ["$3$", "$\\frac{1}{2}$"]}])
    assert load_benchmark("olympiadbench", olympiad)[0].answer == "3, \\frac{1}{2}"


def test_hub_path_uses_pinned_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_load_dataset(hf_id: str, config: str | None, revision: str, split: str) -> list[dict]:
        calls.append((hf_id, config, revision, split))
        return [{"question": "q1", "answer": "a\n#### 1,000"}, {"question": "q2", "answer": ""}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load_dataset))
    assert load_benchmark("gsm8k", limit=1) == [Problem("gsm8k/0", "q1", "1000")]
    assert calls == [("openai/gsm8k", "main", "main", "test")]
    with pytest.raises(BenchmarkFormatError, match=r"openai/gsm8k@main split test, row 1: no '####'"):
        load_benchmark("gsm8k")


def test_last_boxed_balances_braces() -> None:
    assert last_boxed(r"\boxed{1} then \boxed{\frac{a}{b}} m") == r"\frac{a}{b}"
    assert last_boxed(r"\boxed{x^{2}}$.") == "x^{2}"
    assert last_boxed(r"\boxed{\left\{ x \right.} m") == r"\left\{ x \right."  # escaped braces do not nest
    assert last_boxed(r"\boxed{\frac{1}{2}") is None
    assert last_boxed("no box") is None


def test_load_jsonl_problems(tmp_path: Path) -> None:
    path = _write(tmp_path, [{"q": "a?", "gold": 2.0, "key": "p1"}, {"q": "b?", "gold": "x+1"}])
    assert load_jsonl_problems(path, "q", "gold", id_key="key") == [Problem("p1", "a?", "2"), Problem("2", "b?", "x+1")]
    with pytest.raises(BenchmarkFormatError, match=r"row 1: missing field 'answer'"):
        load_jsonl_problems(path, "q", "answer")


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.is_dir(), reason="shared benchmark files not present")
@pytest.mark.parametrize("name", sorted(REAL_ROWS))
def test_real_files(name: str) -> None:
    problems = load_benchmark(name, str(SHARED / f"{name}.jsonl"))
    assert len(problems) == REAL_ROWS[name]
    assert all(p.answer.strip() and p.question.strip() for p in problems)
    assert len({p.id for p in problems}) == len(problems)


# Reference text per benchmark for the grader check: the benchmark's own worked solution where its final answer is
# marked in it (\boxed{} for MATH-500 and Minerva, the "#### " line for GSM8K); AIME24's AoPS solutions and
# OlympiadBench's solutions mark no final answer reliably, so those and the answer-only sets use \boxed{gold}.
GRADER_REFERENCE = {"math500": "solution", "minerva_math": "solution", "gsm8k": "answer"}
GRADER_GAPS = {  # measured on the shared files; see the report to the grader's owner
    "gsm8k": "extract_answer has no rule for the '#### X' line, so every GSM8K reference extracts None",
    "minerva_math": "math-verify cannot parse 4 golds (rows 5, 27, 268, 269: np.arcsin, E_{1}, L_{\\odot}) and "
    "row 72's reference box holds '$ $': 267/272",
}


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.is_dir(), reason="shared benchmark files not present")
@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=GRADER_GAPS[name]))
        if name in GRADER_GAPS
        else name
        for name in sorted(REAL_ROWS)
    ],
)
def test_grader_accepts_reference_answers(name: str) -> None:
    """Each benchmark's own reference, through the project's grader, must score >= 99 % against our gold strings."""
    rewards = pytest.importorskip("pte.rewards")
    path = SHARED / f"{name}.jsonl"
    failing = []
    for row, problem in zip(_rows(path), load_benchmark(name, str(path))):
        key = GRADER_REFERENCE.get(name)
        reference = str(row[key]) if key else f"\\boxed{{{problem.answer}}}"
        try:
            correct = rewards.verify_answer(rewards.extract_answer(reference), problem.answer)
        except ValueError:  # the grader refuses a gold it cannot parse (GoldAnswerError)
            correct = False
        if not correct:
            failing.append(problem.id)
    rate = 1 - len(failing) / REAL_ROWS[name]
    assert rate >= 0.99, f"{name}: {rate:.2%} of references verify; failing: {failing}"
