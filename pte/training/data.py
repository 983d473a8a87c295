"""Training prompts for cache-aware GRPO (docs/method.md §4-5): questions with gold answers (formatting: prompts.py).

Sources: reasoning-gym arithmetic (cheap problems a small model can solve), any Hugging Face dataset (the paper
trains on DAPO-Math-17K) and local JSONL / Parquet files, read through field paths such as ``prompt.0.content``.
:class:`MathDataModule` rejects unparseable gold answers at load time (docs/method.md §6: a broken gold never scores
1), holds out a validation set disjoint by question text, and streams training batches whose position survives
checkpoint and resume. Prompts come out fully formatted: encode them with ``encode_prompts(..., chat=False)``.

Repeated rows (same question and answer) are dropped at load and the rest kept as Arrow columns (pte.training.examples):
Hugging Face and Parquet sources are read in Arrow batches from their memory-mapped files, and each process builds
only the examples of its own share of every batch.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from torch.utils.data import DataLoader, IterableDataset
from transformers import PreTrainedTokenizerBase

from pte.training.collectives import rank_world
from pte.training.examples import BATCH_ROWS, DataError, Example, ExampleTable, arrow_examples, to_examples
from pte.training.prompts import DEFAULT_FEW_SHOT, DEFAULT_INSTRUCTION, format_prompt

log = logging.getLogger(__name__)

DEFAULT_TASKS = ("basic_arithmetic", "chain_sum")
# reasoning-gym's own defaults go up to 6 terms of 4 digits; a 135M model only has a chance on short sums.
DEFAULT_TASK_CONFIGS: dict[str, dict[str, Any]] = {
    "basic_arithmetic": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2},
    "chain_sum": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2},
}
SOURCES = ("reasoning_gym", "carry", "hf", "file")


def reasoning_gym_examples(
    tasks: Sequence[str] = DEFAULT_TASKS,
    size: int = 1000,
    seed: int = 0,
    task_configs: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Example]:
    """Procedurally generated problems from reasoning-gym: ``size`` in all, split evenly over ``tasks``.

    ``task_configs`` maps a task to generator options, merged over ``DEFAULT_TASK_CONFIGS``. Returns the tasks
    interleaved round-robin, ids ``<task>/<seed>/<index>``, gold answers as reasoning-gym writes them.
    """
    import reasoning_gym  # deferred: importing it costs ~2 s

    if not tasks or len(set(tasks)) != len(tasks):
        raise DataError(f"data.tasks: need distinct reasoning-gym task names, got {list(tasks)}")
    if size < len(tasks):
        raise DataError(f"data.size: {size} is smaller than the number of tasks ({len(tasks)})")
    per_task = []
    for i, task in enumerate(tasks):
        options = {**DEFAULT_TASK_CONFIGS.get(task, {}), **(task_configs or {}).get(task, {})}
        count = size // len(tasks) + (i < size % len(tasks))
        try:
            dataset = reasoning_gym.create_dataset(task, size=count, seed=seed, **options)
        except (ValueError, TypeError, AssertionError) as err:
            raise DataError(f"data.tasks / data.task_configs.{task}: reasoning-gym refused {options}: {err}") from err
        where = f"reasoning_gym task {task!r} seed {seed}"
        per_task.append(list(to_examples(enumerate(dataset), f"{task}/{seed}", where, ("question", "answer"))))
    longest = max(len(items) for items in per_task)
    return [items[j] for j in range(longest) for items in per_task if j < len(items)]


def carry_examples(size: int, seed: int, steps: Any, values: Any, letters: Any = 10) -> list[Example]:
    """The offline long-horizon carry task (pte/training/carry.py) with worked solutions; ids ``carry/<seed>/<i>``."""
    from pte.training.carry import carry_problems

    try:
        problems = carry_problems(size, seed, steps, values, letters=letters)
    except ValueError as err:
        raise DataError(str(err)) from None
    return [Example(f"carry/{seed}/{i}", p.question, p.answer, p.solution) for i, p in enumerate(problems)]


def hf_examples(
    name: str,
    split: str,
    question_field: str,
    answer_field: str,
    config: str | None = None,
    revision: str = "main",
    limit: int | None = None,
) -> ExampleTable:
    """Load a Hugging Face dataset (hub id, local directory or cached copy) as Examples.

    ``question_field`` / ``answer_field`` are field paths (DAPO-Math-17K: ``prompt.0.content``,
    ``reward_model.ground_truth``); ``limit`` keeps the first rows. Ids are ``<name>/<split>/<row from 0>``. The
    dataset stays memory-mapped: it is read in Arrow batches, and only its distinct rows are kept.
    """
    import datasets  # deferred: importing it costs ~1 s

    try:
        dataset = datasets.load_dataset(name, config, split=split, revision=revision)
    except Exception as err:  # the library raises many unrelated types; all mean "cannot load"
        raise DataError(
            f"data.name: cannot load dataset {name!r} (config {config!r}, split {split!r}, revision {revision!r}): "
            f"{type(err).__name__}: {err}. Offline (HF_HUB_OFFLINE=1) it must be a local path or already cached."
        ) from err
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    batches = dataset.with_format("arrow").iter(batch_size=BATCH_ROWS)
    fields = (question_field, answer_field)
    return arrow_examples(batches, f"{name}/{split}", f"dataset {name!r} split {split!r}", fields)


def _jsonl_rows(path: Path, limit: int | None) -> Iterator[tuple[int, Any]]:
    """Yield (line number from 1, parsed object) for the first ``limit`` non-blank lines of a JSONL file."""
    with path.open(encoding="utf-8") as handle:
        lines = ((number, line) for number, line in enumerate(handle, start=1) if line.strip())
        for number, line in itertools.islice(lines, limit):
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"file {path}, row {number}: invalid JSON ({err.msg})") from err


def file_examples(path: str | Path, question_field: str, answer_field: str, limit: int | None = None) -> ExampleTable:
    """Load a local JSONL (``.jsonl``) or Parquet (``.parquet``) file as Examples, fields as in :func:`hf_examples`.

    Ids are ``<file stem>/<row>``: JSONL rows are line numbers (from 1), Parquet rows indices (from 0). Either is read
    ``BATCH_ROWS`` rows at a time, and only the distinct rows are kept.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.path: {path} is not a file")
    fields, where = (question_field, answer_field), f"file {path}"
    if path.suffix == ".jsonl":
        return ExampleTable.from_examples(to_examples(_jsonl_rows(path, limit), path.stem, where, fields))
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        batches = pq.ParquetFile(path, memory_map=True).iter_batches(batch_size=BATCH_ROWS)
        tables = (pa.Table.from_batches([b]) for b in batches)
        return arrow_examples(_limited(tables, limit), path.stem, where, fields)
    raise DataError(f"data.path: {path} must end in .jsonl or .parquet")


