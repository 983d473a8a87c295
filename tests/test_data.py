"""Tests for pte.training.data: prompt sources, prompt templates and the GRPO data module (docs/method.md §4-6)."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import lightning
import pyarrow as pa
import pyarrow.json
import pyarrow.parquet as pq
import pytest
import torch

import pte.training.data
import pte.training.examples
from pte.config import ConfigError
from pte.models.tiny import tiny_tokenizer
from pte.training.data import (
    DataError,
    Example,
    ExampleTable,
    MathDataModule,
    file_examples,
    hf_examples,
    reasoning_gym_examples,
)
from pte.training.prompts import DEFAULT_FEW_SHOT, DEFAULT_INSTRUCTION, format_prompt

# 5 synthetic rows in the format of shared/data/benchmarks/dapo_math_17k.jsonl (see its SOURCES.md): the same fields,
# order, nesting and JSON escaping; the source's own rows may only live in shared/.
FIXTURE = Path(__file__).parent / "fixtures" / "data" / "dapo_math_17k_5.jsonl"
SOURCE = Path("/work/shared/data/benchmarks/dapo_math_17k.jsonl")
DAPO = ("prompt.0.content", "reward_model.ground_truth")
DAPO_ANSWERS = ["73", "8", "-5", "147", "5"]
SHOT = {"question": "Q1", "answer": "A1"}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def dapo_rows() -> list[dict]:
    return [json.loads(line) for line in FIXTURE.read_text(encoding="utf-8").splitlines()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def make_dm(tok, **overrides) -> MathDataModule:
    kwargs = {"size": 40, "val_size": 4, "prompts_per_step": 3, "seed": 0}
    dm = MathDataModule(tok, **{**kwargs, **overrides})
    dm.setup()
    return dm


def take(dm: MathDataModule, count: int) -> list[dict]:
    stream = iter(dm.train_dataloader())
    return [next(stream) for _ in range(count)]


# --- reasoning-gym source ---------------------------------------------------------------------------------------


def test_reasoning_gym_is_seeded_mixed_and_easy():
    first = reasoning_gym_examples(["basic_arithmetic", "chain_sum"], size=20, seed=0)
    assert first == reasoning_gym_examples(["basic_arithmetic", "chain_sum"], size=20, seed=0)
    other = reasoning_gym_examples(["basic_arithmetic", "chain_sum"], size=20, seed=1)
    assert [e.question for e in first] != [e.question for e in other]
    assert [e.id.split("/")[0] for e in first[:4]] == ["basic_arithmetic", "chain_sum"] * 2
    assert sum(e.id.startswith("chain_sum/") for e in first) == 10
    assert len({e.id for e in first}) == 20
    assert all(e.question and e.answer for e in first)
    for example in first:  # the default task configs keep problems small: at most 3 terms of at most 2 digits
        numbers = re.findall(r"\d+", example.question)
        assert 2 <= len(numbers) <= 3 and all(len(n) <= 2 for n in numbers), example.question


def test_reasoning_gym_task_configs_merge_over_defaults():
    examples = reasoning_gym_examples(
        ["chain_sum"], size=5, seed=0, task_configs={"chain_sum": {"min_terms": 5, "max_terms": 5}}
    )
    assert all(len(re.findall(r"\d+", e.question)) == 5 for e in examples)
    assert all(len(n) <= 2 for e in examples for n in re.findall(r"\d+", e.question))


@pytest.mark.parametrize(
    ("tasks", "configs", "match"),
    [
        (["no_such_task"], None, "data.tasks"),
        (["chain_sum", "chain_sum"], None, "data.tasks"),
        (["chain_sum"], {"chain_sum": {"bogus": 1}}, "data.task_configs.chain_sum"),
    ],
)
def test_reasoning_gym_bad_config_names_the_key(tasks, configs, match):
    with pytest.raises(DataError, match=re.escape(match)):
        reasoning_gym_examples(tasks, size=4, seed=0, task_configs=configs)


# --- file and Hugging Face sources --------------------------------------------------------------------------------


def test_file_jsonl_reads_nested_dapo_fields():
    examples = file_examples(FIXTURE, *DAPO)
    assert [e.answer for e in examples] == DAPO_ANSWERS
    assert [e.id for e in examples] == [f"dapo_math_17k_5/{i}" for i in range(1, 6)]
    assert examples[0].question.startswith("In triangle $ABC$, $AB = 5$")
    assert list(file_examples(FIXTURE, "prompt[0].content", DAPO[1], limit=2)) == list(examples)[:2]


def _shape(value):
    """Field names in order and value types, recursively."""
    if isinstance(value, dict):
        return tuple((key, _shape(item)) for key, item in value.items())
    if isinstance(value, list):
        return ("list", frozenset(_shape(item) for item in value))
    return type(value).__name__


@pytest.mark.skipif(not SOURCE.is_file(), reason="shared DAPO file not present")
def test_fixture_matches_source_format_without_copying_it():
    source = [json.loads(line) for line in SOURCE.read_text(encoding="utf-8").splitlines()]
    shapes = {_shape(row) for row in source}
    assert all(_shape(row) in shapes for row in dapo_rows())
    assert not {row["prompt"][0]["content"] for row in dapo_rows()} & {row["prompt"][0]["content"] for row in source}


def test_file_parquet_matches_jsonl(tmp_path):
    path = tmp_path / "dapo_math_17k_5.parquet"
    pq.write_table(pa.Table.from_pylist(dapo_rows()), path)
    from_parquet = file_examples(path, *DAPO)
    from_jsonl = file_examples(FIXTURE, *DAPO)
    assert [(e.question, e.answer) for e in from_parquet] == [(e.question, e.answer) for e in from_jsonl]
    assert [e.id for e in from_parquet] == [f"dapo_math_17k_5/{i}" for i in range(5)]
    assert len(file_examples(path, *DAPO, limit=3)) == 3


def test_missing_field_names_file_row_and_field(tmp_path):
    rows = dapo_rows()
    del rows[2]["reward_model"]["ground_truth"]
    path = write_jsonl(tmp_path / "broken.jsonl", rows)
    with pytest.raises(DataError) as err:
        file_examples(path, *DAPO)
    assert (
        "broken.jsonl" in str(err.value) and "row 3" in str(err.value) and "reward_model.ground_truth" in str(err.value)
    )
    with pytest.raises(DataError, match=r"row 1: missing field 'prompt\.1\.content'"):
        file_examples(FIXTURE, "prompt.1.content", DAPO[1])


@pytest.mark.parametrize(
    ("question_field", "answer_field", "match"),
    [("prompt.0.content", "prompt", "is a list"), ("prompt.0.content", "extra_info.answer", "is empty")],
)
def test_non_scalar_or_empty_values_are_refused(question_field, answer_field, match):
    with pytest.raises(DataError, match=f"row 1: field '{answer_field}' {match}"):
        file_examples(FIXTURE, question_field, answer_field)


def test_numeric_gold_answers_become_strings_and_booleans_are_refused(tmp_path):
    rows = [{"q": "A", "a": 27.0}, {"q": "B", "a": 5}, {"q": "C", "a": 0.5}, {"q": "D", "a": 1e-07}]
    path = write_jsonl(tmp_path / "numbers.jsonl", rows)
    assert [e.answer for e in file_examples(path, "q", "a")] == ["27", "5", "0.5", "0.0000001"]
    for bad in (True, float("inf"), float("nan")):
        path = write_jsonl(tmp_path / "bad.jsonl", [{"q": "A", "a": bad}])
        with pytest.raises(DataError, match=re.escape(f"row 1: field 'a' is {bad!r}, not")):
            file_examples(path, "q", "a")


def test_bad_suffix_and_invalid_json(tmp_path):
    with pytest.raises(DataError, match="data.path"):
        file_examples(tmp_path / "rows.csv", *DAPO)
    path = tmp_path / "bad.jsonl"
    path.write_text(FIXTURE.read_text(encoding="utf-8").splitlines()[0] + "\n\n{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match="row 3: invalid JSON"):
        file_examples(path, *DAPO)


def test_hf_examples_from_a_local_dataset_dir(tmp_path):
    shutil.copy(FIXTURE, tmp_path / "train.jsonl")
    examples = hf_examples(str(tmp_path), "train", *DAPO, limit=3)
    assert [e.answer for e in examples] == DAPO_ANSWERS[:3]
    assert examples[0].id == f"{tmp_path}/train/0"
    with pytest.raises(DataError, match="data.name"):
        hf_examples(str(tmp_path / "missing"), "train", *DAPO)


# --- repeated rows: dropped at load, in Arrow, and each process builds only its own prompts ----------------------


def _small_batches(monkeypatch, rows: int) -> None:
    """Read ``rows`` rows at a time, so that repeats straddle batches."""
    monkeypatch.setattr(pte.training.data, "BATCH_ROWS", rows)
    monkeypatch.setattr(pte.training.examples, "BATCH_ROWS", rows)


def _load_kind(tmp_path: Path, kind: str, rows: list[dict]) -> ExampleTable:
    if kind == "jsonl":
        return file_examples(write_jsonl(tmp_path / "pool.jsonl", rows), *DAPO)
    if kind == "parquet":
        return file_examples(write_parquet(tmp_path / "pool.parquet", rows), *DAPO)
    write_jsonl(tmp_path / "train.jsonl", rows)
    return hf_examples(str(tmp_path), "train", *DAPO)


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "hf"])
def test_repeated_rows_keep_their_first_occurrence(tmp_path, monkeypatch, kind):
    """The hub's DAPO-Math-17K repeats every prompt ~100 times; here 4 times, read 3 rows at a time."""
    _small_batches(monkeypatch, 3)
    if kind != "jsonl":
        monkeypatch.setattr(pte.training.examples, "to_examples", None)  # string fields never leave Arrow row by row
    rows = dapo_rows()
    other_answer = {**rows[0], "reward_model": {"ground_truth": "7", "style": "rule"}}
    examples = _load_kind(tmp_path, kind, rows * 4 + [other_answer])
    assert [e.answer for e in examples] == [*DAPO_ANSWERS, "7"]
    first = 1 if kind == "jsonl" else 0  # JSONL rows are line numbers
    assert [int(e.id.rsplit("/", 1)[1]) - first for e in examples] == [0, 1, 2, 3, 4, 20]
    assert examples.repeats == 15


