"""Training examples from raw rows: field paths, value checks, and the Arrow table that keeps each distinct one once.

Rows come from JSONL, Parquet or Hugging Face datasets (pte.training.data). Question and gold answer are read through
field paths such as ``prompt.0.content``; a missing, null, empty or non-scalar value is an error naming the row.
Repeated rows (same question and answer) are dropped: DAPO-Math-17K on the hub holds its ~17.9K prompts ~100 times over
(1.79M rows). The kept rows stay Arrow columns (:class:`ExampleTable`), read ``BATCH_ROWS`` rows at a time, and an
:class:`Example` is built only when a process takes it for its own share of a batch, so no process holds the whole
set as Python objects.
"""

from __future__ import annotations

import decimal
import itertools
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pte.config import ConfigError

BATCH_ROWS = 65_536  # rows read at a time from a file or dataset: bounds what loading holds beside the kept rows


@dataclass(frozen=True)
class Example:
    """One training prompt: a stable id (``<source>/<row>``), the bare question, its gold final answer and, where
    the source has one, a worked solution (the target of ``objective: sft``)."""

    id: str
    question: str
    answer: str
    solution: str | None = None


class DataError(ConfigError):
    """Bad data or data config; the message names the file, dataset, row, field or config key at fault."""


def get_field(row: Any, path: str, where: str) -> Any:
    """Follow a field path such as ``reward_model.ground_truth`` or ``prompt[0].content`` through nested rows.

    Raises:
        DataError: naming ``where`` (source and row) and ``path``, when a key or index is missing or the value is null.
    """
    value = row
    for part in path.replace("[", ".").replace("]", "").split("."):
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, (list, tuple)) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        else:
            found = sorted(value) if isinstance(value, Mapping) else type(value).__name__
            raise DataError(f"{where}: missing field {path!r} (no {part!r} in {found})")
    if value is None:
        raise DataError(f"{where}: field {path!r} is null")
    return value


def _as_text(value: Any, path: str, where: str) -> str:
    """Render a question or gold value as a non-empty string; refuse lists, dicts, booleans and non-finite numbers.

    Floats are written positionally (27.0 -> "27", 1e-07 -> "0.0000001"): graders read ``1e-07`` as ``e - 7``.
    """
    if not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: field {path!r} is a {type(value).__name__}, expected a string or a number")
    if isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value)):
        raise DataError(f"{where}: field {path!r} is {value!r}, not a question or an answer")
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else format(decimal.Decimal(repr(value)), "f")
    text = str(value).strip()
    if not text:
        raise DataError(f"{where}: field {path!r} is empty")
    return text


def to_examples(rows: Iterable[tuple[int, Any]], prefix: str, where: str, fields: tuple[str, str]) -> Iterator[Example]:
    """Examples (id ``<prefix>/<row>``) from numbered raw rows through the question and answer field paths, lazily."""
    for row, item in rows:
        at = f"{where}, row {row}"
        question, answer = (_as_text(get_field(item, field, at), field, at) for field in fields)
        yield Example(f"{prefix}/{row}", question, answer)


SCHEMA = pa.schema([("id", pa.string()), ("question", pa.string()), ("answer", pa.string()), ("solution", pa.string())])


def _first_rows(table: pa.Table, keys: list[str]) -> np.ndarray:
    """Row index of the first occurrence of every distinct value of ``keys`` in ``table``, in row order."""
    rows = table.select(keys).append_column("row", pa.array(np.arange(len(table), dtype=np.int64)))
    first = rows.group_by(keys, use_threads=False).aggregate([("row", "min")])
    return np.sort(first["row_min"].to_numpy())


