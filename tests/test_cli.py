"""The command line of train.py and eval.py: help content, and one ``error:`` line (exit 2) per user mistake."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import eval as eval_cli
import train
from pte.config import as_dict, load_config
from pte.errors import UserError
from pte.training.methods import build_model, export_adapter

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")


def _error(capsys, main, args: list[str]) -> str:
    """Run ``main(args)``, expect exit status 2 and one ``error:`` line ending stderr, no traceback; return it."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    last = err.splitlines()[-1]  # progress bars may precede it on their own lines
    assert last.startswith("error: ") and err.endswith("\n") and "Traceback" not in err and err.count("error:") == 1
    return last


def _train_args(tmp_path: Path, *overrides: str) -> list[str]:
    return ["--config", TINY, f"trainer.out_dir={tmp_path}", "trainer.max_steps=1", *overrides]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _ckpt(tmp_path: Path, method: str = "pte") -> Path:
    """A Lightning-style checkpoint of a tiny ``method`` run: run config + trainable tensors."""
    cfg = load_config(TINY, [f"method={method}"])
    model, _ = build_model(cfg)
    state = {f"model.{n}": p.detach() for n, p in model.named_parameters() if p.requires_grad}
    path = tmp_path / f"{method}.ckpt"
    torch.save({"hyper_parameters": {"run_config": OmegaConf.to_container(as_dict(cfg))}, "state_dict": state}, path)
    return path


@pytest.mark.parametrize("main", [train.main, eval_cli.main])
def test_help_lists_groups_outputs_and_examples(main, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    for text in ("config groups", "cache     policy, window", "outputs go to", "examples:", "docs/method.md"):
        assert text in out, text


def test_eval_help_lists_short_keys(capsys):
    with pytest.raises(SystemExit):
        eval_cli.main(["--help"])
    out = capsys.readouterr().out
    for short in ("ckpt=PATH", "benchmarks=", "n_samples=", "windows=", "policies=", "limit=", "k=", "model="):
        assert short in out, short
    assert "adapter/eval" in out  # where `make eval` writes


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["trainer.max_stepz=3"], "trainer.max_stepz"),  # mistyped key
        (["bogus=1"], "bogus"),  # unknown top-level key
        (["rollout.batch_size=many"], "rollout.batch_size"),  # wrong type
        (["cache.window"], "key=value"),  # not an override
        (["--windows", "4"], "command line: unrecognized arguments: --windows 4"),  # not a flag
    ],
)
def test_train_config_mistakes_are_one_line(args, expected, capsys, tmp_path):
    assert expected in _error(capsys, train.main, _train_args(tmp_path, *args))


def test_missing_config_file(capsys, tmp_path):
    assert "--config: " in _error(capsys, train.main, ["--config", str(tmp_path / "nope.yaml")])
    assert "nope.yaml is not a file" in _error(capsys, eval_cli.main, ["--config", str(tmp_path / "nope.yaml")])


def test_missing_model_path(capsys, tmp_path):
    err = _error(capsys, train.main, _train_args(tmp_path, f"model.name={tmp_path}/no-model"))
    assert "model.name:" in err and "no-model is not a model directory" in err
    assert "model.name:" in _error(capsys, eval_cli.main, ["model=./no/such/model"])


def test_uncached_hub_model_offline_fails_fast(capsys):
    start = time.perf_counter()
    err = _error(capsys, eval_cli.main, ["model=SomeOrg/not-cached-model"])  # conftest sets HF_HUB_OFFLINE=1
    assert "HF_HUB_OFFLINE=1" in err and time.perf_counter() - start < 5


