"""Benchmarks of the paper (docs/method.md §5): MATH-500, OlympiadBench, Minerva Math, AMC23, AIME24, AIME25,
plus GSM8K as a cheap sanity set.

Every benchmark is one row of the ``BENCHMARKS`` table: where it lives on the Hugging Face Hub and how one of its
rows becomes a :class:`Problem`. Each converter reads the benchmark's *own* row format, both the one of the local
copies in ``shared/data/benchmarks/`` (see its SOURCES.md) and, where it differs, the format of the Hub dataset named
in the table. Gold answers always come out as non-empty strings, so graders never see a number or a list.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pte.training.answers import drop_math_dollars, last_boxed

Row = Mapping[str, Any]


@dataclass(frozen=True)
class Problem:
    """One evaluation item: a question and its gold final answer (as a string)."""

    id: str
    question: str
    answer: str
    variant: str = ""  # a task variant the report breaks accuracy down by (the carry task's ``14x2``), or none


class BenchmarkFormatError(ValueError):
    """A benchmark row lacks a field or has an empty gold answer."""


def _field(row: Row, *keys: str) -> Any:
    """Return the first of ``keys`` present (and not None) in ``row``, so one converter serves Hub and local rows."""
    for key in keys:
        if row.get(key) is not None:
            return row[key]
    raise KeyError(f"missing field {' / '.join(repr(k) for k in keys)} (row has {sorted(row)})")


def _number_to_str(value: Any) -> str:
    """Render a gold number the way a model would write it: 27.0 -> "27", 0.5 -> "0.5", "025" -> "25"."""
    if isinstance(value, bool):
        raise TypeError(f"boolean gold answer {value!r}")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return str(int(value))
    return str(value).strip()


def _gsm8k_answer(row: Row) -> str:
    """GSM8K: the text after ``#### `` in the worked answer, with thousands separators removed (1,000 -> 1000)."""
    text = str(_field(row, "answer"))
    if "####" not in text:
        raise KeyError("no '####' line in 'answer'")
    final = text.rsplit("####", 1)[1].strip()
    return re.sub(r"(?<=\d),(?=\d{3}\b)", "", final)


def _minerva_answer(row: Row) -> str:
    """Minerva: the Hub copy (math-ai/minervamath) has a bare ``answer``; the Qwen-harness copy only ``solution``."""
    if row.get("answer") is not None:
        return str(row["answer"]).strip()
    boxed = last_boxed(str(_field(row, "solution")))
    if boxed is None:
        raise KeyError("no complete \\boxed{} in 'solution'")
    return drop_math_dollars(boxed)


def _olympiad_answer(row: Row) -> str:
    """OlympiadBench: ``final_answer`` is a list of LaTeX strings, often ``$...$``-wrapped (even ``$69$,$84$``).

    Math-mode dollars are dropped and list items are joined with ", ".
    """
    items = _field(row, "final_answer")
    if isinstance(items, str):
        items = [items]
    parts = [drop_math_dollars(str(item)) for item in items]
    return ", ".join(part for part in parts if part)


def _answer_field(*keys: str) -> Callable[[Row], str]:
    """Gold answer read from one of ``keys``; numbers (AIME int, AMC float 27.0) are rendered as integers."""
    return lambda row: _number_to_str(_field(row, *keys))


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where a benchmark lives on the Hub and how its rows map to :class:`Problem`.

    ``revision`` is "main" everywhere: the Hub is unreachable from this project's machines, so no commit sha could be
    verified. Pin a sha here once one has been checked; the local files are pinned by SOURCES.md instead.
    """

    hf_id: str
    split: str
    question_keys: tuple[str, ...]
    answer: Callable[[Row], str]
    id_key: str | None = None
    config: str | None = None
    revision: str = "main"


BENCHMARKS: dict[str, BenchmarkSpec] = {
    # Local (prm800k split) and Hub: problem, solution, answer (str), unique_id.
    "math500": BenchmarkSpec("HuggingFaceH4/MATH-500", "test", ("problem",), _answer_field("answer"), "unique_id"),
    # Local (Qwen harness): final_answer list, question. Hub: the same fields in config OE_TO_maths_en_COMP.
    "olympiadbench": BenchmarkSpec(
        "Hothan/OlympiadBench", "train", ("question",), _olympiad_answer, "id", config="OE_TO_maths_en_COMP"
    ),
    # Local (Qwen harness): problem, solution, idx. Hub: question, answer.
    "minerva_math": BenchmarkSpec("math-ai/minervamath", "test", ("problem", "question"), _minerva_answer, "idx"),
    # Local (Qwen harness): problem/question, answer float (27.0). Hub: question, answer.
    "amc23": BenchmarkSpec("math-ai/amc23", "test", ("problem", "question"), _answer_field("answer"), "id"),
    # Local (Qwen harness): problem, answer str ("025" -> "25"). Hub (HuggingFaceH4): problem, answer str.
    "aime24": BenchmarkSpec("HuggingFaceH4/aime_2024", "train", ("problem",), _answer_field("answer"), "id"),
    # Local (AReaL) and Hub (math-ai): problem, answer (int locally), id.
    "aime25": BenchmarkSpec("math-ai/aime25", "test", ("problem",), _answer_field("answer"), "id"),
    # Local (openai/grade-school-math) and Hub: question, answer ("... #### 18").
    "gsm8k": BenchmarkSpec("openai/gsm8k", "test", ("question",), _gsm8k_answer, config="main"),
}


def _convert(
    rows: Iterable[tuple[int, Row]],
    where: str,
    question_keys: tuple[str, ...],
    answer: Callable[[Row], str],
    id_key: str | None,
    id_prefix: str,
    limit: int | None,
) -> list[Problem]:
    """Turn numbered rows into Problems, naming ``where`` and the row number in every error."""
    problems: list[Problem] = []
    for number, row in rows:
        if limit is not None and len(problems) >= limit:
            break
        try:
            question = str(_field(row, *question_keys)).strip()
            gold = answer(row)
        except (KeyError, TypeError, ValueError) as err:
            detail = err.args[0] if isinstance(err, KeyError) and err.args else err  # str(KeyError) adds quotes
            raise BenchmarkFormatError(f"{where}, row {number}: {detail}") from err
        if not question or not gold:
            raise BenchmarkFormatError(f"{where}, row {number}: empty {'question' if not question else 'gold answer'}")
        raw_id = row.get(id_key) if id_key else None
        problems.append(Problem(f"{id_prefix}{number if raw_id is None else raw_id}", question, gold))
    return problems


def _read_jsonl(path: str, where: str) -> Iterable[tuple[int, Row]]:
    """Yield (line number, object) for each non-blank line of a JSONL file, so errors can point at the line."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise BenchmarkFormatError(f"{where}, row {number}: invalid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise BenchmarkFormatError(f"{where}, row {number}: not a JSON object")
            yield number, row


