"""scripts/gpu_smoke.py at toy width on a CPU: the path `make gpu-smoke` runs on a lent GPU (build a local model,
two training steps through train.main, one evaluation through eval.main, memory figures and the planner's) must not
fail there for a reason a CPU can catch."""

from __future__ import annotations

import json

import pytest

from pte.config import load_config
from pte.plan import Arch, plan
from scripts import gpu_smoke

# The paper-width smoke model as the planner sees it (its config.json is only written on the GPU machine).
SMOKE_ARCH = Arch.from_hf(gpu_smoke.llama_config(gpu_smoke.PAPER_WIDTH))


def test_gpu_smoke_runs_at_tiny_size(tmp_path):
    result = gpu_smoke.main(["--tiny", "--out", str(tmp_path), "replay.micro_batch=4"])
    saved = json.loads((tmp_path / "smoke.json").read_text())
    assert saved["model"]["num_hidden_layers"] == 2 and saved["model"]["dtype"] == "bfloat16"
    assert saved["train"]["metrics"]["train/evictions_per_seq"] > 0  # the tiny window still evicts
    assert saved["train"]["memory"]["peak_rss_process_mib"] > 0 and saved["eval"]["memory"]
    assert saved["planner"]["prompt_len"] > 0 and saved["planner"]["phases_mib"]["eval"] > 0
    assert (tmp_path / "eval" / "results.json").is_file()
    assert "  micro_batch: 4\n  max_chunk_tokens: 8" in (tmp_path / "train" / "config.yaml").read_text()  # extra
    assert set(result) >= {"device", "train", "eval", "planner", "measured_over_planned"}


@pytest.mark.parametrize("method", ["pte", "lora_c", "lora"])
def test_gpu_settings_load_and_fit_one_device(tmp_path, method):
    """The full-size run's config is valid (the tiny run overrides its sizes, so it cannot catch this) and the planner
    puts it well inside a 40 GiB device: the smoke needs no particular GPU."""
    cfg = load_config(gpu_smoke.CONFIG, gpu_smoke.smoke_overrides(tmp_path, method, tmp_path, tiny=False, extra=[]))
    assert cfg.trainer.world_size == 1 and cfg.rollout.batch_size == cfg.rollout.micro_batch
    assert cfg.model.dtype == "bfloat16" and cfg.rollout.max_new_tokens == cfg.eval.max_new_tokens == 3072
    assert plan(cfg, gpu_mem_gb=40, arch=SMOKE_ARCH).fits


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_smoke_runs_at_full_size(tmp_path):
    """What `make gpu-smoke` runs (paper settings, 2-layer paper-width model, bf16), on the test machine's GPU."""
    result = gpu_smoke.main(["--out", str(tmp_path)])
    saved = json.loads((tmp_path / "smoke.json").read_text())
    assert saved["model"]["dtype"] == "bfloat16" and saved["train"]["metrics"]["train/evictions_per_seq"] > 0
    assert (tmp_path / "eval" / "results.json").is_file() and result["device"]