def test_arrow_and_python_readers_agree(tmp_path, monkeypatch):
    _small_batches(monkeypatch, 2)
    rows = [
        {"q": " A ", "a": "1"},
        {"q": "A", "a": "1"},
        {"q": "B\n", "a": " 2"},
        {"q": "B", "a": "2"},
        {"q": "C", "a": "3"},
    ]
    jsonl = file_examples(write_jsonl(tmp_path / "ws.jsonl", rows), "q", "a")
    parquet = file_examples(write_parquet(tmp_path / "ws.parquet", rows), "q", "a")
    expected = [("A", "1"), ("B", "2"), ("C", "3")]
    assert [(e.question, e.answer) for e in parquet] == [(e.question, e.answer) for e in jsonl] == expected
    numbers = write_parquet(tmp_path / "numbers.parquet", [{"q": "A", "a": 27.0}, {"q": "B", "a": 0.5}])
    assert [e.answer for e in file_examples(numbers, "q", "a")] == ["27", "0.5"]
    rows[3]["a"] = None
    with pytest.raises(DataError, match=r"row 3: field 'a' is null"):
        file_examples(write_parquet(tmp_path / "null.parquet", rows), "q", "a")
    with pytest.raises(DataError, match=r"row 0: missing field 'prompt\.1\.content'"):
        file_examples(write_parquet(tmp_path / "dapo.parquet", dapo_rows()), "prompt.1.content", DAPO[1])