def _limited(tables: Iterable[pa.Table], limit: int | None) -> Iterator[pa.Table]:
    """The first ``limit`` rows (all with None) of a stream of tables."""
    if limit is None:
        yield from tables
        return
    for table in tables:
        if limit <= 0:
            return
        yield table.slice(0, limit)
        limit -= len(table)


def _check_int(key: str, value: Any, low: int, optional: bool) -> None:
    """Refuse a count that is not an integer >= ``low`` (None allowed when ``optional``), naming its config key."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise DataError(f"data.{key}: must be an integer >= {low}, got {value!r}")


class _PromptStream(IterableDataset):
    """Endless training batches, starting at the data module's current stream position."""

    def __init__(self, module: MathDataModule) -> None:
        self.module = module

    def __iter__(self) -> Iterator[dict[str, list[str]]]:
        offset = self.module._offset
        while True:
            batch = self.module._train_batch(offset)
            offset += self.module.hparams.prompts_per_step
            if self.module.trainer is None:  # without a Trainer, a batch counts as consumed once yielded
                self.module._offset = offset
            yield batch


class MathDataModule(lightning.LightningDataModule):
    """Question / gold-answer prompts for GRPO: a seeded held-out validation set and an endless training stream.

    The stream walks a seeded permutation of the training examples per epoch, cut into batches of
    ``prompts_per_step`` (a batch may straddle two epochs; bound training with ``max_steps``). A batch is a dict of
    equal-length string lists: ``ids``, ``questions``, ``prompts`` (formatted) and ``answers``. Under multi-process
    training ``prompts_per_step`` is the global count and each process receives its own slice of every batch.

    Under a Trainer the position advances in ``on_before_batch_transfer``, when the loop takes a batch rather than
    when Lightning prefetches the next, so a checkpoint resumes at the first batch not trained on. This hook takes
    precedence over a LightningModule's own. Without a Trainer a batch counts once it is yielded.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | None = None,
        source: str = "reasoning_gym",
        *,
        tasks: Sequence[str] = DEFAULT_TASKS,
        size: int = 1000,
        task_configs: Mapping[str, Mapping[str, Any]] | None = None,
        carry_steps: int = 12,
        carry_values: int = 1,
        carry_letters: Any = 10,
        name: str | None = None,
        split: str = "train",
        config: str | None = None,
        revision: str = "main",
        path: str | None = None,
        question_field: str = "question",
        answer_field: str = "answer",
        limit: int | None = None,
        val_size: int = 64,
        prompts_per_step: int = 8,
        seed: int = 0,
        template: str = "chat",
        system: str | None = None,
        few_shot: Sequence[Mapping[str, str]] | None = DEFAULT_FEW_SHOT,
        instruction: str = DEFAULT_INSTRUCTION,
    ) -> None:
        """Check the config (errors name the ``data.*`` key) and keep it in ``hparams``; ``setup`` loads.

        Args:
            tokenizer: Serves the ``chat`` template.
            source: ``reasoning_gym`` (``tasks``, ``size``, ``task_configs``), ``carry`` (``size``, ``carry_steps``,
                ``carry_values``, ``carry_letters``: the long-horizon task of pte/training/carry.py), ``hf``
                (``name``, ``split``, ``config``, ``revision``) or ``file`` (``path``); the last two read
                ``question_field`` / ``answer_field`` and keep the first ``limit`` rows.
            val_size: Held-out validation questions (0 for none).
            prompts_per_step: Prompts per training batch (GRPO samples a group per prompt).
            seed: Seeds generation (reasoning-gym), the validation split and the training order.
            template, system, few_shot, instruction: See :func:`format_prompt`; None or [] few-shot is zero-shot.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])
        if source not in SOURCES:
            raise DataError(f"data.source: unknown source kind {source!r}; expected one of {', '.join(SOURCES)}")
        if not {"hf": name, "file": path}.get(source, True):
            key = "name" if source == "hf" else "path"
            raise DataError(f"data.{key}: source {source!r} needs data.{key}")
        for key, low in (("prompts_per_step", 1), ("val_size", 0), ("limit", 1)):
            _check_int(key, self.hparams[key], low, optional=key == "limit")
        self.tokenizer = tokenizer
        self._format = {"template": template, "system": system, "few_shot": few_shot, "instruction": instruction}
        format_prompt(tokenizer, "1 + 1 = ?", **self._format)  # a bad template or few-shot fails now
        self.where = {
            "reasoning_gym": f"reasoning_gym tasks {list(tasks)} seed {seed}",
            "carry": f"carry task seed {seed}",
            "file": f"file {path}",
        }.get(source, f"dataset {name!r} split {split!r}")
        self.train_examples: Sequence[Example] = []  # an ExampleTable after setup
        self.val_examples: list[Example] = []
        self._offset = 0
        self._permutations: dict[int, np.ndarray] = {}
        self._prompts: dict[str, str] = {}

    def _require_setup(self) -> Sequence[Example]:
        if not self.train_examples:
            raise RuntimeError("MathDataModule: call setup() first")
        return self.train_examples

    def _load(self) -> ExampleTable:
        """Read the configured source, keeping the first of every repeated (question, answer)."""
        h = self.hparams
        if h.source == "reasoning_gym":
            return ExampleTable.from_examples(reasoning_gym_examples(h.tasks, h.size, h.seed, h.task_configs))
        if h.source == "carry":
            return ExampleTable.from_examples(
                carry_examples(h.size, h.seed, h.carry_steps, h.carry_values, h.carry_letters)
            )
        fields = (h.question_field, h.answer_field)
        if h.source == "hf":
            return hf_examples(h.name, h.split, *fields, config=h.config, revision=h.revision, limit=h.limit)
        return file_examples(h.path, *fields, limit=h.limit)

    def _check_golds(self, examples: ExampleTable) -> None:
        """Parse every distinct gold answer once, so a broken gold fails the run at load time, naming its row."""
        from pte.training.rewards import GoldAnswerError, parse_gold

        for row in examples.first_rows(["answer"]):
            example = examples[row]
            try:
                parse_gold(example.answer, example.id)
            except GoldAnswerError as err:
                row = example.id.rsplit("/", 1)[-1]
                raise DataError(
                    f"{self.where}, row {row} (id {example.id!r}): gold answer {example.answer!r} cannot be parsed "
                    f"by the grader ({err})"
                ) from err

    def _split(self, examples: ExampleTable) -> tuple[list[Example], ExampleTable]:
        """Hold out ``val_size`` distinct questions; every copy of a held-out question leaves the training set."""
        first = examples.first_rows(["question"])  # [distinct questions], in order of appearance
        if self.hparams.val_size >= len(first):
            raise DataError(
                f"data.val_size: {self.hparams.val_size} leaves no training data ({len(first)} distinct questions)"
            )
        rng = np.random.default_rng([self.hparams.seed, 1])
        picked = sorted(rng.choice(len(first), size=self.hparams.val_size, replace=False).tolist())
        val = [examples[first[i]] for i in picked]
        held_out = pc.is_in(examples.table["question"], value_set=pa.array([e.question for e in val], pa.string()))
        return val, examples.where(pc.invert(held_out))

    def setup(self, stage: str | None = None) -> None:
        """Load, validate and split the examples (once; later calls do nothing)."""
        if self.train_examples:
            return
        examples = self._load()
        if not examples:
            raise DataError(f"data: {self.where} gave an empty dataset")
        if examples.repeats:
            log.info(
                "data: %s: dropped %d repeated rows (same question and answer as an earlier row), %d remain",
                self.where,
                examples.repeats,
                len(examples),
            )
        self._check_golds(examples)
        self.val_examples, train = self._split(examples)
        if self.hparams.prompts_per_step > len(train):
            raise DataError(
                f"data.prompts_per_step: {self.hparams.prompts_per_step} exceeds the {len(train)} training examples"
            )
        self.train_examples = train

    def prompt(self, question: str) -> str:
        """The formatted prompt for a question (cached)."""
        if question not in self._prompts:
            self._prompts[question] = format_prompt(self.tokenizer, question, **self._format)
        return self._prompts[question]

    def _collate(self, examples: list[Example]) -> dict[str, list[str]]:
        """Keep a batch as parallel string lists (no tensors: prompts are tokenised by the rollout).

        ``solutions`` holds worked solutions (empty strings where the source has none).
        """
        return {
            "ids": [e.id for e in examples],
            "questions": [e.question for e in examples],
            "prompts": [self.prompt(e.question) for e in examples],
            "answers": [e.answer for e in examples],
            "solutions": [e.solution or "" for e in examples],
        }

    def _permutation(self, epoch: int) -> np.ndarray:
        """The training order of one epoch, seeded by (seed, epoch)."""
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:
                self._permutations.pop(min(self._permutations))
            rng = np.random.default_rng([self.hparams.seed, 2, epoch])
            self._permutations[epoch] = rng.permutation(len(self._require_setup()))
        return self._permutations[epoch]

    def _train_batch(self, offset: int) -> dict[str, list[str]]:
        """This process's share of the global batch whose first example sits at ``offset`` in the concatenation of
        all epochs' orders: rank r of w takes the r-th of w equal consecutive slices, so the shards together are the
        single-process batch and the stream position (global) resumes exactly, whatever the number of processes."""
        train = self._require_setup()
        n = len(train)
        rank, world = rank_world()
        share, rest = divmod(self.hparams.prompts_per_step, world)
        if rest:
            raise DataError(
                f"rollout.batch_size: its {self.hparams.prompts_per_step} prompts per step cannot be shared by {world} "
                "processes"
            )
        picks = range(offset + rank * share, offset + (rank + 1) * share)
        return self._collate([train[self._permutation(i // n)[i % n]] for i in picks])

    def train_dataloader(self) -> DataLoader:
        """Endless training batches from the current position."""
        self._require_setup()
        return DataLoader(_PromptStream(self), batch_size=None, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        """The held-out set in fixed order, ``val_batch_size`` prompts per batch."""
        self._require_setup()
        return DataLoader(
            self.val_examples,
            batch_size=self.hparams.prompts_per_step,
            shuffle=False,
            collate_fn=self._collate,
            num_workers=0,
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count a training batch as consumed when the training loop takes it (after Lightning's prefetch)."""
        if self.trainer is not None and self.trainer.training and isinstance(batch, dict) and "ids" in batch:
            self._offset += self.hparams.prompts_per_step  # the global batch: every process's share
        return batch

    def state_dict(self) -> dict[str, int]:
        """Stream position (``epoch``, ``position`` within it) and what it assumes (``num_train``, ``seed``)."""
        if not self.train_examples:
            return {}
        n = len(self.train_examples)
        return {"epoch": self._offset // n, "position": self._offset % n, "num_train": n, "seed": self.hparams.seed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Continue the stream from a checkpoint (after ``setup``, as Lightning does when resuming).

        A different training set or seed would silently change what the position means, so it is an error.
        """
        n = len(self._require_setup())
        saved = (state_dict.get("num_train"), state_dict.get("seed"))
        if saved != (n, self.hparams.seed):
            raise DataError(
                f"data: the checkpoint's stream is for {saved[0]} training examples and seed {saved[1]}, this run has "
                f"{n} and seed {self.hparams.seed} (data.source / data.seed / data.val_size changed?)"
            )
        self._offset = state_dict["epoch"] * n + state_dict["position"]