OFFLINE_SEED = 1_000_003  # far from any training seed, so these problems are held out from training streams
OFFLINE = {"arithmetic": 200, "carry": 200}  # procedural benchmarks generated locally: name -> default size


def _offline(name: str, limit: int | None, carry: tuple[Any, Any, Any]) -> list[Problem]:
    """Offline held-out sets: reasoning-gym arithmetic at the training defaults, and the carry task ``carry``."""
    size = limit or OFFLINE[name]
    if name == "carry":
        from pte.training.carry import carry_problems, problem_variant, variant_name

        steps, values, letters = carry
        problems = carry_problems(size, OFFLINE_SEED, steps, values, letters=letters)
        family = variant_name(steps, values)
        return [
            Problem(f"carry/{family}/{i}", p.question, p.answer, variant_name(*problem_variant(p.question)))
            for i, p in enumerate(problems)
        ]
    from pte.training.data import DEFAULT_TASK_CONFIGS, DEFAULT_TASKS, reasoning_gym_examples

    examples = reasoning_gym_examples(DEFAULT_TASKS, max(size, len(DEFAULT_TASKS)), OFFLINE_SEED, DEFAULT_TASK_CONFIGS)
    return [Problem(f"{name}/{i}", e.question, e.answer) for i, e in enumerate(examples[:size])]


def load_benchmark(
    name: str, path: str | None = None, limit: int | None = None, carry: tuple[Any, Any, Any] = (10, 1, 10)
) -> list[Problem]:
    """Load a registered benchmark as Problems, from a local JSONL copy or from the Hugging Face Hub.

    Args:
        name: a key of ``BENCHMARKS``, ``arithmetic`` (generated offline by reasoning-gym, seed OFFLINE_SEED) or
            ``carry`` (the carry task of pte/training/carry.py, seed OFFLINE_SEED, variant ``carry``).
        path: a JSONL file in that benchmark's own row format; None loads ``hf_id`` at ``revision`` from the Hub.
        limit: keep only the first ``limit`` problems.
        carry: ``(steps, values, letters)`` of the carry task, each one number or an inclusive ``[lo, hi]`` range
            (``data.carry_steps``, ``data.carry_values``, ``data.carry_letters``).

    Returns:
        Problems in file order. Ids are ``"<name>/<row id>"``, or ``"<name>/<row number>"`` where rows have no id
        (GSM8K): the JSONL line number (from 1), or the Hub row index (from 0).

    Raises:
        ValueError: unknown ``name``. BenchmarkFormatError (a ValueError): a missing field or an empty answer.
    """
    if name in OFFLINE and path is None:
        return _offline(name, limit, carry)
    spec = BENCHMARKS.get(name)
    if spec is None:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(sorted([*BENCHMARKS, *OFFLINE]))}")
    if path is not None:
        where = f"benchmark {name!r}, file {path}"
        rows: Iterable[tuple[int, Row]] = _read_jsonl(path, where)
    else:
        import datasets  # deferred: importing datasets costs ~1 s and local loading does not need it

        where = f"benchmark {name!r}, {spec.hf_id}@{spec.revision} split {spec.split}"
        rows = enumerate(datasets.load_dataset(spec.hf_id, spec.config, revision=spec.revision, split=spec.split))
    return _convert(rows, where, spec.question_keys, spec.answer, spec.id_key, f"{name}/", limit)


def load_jsonl_problems(path: str, question_key: str, answer_key: str, id_key: str | None = None) -> list[Problem]:
    """Load a custom JSONL problem set whose gold answer sits in one field.

    Args:
        path: JSONL file, one object per line.
        question_key: field holding the question text.
        answer_key: field holding the gold answer (numbers are rendered like the registered sets: 27.0 -> "27").
        id_key: optional field holding the problem id; the line number is used otherwise.

    Returns:
        Problems in file order, ids as found (no prefix).
    """
    where = f"file {path}"
    return _convert(_read_jsonl(path, where), where, (question_key,), _answer_field(answer_key), id_key, "", None)