@pytest.mark.skipif(not SOURCE.is_file(), reason="shared DAPO file not present")
def test_real_dapo_three_times_over_gives_its_distinct_prompts(tmp_path):
    """17,917 rows, 17,267 distinct (question, answer) once trimmed; three copies load as the same distinct rows."""
    path = tmp_path / "dapo3.parquet"
    pq.write_table(pa.concat_tables([pyarrow.json.read_json(SOURCE)] * 3), path)
    examples = file_examples(path, *DAPO)
    first: dict[tuple[str, str], int] = {}
    for i, line in enumerate(SOURCE.read_text(encoding="utf-8").splitlines()):
        row = json.loads(line)
        first.setdefault((row["prompt"][0]["content"].strip(), row["reward_model"]["ground_truth"].strip()), i)
    assert [(e.question, e.answer) for e in examples] == list(first)
    assert [e.id for e in examples] == [f"dapo3/{i}" for i in first.values()]
    assert examples.repeats == 3 * (i + 1) - len(first)


def test_ranks_build_only_their_own_disjoint_prompts(tmp_path, tok, monkeypatch, caplog):
    """Two ranks over one epoch: disjoint shards that cover the distinct prompts, each building only its own."""
    rows = [{"q": f"What is {i} + 1?", "a": str(i + 1)} for i in range(12)]
    path = write_jsonl(tmp_path / "sums.jsonl", rows * 5)
    with caplog.at_level(logging.INFO, logger="pte.training.data"):
        dm = make_dm(
            tok, source="file", path=str(path), question_field="q", answer_field="a", val_size=0, prompts_per_step=6
        )
    assert "dropped 48 repeated rows" in caplog.text and "12 remain" in caplog.text
    built: list[int] = []
    getitem = ExampleTable.__getitem__
    monkeypatch.setattr(ExampleTable, "__getitem__", lambda table, i: built.append(int(i)) or getitem(table, i))
    shards = []
    for rank in range(2):
        monkeypatch.setattr(pte.training.data, "rank_world", lambda rank=rank: (rank, 2))
        built.clear()
        shard = [i for offset in range(0, 12, 6) for i in dm._train_batch(offset)["ids"]]
        assert len(built) == len(shard) == 6
        shards.append(set(shard))
    assert not shards[0] & shards[1]
    assert shards[0] | shards[1] == {e.id for e in dm.train_examples} and len(dm.train_examples) == 12


