"""Tests for pte/evaluation/math_sets.py: each math set's loader on rows in its own format (docs/method.md §5)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from pte.evaluation.math_sets import (
    BENCHMARKS,
    BenchmarkFormatError,
    Problem,
    last_boxed,
    load_benchmark,
    load_jsonl_problems,
)

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

# Expected (id, gold) per fixture row. The fixtures are synthetic rows written in each source's own format (field
# names, order, value types, nesting and JSON escaping), keeping the quirks the converters must handle.
EXPECTED = {
    "math500": [
        ("math500/test/algebra/90001.json", r"\left( 3, 2 \right)"),
        ("math500/test/intermediate_algebra/90002.json", "a + b"),
        ("math500/test/algebra/90003.json", r"\frac{26}{3}"),
    ],
    "olympiadbench": [  # ["12"], ["$(3,6), (4,4)$"], ["$1$,$3$,$7$"]
        ("olympiadbench/9001", "12"),
        ("olympiadbench/9002", "(3,6), (4,4)"),
        ("olympiadbench/9003", "1,3,7"),
    ],
    "minerva_math": [  # last \boxed{} of the solution, nested braces in the third
        ("minerva_math/900", "16.7"),
        ("minerva_math/901", "3.2e16"),
        ("minerva_math/902", r"\frac{\pi}{4}"),
    ],
    "amc23": [("amc23/0", "3"), ("amc23/1", "58"), ("amc23/17", "-1")],  # floats 3.0, 58.0, -1.0
    "aime24": [("aime24/900", "144"), ("aime24/901", "376"), ("aime24/902", "25")],  # "025" in the source
    "aime25": [("aime25/0", "196"), ("aime25/1", "30"), ("aime25/2", "50")],  # ints in the source
    "gsm8k": [("gsm8k/1", "102"), ("gsm8k/2", "6"), ("gsm8k/3", "4450")],  # "#### 4,450"; ids are line numbers
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


def _shape(value: object) -> object:
    """Field names in order and value types, recursively: what a fixture row must share with its source's rows."""
    if isinstance(value, dict):
        return tuple((key, _shape(item)) for key, item in value.items())
    if isinstance(value, list):
        return ("list", frozenset(_shape(item) for item in value))
    return type(value).__name__


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared benchmark files not present")
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixtures_match_source_format_without_copying_it(name: str) -> None:
    """Fixture rows are synthetic (source rows may only live in shared/) but shaped exactly like the source's rows."""
    source = _rows(SHARED / f"{name}.jsonl")
    fixture = _rows(FIXTURES / f"{name}.jsonl")
    shapes = {_shape(row) for row in source}
    assert all(_shape(row) in shapes for row in fixture)
    key = QUESTION_KEY.get(name, "problem")
    assert not {row[key] for row in fixture} & {row[key] for row in source}


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
# marked in it (\boxed{} for MATH-500 and Minerva, \boxed{}/\framebox{} for AIME24's AoPS solutions, the "#### " line
# for GSM8K); OlympiadBench's solutions mark no final answer, so it and the answer-only sets use \boxed{gold}.
# Measured on the shared files: every reference verifies except OlympiadBench 2045, whose gold "t(0,4]" is a data error
# that the grader rightly refuses to parse (674/675).
GRADER_REFERENCE = {"math500": "solution", "minerva_math": "solution", "aime24": "solution", "gsm8k": "answer"}


def _failing_references(name: str, path: Path) -> list[str]:
    """Ids of the rows whose reference, through extract_answer and verify_answer, does not verify against the gold."""
    rewards = pytest.importorskip("pte.training.rewards")
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
    return failing


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_grader_accepts_fixture_references(name: str) -> None:
    assert _failing_references(name, FIXTURES / f"{name}.jsonl") == []


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.is_dir(), reason="shared benchmark files not present")
@pytest.mark.parametrize("name", sorted(REAL_ROWS))
def test_grader_accepts_reference_answers(name: str) -> None:
    """Each benchmark's own reference, through the project's grader, must score >= 99 % against our gold strings."""
    failing = _failing_references(name, SHARED / f"{name}.jsonl")
    rate = 1 - len(failing) / REAL_ROWS[name]
    assert rate >= 0.99, f"{name}: {rate:.2%} of references verify; failing: {failing}"