class ExampleTable(Sequence[Example]):
    """Examples as Arrow columns (``SCHEMA``); indexing builds one :class:`Example`, so a process that takes only its
    own shard of prompts never holds the others as Python objects.

    Built by :meth:`from_batches`, which keeps the first row of every distinct (question, answer) and counts the
    rest in ``repeats``.
    """

    def __init__(self, table: pa.Table, repeats: int = 0) -> None:
        self.table = table.combine_chunks()
        self.repeats = repeats
        self._columns = [self.table.column(name) for name in SCHEMA.names]

    @classmethod
    def from_batches(cls, batches: Iterable[pa.Table]) -> ExampleTable:
        """The distinct rows of ``batches`` (tables of ``SCHEMA``) in order, merged one batch at a time."""
        kept, rows = SCHEMA.empty_table(), 0
        for batch in batches:
            rows += len(batch)
            merged = pa.concat_tables([kept, batch])
            kept = merged.take(_first_rows(merged, ["question", "answer"]))
        return cls(kept, rows - len(kept))

    @classmethod
    def from_examples(cls, examples: Iterable[Example]) -> ExampleTable:
        return cls.from_batches(_examples_table(chunk) for chunk in _chunks(examples, BATCH_ROWS))

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, index: int) -> Example:
        row = int(index)
        if not -len(self) <= row < len(self):
            raise IndexError(f"example {row} of {len(self)}")
        return Example(*(column[row].as_py() for column in self._columns))

    def first_rows(self, keys: list[str]) -> np.ndarray:
        """Row of the first occurrence of every distinct value of the columns ``keys``, in row order."""
        return _first_rows(self.table, keys)

    def where(self, keep: pa.Array) -> ExampleTable:
        """The rows where the boolean ``keep`` is true."""
        return ExampleTable(self.table.filter(keep))


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _examples_table(examples: list[Example]) -> pa.Table:
    columns = {name: [getattr(e, name) for e in examples] for name in SCHEMA.names}
    return pa.table(columns, schema=SCHEMA)


def _arrow_text(batch: pa.Table, path: str) -> pa.Array | None:
    """The trimmed strings at field path ``path`` of every row, when Arrow can follow the path and every value is a
    non-empty string; None otherwise, and the caller reads the rows in Python (numbers, or the error naming the row).
    """
    head, *rest = path.replace("[", ".").replace("]", "").split(".")
    if head not in batch.column_names:
        return None
    value = batch.column(head).combine_chunks()
    try:
        for part in rest:
            if pa.types.is_struct(value.type) and value.type.get_field_index(part) >= 0:
                value = pc.struct_field(value, part)
            elif (pa.types.is_list(value.type) or pa.types.is_large_list(value.type)) and part.isdigit():
                value = pc.list_element(value, int(part))
            else:
                return None
    except pa.ArrowInvalid:  # a row's list is shorter than the index
        return None
    if not (pa.types.is_string(value.type) or pa.types.is_large_string(value.type)):
        return None
    text = pc.utf8_trim_whitespace(value)
    if text.null_count or pc.any(pc.equal(pc.utf8_length(text), 0)).as_py():
        return None
    return text.cast(pa.string())


def arrow_examples(batches: Iterable[pa.Table], prefix: str, where: str, fields: tuple[str, str]) -> ExampleTable:
    """Distinct examples from raw Arrow batches, rows numbered from 0 across them, ids ``<prefix>/<row>``.

    String fields stay in Arrow; a batch Arrow cannot read as clean strings goes through :func:`to_examples`.
    """

    def tables() -> Iterator[pa.Table]:
        start = 0
        for batch in batches:
            texts = [_arrow_text(batch, path) for path in fields]
            if any(text is None for text in texts):
                rows = enumerate(batch.to_pylist(), start)
                yield _examples_table(list(to_examples(rows, prefix, where, fields)))
            else:
                rows = pc.cast(pa.array(np.arange(start, start + len(batch), dtype=np.int64)), pa.string())
                ids = pc.binary_join_element_wise(f"{prefix}/", rows, "")
                yield pa.table([ids, *texts, pa.nulls(len(batch), pa.string())], schema=SCHEMA)
            start += len(batch)

    return ExampleTable.from_batches(tables())