# --- prompt templates ---------------------------------------------------------------------------------------------


def test_chat_template_with_system_and_few_shot_turns(tok):
    prompt = format_prompt(tok, "What is 2+2?", "chat", system="Be brief.", few_shot=[SHOT], instruction="Box it.")
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nQ1\nBox it.<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?\nBox it.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_r1_template_is_exact():
    bar, space = "\uff5c", "\u2581"  # full-width vertical bar and lower one-eighth block, as in the R1 tokenizer
    bos, eos = f"<{bar}begin{space}of{space}sentence{bar}>", f"<{bar}end{space}of{space}sentence{bar}>"
    user, assistant = f"<{bar}User{bar}>", f"<{bar}Assistant{bar}>"
    assert format_prompt(None, "Q", "r1") == f"{bos}{user}Q\n{DEFAULT_INSTRUCTION}{assistant}<think>\n"
    shot = {"question": "Q1", "answer": "<think>\nscratch\n</think>A1"}
    prompt = format_prompt(None, "Q", "r1", system="S", few_shot=[shot], instruction="")
    assert prompt == f"{bos}S{user}Q1{assistant}A1{eos}{user}Q{assistant}<think>\n"


def test_plain_template_for_base_models():
    prompt = format_prompt(None, "Q", "plain", system="S", few_shot=[SHOT], instruction="I")
    assert prompt == "S\n\nQuestion: Q1\nI\nAnswer: A1\n\nQuestion: Q\nI\nAnswer:"
    assert format_prompt(None, "Q", "plain", instruction="") == "Question: Q\nAnswer:"


