"""The memory planner: model facts, the API and CLI, and its predictions against exact CPU tensor peaks."""

from __future__ import annotations

import pytest
import torch

from pte.config import load_config
from pte.models.tiny import tiny_model
from pte.plan import Arch, plan
from pte.plan.__main__ import main
from pte.plan.arch import PAPER_ARCHS
from pte.plan.measure import SIZES, check, small_config
from pte.plan.paper import TABLE1, paper_rows
from pte.plan.setup import resolve
from pte.training.methods import add_adapter

TOLERANCE = 0.15  # the acceptance bound; measured ratios are within 1.00 +- 0.04 (docs/scale.md)
PAPER_3B = "configs/qwen2.5_3b.yaml"


def test_paper_models_have_their_published_parameter_counts():
    counts = {name: arch.params() for name, arch in PAPER_ARCHS.items()}
    assert counts == {
        "Qwen/Qwen2.5-3B-Instruct": 3_085_938_688,
        "Qwen/Qwen2.5-7B-Instruct": 7_615_616_512,
        "deepseek-ai/DeepSeek-R1-Distill-Llama-8B": 8_030_261_248,
    }


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("method", ["pte", "lora"])
def test_counts_match_a_built_model(family, method):
    """Base and adapter sizes are exact: the same numbers a built model's parameters add up to."""
    cfg = load_config(None, [f"method={method}", "thought.target_modules=[q_proj,o_proj,down_proj]"])
    model = add_adapter(tiny_model(family, 97), cfg)
    s = resolve(cfg, Arch.from_hf(model.config), 1, 16)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert (s.arch.params(), s.adapter_params()) == (frozen, trainable)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("size", list(SIZES))
def test_predictions_within_15_percent_of_measured_peaks(size, dtype):
    """Rollout and replay of pte and lora: predicted transient bytes against TensorPeak's exact CPU peaks."""
    for method in ("pte", "lora"):
        for c in check(size, small_config(method, dtype), ("rollout", "replay"), prompt_len=16):
            assert abs(c.ratio - 1) <= TOLERANCE, c


def test_eval_reference_and_replay_bounds_within_15_percent():
    """Evaluation (top-p sampling), the full-cache reference, and a replay under every bound (checkpointing, a chunk
    cut into forwards, small LM-head pieces) on the window baseline."""
    knobs = ("replay.checkpointing=true", "replay.max_chunk_tokens=12", "replay.logits_chunk=8")
    checks = check("h128", small_config("lora_c", "float32", extra=knobs), ("eval", "reference", "replay"), 16)
    assert {c.phase for c in checks} == {"eval", "reference", "replay"}
    for c in checks:
        assert abs(c.ratio - 1) <= TOLERANCE, c


def test_plan_of_a_paper_config():
    cfg = load_config(PAPER_3B, ["method=pte"])
    p = plan(cfg, 40, world=8)
    assert p.fits and p.peak == max(ph.total for ph in p.phases) and p.peak_phase.name in {ph.name for ph in p.phases}
    text = str(p)
    assert "peak" in text and "replay" in text and "assumed prompt length P = 512" in text
    # the full cache holds the whole response: more K/V than the bounded cache at every phase that has one
    full = plan(load_config(PAPER_3B, ["method=lora"]), 40, world=8)
    assert full.train_peak > p.train_peak
    assert not plan(cfg, 4, world=8).fits


@pytest.mark.parametrize(
    ("override", "phase"),
    [
        ("replay.micro_batch=2", "replay"),
        ("replay.logits_chunk=512", "replay"),
        ("rollout.decode_batch=16", "rollout"),
        ("eval.max_rows=10", "eval"),
    ],
)
def test_each_bound_lowers_its_phase(override, phase):
    base = plan(load_config(PAPER_3B), 40, world=8)
    bounded = plan(load_config(PAPER_3B, [override]), 40, world=8)
    total = {ph.name: ph.total for ph in base.phases}
    assert {ph.name: ph.total for ph in bounded.phases}[phase] < total[phase]


def test_fsdp_shards_the_base():
    ddp = plan(load_config(PAPER_3B), 40, world=8)
    sharded = ["trainer.strategy=fsdp", "trainer.precision=bf16-true", "replay.max_chunk_tokens=0"]
    fsdp = plan(load_config(PAPER_3B, sharded), 40, world=8)
    weights = [sum(v for k, v in p.phases[0].persistent.items() if k.startswith("base")) for p in (ddp, fsdp)]
    assert weights[1] * 8 == pytest.approx(weights[0], rel=1e-6)


def test_reference_phase_only_with_a_kl_term():
    names = [ph.name for ph in plan(load_config(PAPER_3B, ["grpo.beta=0.01"]), 40, world=8).phases]
    assert names == ["rollout", "reference", "replay", "optimizer", "eval"]


def test_paper_rows_cover_table_1():
    rows = paper_rows(40, 8, 512, [])
    assert [(r["config"], r["method"], r["paper"]) for r in rows] == [
        (c, m, v) for c, methods in TABLE1.items() for m, v in methods.items()
    ]
    assert all(r["plan"] > 0 and r["eval"] > 0 for r in rows)


def test_cli(capsys):
    main(["--config", PAPER_3B, "--gpus", "8", "--gpu-mem", "80", "replay.micro_batch=2"])
    out = capsys.readouterr().out
    assert "memory plan for configs/qwen2.5_3b.yaml" in out and "of 80 GiB" in out
    with pytest.raises(SystemExit) as err:
        main(["--config", PAPER_3B, "no_such_key=1"])
    assert err.value.code == 2


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