def test_unreachable_hub_fails_fast(capsys, monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    start = time.perf_counter()
    err = _error(capsys, eval_cli.main, ["model=SomeOrg/not-cached-model"])
    assert "cannot be reached" in err and time.perf_counter() - start < 5


def test_missing_dataset(capsys, tmp_path):
    err = _error(capsys, train.main, _train_args(tmp_path, "data.source=file", f"data.path={tmp_path}/none.jsonl"))
    assert "data.path:" in err and "none.jsonl" in err


def test_empty_dataset(capsys, tmp_path):
    empty = _jsonl(tmp_path / "empty.jsonl", [])
    assert "empty dataset" in _error(
        capsys, train.main, _train_args(tmp_path, "data.source=file", f"data.path={empty}")
    )


def test_row_without_answer_names_file_and_row(capsys, tmp_path):
    rows = _jsonl(tmp_path / "rows.jsonl", [{"question": "1+1?", "answer": "2"}, {"question": "2+2?"}])
    err = _error(capsys, train.main, _train_args(tmp_path, "data.source=file", f"data.path={rows}"))
    assert "rows.jsonl" in err and "row 2" in err and "answer" in err


def test_unparseable_gold_names_the_row(capsys, tmp_path):
    rows = _jsonl(tmp_path / "gold.jsonl", [{"question": "1+1?", "answer": "2"}, {"question": "q", "answer": "???"}])
    err = _error(capsys, train.main, _train_args(tmp_path, "data.source=file", f"data.path={rows}"))
    assert "row 2" in err and "'???'" in err and "cannot be parsed" in err


def test_missing_or_empty_benchmark_file(capsys, tmp_path):
    args = ["model=tiny-qwen2", "benchmarks=[math500]", f"eval.out_dir={tmp_path}"]
    missing = _error(capsys, eval_cli.main, [*args, f"eval.paths.math500={tmp_path}/none.jsonl"])
    assert "eval.paths.math500:" in missing and "none.jsonl is not a file" in missing
    empty = _jsonl(tmp_path / "empty.jsonl", [])
    assert "math500 has no problems" in _error(capsys, eval_cli.main, [*args, f"eval.paths.math500={empty}"])


def test_benchmark_row_without_answer_names_file_and_row(capsys, tmp_path):
    rows = _jsonl(tmp_path / "m.jsonl", [{"problem": "1+1?", "answer": "2"}, {"problem": "2+2?"}])
    err = _error(capsys, eval_cli.main, ["model=tiny-qwen2", "benchmarks=[math500]", f"eval.paths.math500={rows}"])
    assert "m.jsonl, row 2" in err and "answer" in err


def test_window_smaller_than_an_eviction_chunk(capsys, tmp_path):
    """A budget that leaves no room for the thought window after the prompt is refused, naming cache.budget."""
    args = ["model=tiny-qwen2", "policies=[window]", "windows=[0]", "cache.budget=3", f"eval.out_dir={tmp_path}"]
    assert "cache.budget=3" in _error(capsys, eval_cli.main, [*args, "benchmarks=[arithmetic]", "limit=2"])


def test_hub_benchmark_offline(capsys):
    err = _error(capsys, eval_cli.main, ["model=tiny-qwen2", "benchmarks=[math500]"])
    assert "eval.benchmarks: math500 cannot be loaded" in err and "eval.paths.math500" in err


def test_unknown_benchmark(capsys):
    assert "eval.benchmarks: unknown ['math5000']" in _error(
        capsys, eval_cli.main, ["model=tiny-qwen2", "benchmarks=[math5000]"]
    )


def test_eval_checkpoint_of_another_method_or_model(capsys, tmp_path):
    cfg = load_config(TINY)
    model, _ = build_model(cfg)
    adapter = export_adapter(model, cfg, tmp_path / "adapter")
    assert "method=pte checkpoint" in _error(capsys, eval_cli.main, [f"ckpt={adapter}", "method=lora"])
    assert "trained on model.name=tiny-qwen2" in _error(capsys, eval_cli.main, [f"ckpt={adapter}", "model=tiny-llama"])


def test_resume_from_checkpoint_of_another_method(capsys, tmp_path):
    ckpt = _ckpt(tmp_path, "pte")
    err = _error(capsys, train.main, _train_args(tmp_path, f"ckpt_path={ckpt}", "method=lora"))
    assert "method=pte checkpoint" in err and not (tmp_path / "tiny").exists()  # refused before the run started


def test_corrupt_checkpoint(capsys, tmp_path):
    ckpt = _ckpt(tmp_path)
    ckpt.write_bytes(ckpt.read_bytes()[:100])  # a write cut short
    assert "cannot be read" in _error(capsys, eval_cli.main, [f"ckpt={ckpt}"])
    assert "cannot be read" in _error(capsys, train.main, _train_args(tmp_path, f"ckpt_path={ckpt}"))


def test_corrupt_adapter_weights(capsys, tmp_path):
    cfg = load_config(TINY)
    adapter = export_adapter(build_model(cfg)[0], cfg, tmp_path / "adapter")
    (adapter / "pte_adapter.safetensors").write_bytes(b"not safetensors")
    err = _error(capsys, eval_cli.main, [f"ckpt={adapter}", "limit=2", f"eval.out_dir={tmp_path / 'out'}"])
    assert "cannot be loaded" in err


def test_debug_env_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("PTE_DEBUG", "1")
    with pytest.raises(UserError, match="trainer.max_stepz"):
        train.main(["--config", TINY, "trainer.max_stepz=3"])