def test_default_one_shot_ends_in_a_box():
    assert len(DEFAULT_FEW_SHOT) == 1 and DEFAULT_FEW_SHOT[0]["answer"].rstrip(".").endswith("\\boxed{29}")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"template": "alpaca"}, "data.template"),
        ({"template": "chat", "tokenizer": None}, "data.template"),
        ({"few_shot": [{"question": "Q1"}]}, r"data.few_shot\[0\]"),
    ],
)
def test_bad_format_config_names_the_key(tok, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        format_prompt(**{"tokenizer": tok, "question": "Q", **kwargs})


# --- data module --------------------------------------------------------------------------------------------------


def test_batches_hold_formatted_prompts_and_gold_answers(tok):
    dm = make_dm(tok)
    batch = take(dm, 1)[0]
    assert set(batch) == {"ids", "questions", "prompts", "answers", "solutions"}
    assert all(len(values) == 3 and all(isinstance(v, str) for v in values) for values in batch.values())
    by_id = {e.id: e for e in dm.train_examples}
    for id_, question, prompt, answer in zip(*(batch[k] for k in ("ids", "questions", "prompts", "answers"))):
        assert by_id[id_] == Example(id_, question, answer)
        assert prompt == format_prompt(tok, question, few_shot=DEFAULT_FEW_SHOT)
    assert next(b["ids"] for b in dm.val_dataloader()) == [e.id for e in dm.val_examples[:3]]


def test_validation_is_held_out_and_each_epoch_covers_train_once(tok):
    dm = make_dm(tok, prompts_per_step=4)
    train, val = dm.train_examples, dm.val_examples
    assert len(val) == 4 and len(train) == 36
    assert not {e.question for e in val} & {e.question for e in train}
    ids = [i for batch in take(dm, 18) for i in batch["ids"]]
    assert sorted(ids[:36]) == sorted(e.id for e in train) == sorted(ids[36:])
    assert ids[:36] != ids[36:]  # reshuffled each epoch


def test_duplicate_questions_never_leak_into_training(tmp_path, tok):
    rows = dapo_rows()
    variants = [{**rows[0], "reward_model": {"ground_truth": str(k), "style": "rule"}} for k in range(3)]
    pool = rows[:1] * 20 + variants + rows[1:]  # one question 20 times and 3 times with other answers, four once
    path = write_jsonl(tmp_path / "dup.jsonl", pool)
    fields = {"question_field": DAPO[0], "answer_field": DAPO[1]}
    dm = make_dm(tok, source="file", path=str(path), **fields, val_size=3, prompts_per_step=1)
    held_out = {e.question for e in dm.val_examples}
    kept = {e.question for e in dm.train_examples}
    assert len(dm.val_examples) == len(held_out) == 3  # val_size counts distinct questions
    assert not held_out & kept and len(kept) == 2
    pairs = {(row["prompt"][0]["content"], row["reward_model"]["ground_truth"]) for row in pool}
    assert len(dm.train_examples) == sum(question in kept for question, _ in pairs)


def test_seed_alone_changes_split_and_order(tmp_path, tok):
    path = write_jsonl(tmp_path / "sums.jsonl", [{"q": f"What is {i} + 1?", "a": str(i + 1)} for i in range(30)])
    dms = [make_dm(tok, source="file", path=str(path), question_field="q", answer_field="a", seed=s) for s in (0, 1)]
    assert dms[0].val_examples != dms[1].val_examples
    whole = [
        make_dm(tok, source="file", path=str(path), question_field="q", answer_field="a", seed=s, val_size=0)
        for s in (0, 1)
    ]
    assert list(whole[0].train_examples) == list(whole[1].train_examples)
    assert [b["ids"] for b in take(whole[0], 3)] != [b["ids"] for b in take(whole[1], 3)]


def test_module_is_deterministic_per_seed(tok):
    first, again, other = make_dm(tok), make_dm(tok), make_dm(tok, seed=1)
    assert [b["ids"] for b in take(first, 4)] == [b["ids"] for b in take(again, 4)]
    assert first.val_examples == again.val_examples
    assert [b["questions"] for b in take(make_dm(tok), 4)] != [b["questions"] for b in take(other, 4)]
    assert [b["ids"] for b in first.val_dataloader()] == [b["ids"] for b in first.val_dataloader()]


def test_state_dict_resumes_the_stream_across_an_epoch_boundary(tok):
    dm = make_dm(tok)
    take(dm, 13)  # 39 samples: one full epoch of 36 plus 3
    state = dm.state_dict()
    assert state == {"epoch": 1, "position": 3, "num_train": 36, "seed": 0}
    expected = take(dm, 2)
    resumed = make_dm(tok)
    resumed.load_state_dict(state)
    assert take(resumed, 2) == expected
    with pytest.raises(DataError, match="36 training examples"):
        make_dm(tok, val_size=5).load_state_dict(state)


class _Recorder(lightning.LightningModule):
    """Records the ids of each training batch (and a marker per validation batch); one parameter to optimise."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[str]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["ids"])
        return (self.weight - 1).pow(2).sum()

    def validation_step(self, batch, batch_idx):
        self.seen.append(["val"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tok, max_steps: int, ckpt_in: Path | None = None, ckpt_out: Path | None = None) -> list[list[str]]:
    model = _Recorder()
    trainer = lightning.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        val_check_interval=2,  # validation batches pass the same hooks; they must not move the training stream
        check_val_every_n_epoch=None,
        limit_val_batches=1,
    )
    trainer.fit(model, datamodule=MathDataModule(tok, size=40, val_size=4, prompts_per_step=3), ckpt_path=ckpt_in)
    if ckpt_out is not None:
        trainer.save_checkpoint(ckpt_out)
    return model.seen


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_checkpoint_resume_continues_after_the_last_trained_batch(tok, tmp_path):
    """Lightning prefetches one batch ahead; the resumed run must neither skip it nor repeat trained ones."""
    uninterrupted = _fit(tok, 5)
    assert [len(ids) for ids in uninterrupted] == [3, 3, 1, 3, 3, 1, 3]  # validation ran after steps 2 and 4
    ckpt = tmp_path / "step3.ckpt"
    before = _fit(tok, 3, ckpt_out=ckpt)
    assert torch.load(ckpt, weights_only=False)["MathDataModule"]["position"] == 9
    assert before + _fit(tok, 5, ckpt_in=ckpt) == uninterrupted


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"source": "csv"}, "data.source"),
        ({"source": "hf"}, "data.name"),
        ({"source": "file"}, "data.path"),
        ({"template": "alpaca"}, "data.template"),
        ({"prompts_per_step": 0}, "data.prompts_per_step"),
        ({"val_size": -1}, "data.val_size"),
        ({"limit": 0}, "data.limit"),
    ],
)
def test_bad_module_config_names_the_key(tok, kwargs, match):
    with pytest.raises(ConfigError, match=re.escape(match)):
        MathDataModule(tok, **kwargs)


def test_setup_errors_name_the_key(tok, tmp_path):
    with pytest.raises(DataError, match="data.val_size"):
        make_dm(tok, size=10, val_size=10)
    with pytest.raises(DataError, match="data.prompts_per_step"):
        make_dm(tok, size=10, val_size=2, prompts_per_step=9)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty dataset"):
        make_dm(tok, source="file", path=str(empty))
    with pytest.raises(RuntimeError, match="setup"):
        MathDataModule(tok).train_dataloader()


def test_unparseable_gold_answer_fails_at_load_naming_the_row(tok, tmp_path):
    rows = dapo_rows()
    rows[2]["reward_model"]["ground_truth"] = "x+"
    path = write_jsonl(tmp_path / "badgold.jsonl", rows)
    fields = {"question_field": DAPO[0], "answer_field": DAPO[1], "val_size": 1, "prompts_per_step": 1}
    with pytest.raises(DataError, match=r"file .*badgold\.jsonl, row 3 .*'x\+'"):
        make_dm(tok, source="file", path=str(path), **fields)
    assert len(make_dm(tok, source="file", path=str(FIXTURE), **fields).train_examples) == 4
