"""benchmarks/gpu_smoke.py at toy width on a CPU: the path `make gpu-smoke` runs on a lent GPU (build a local model,
two training steps through train.main, one evaluation through eval.main, memory figures and the planner's) must not
fail there for a reason a CPU can catch."""

from __future__ import annotations

import json

from benchmarks import gpu_smoke


def test_gpu_smoke_runs_at_tiny_size(tmp_path):
    result = gpu_smoke.main(["--tiny", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "smoke.json").read_text())
    assert saved["model"]["num_hidden_layers"] == 2 and saved["model"]["dtype"] == "bfloat16"
    assert saved["train"]["metrics"]["train/evictions_per_seq"] > 0  # the tiny window still evicts
    assert saved["train"]["memory"]["peak_rss_process_mib"] > 0 and saved["eval"]["memory"]
    assert (tmp_path / "train" / "adapter").is_dir() and (tmp_path / "eval" / "results.json").is_file()
    assert set(result) >= {"device", "train", "eval", "planner"}


def test_gpu_smoke_overrides_reach_the_run(tmp_path):
    """Extra key=value overrides (e.g. a method or replay setting to try on the GPU) go to both training and eval."""
    gpu_smoke.main(["--tiny", "--method", "lora_c", "--out", str(tmp_path), "replay.micro_batch=4"])
    saved = (tmp_path / "train" / "config.yaml").read_text()
    assert "method: lora_c" in saved and "  micro_batch: 4\n  max_chunk_tokens: 8" in saved
