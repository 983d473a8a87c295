"""The precision rule (pte/training/precision.py) on CPU in bf16: a low-precision frozen base, float32 adapters,
thought state, log-probs and optimiser state, for ``trainer.precision`` bf16-true and bf16-mixed, through rollout,
replay, one policy update, evaluation, train.py and every benchmark."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import eval as eval_cli
import pte.evaluation.evaluate
import pte.training.callbacks
import pte.training.module
import train
from pte.bench import common, decode, flops, rollout_memory, step_time, train_memory
from pte.bench.__main__ import BENCHMARKS
from pte.bench.__main__ import main as bench_main
from pte.config import load_config
from pte.engine.cache import CachePolicy
from pte.engine.encoder import get_thought
from pte.engine.replay import full_replay
from pte.engine.update import build_experience, generate_rollouts, policy_update
from pte.models.load import load_model_and_tokenizer
from pte.training.methods import build_model, export_adapter
from pte.training.precision import HALF, cast_base
from tests import digit_train
from tests.helpers import PROMPTS, run, tiny_pte

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")
# Replay against rollout log-probs in bf16, measured on the tiny models (both families, 6 seeds, windows 4 and 8,
# 40 tokens): largest gap 5.1e-3, largest mean 6.2e-4 (fp16: 4.4e-4 largest; float32: 1e-6). The same kernels run on
# one token (rollout) and on a whole chunk (replay), which rounds differently; exp(0.02) is far inside GRPO's clip.
BF16_MAX_GAP, BF16_MEAN_GAP = 2e-2, 2e-3


def _dtypes(model: torch.nn.Module) -> tuple[frozenset[torch.dtype], frozenset[torch.dtype]]:
    """(dtypes of the frozen floating-point parameters, dtypes of the trainable ones)."""
    frozen = frozenset(p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point())
    return frozen, frozenset(p.dtype for p in model.parameters() if p.requires_grad)


def _recording(real, seen: list, what=_dtypes):
    """``real`` (called with the model first), appending ``what(model)`` to ``seen`` at each call."""

    def wrapped(model, *args, **kwargs):
        seen.append(what(model))
        return real(model, *args, **kwargs)

    return wrapped


def _low_precision(model: torch.nn.Module, mode: str) -> contextlib.AbstractContextManager:
    """Put ``model`` in ``trainer.precision`` ``mode`` as train.py's Trainer would; return the context of its steps."""
    if mode in HALF:
        cast_base(model, HALF[mode])
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("method", ["pte", "lora"])
def test_cast_base_casts_only_the_frozen_base(method):
    model, _ = build_model(load_config(TINY, [f"method={method}"]))
    rotary = model.get_base_model().model.rotary_emb if method == "lora" else model.model.rotary_emb
    cast_base(model, torch.bfloat16)
    assert _dtypes(model) == ({torch.bfloat16}, {torch.float32})
    assert rotary.inv_freq.dtype == torch.float32  # buffers as from_pretrained(dtype=bf16) leaves them


def test_low_precision_load_keeps_buffers_float32():
    model, _ = load_model_and_tokenizer("tiny-llama", "bfloat16")
    assert _dtypes(model) == ({torch.bfloat16}, set()) and model.model.rotary_emb.inv_freq.dtype == torch.float32


def test_whole_model_cast_still_runs():
    """``model.to(bfloat16)`` (adapters too) is outside the rule but must not crash: the state is built in fp32."""
    model, tok = tiny_pte()
    model.to(torch.bfloat16)
    ro = run(model, tok, PROMPTS, CachePolicy("pte", window=8), 24, temperature=1.0)
    assert ro.evict_before and torch.isfinite(full_replay(model, ro)[ro.response_mask]).all()
    assert {s.dtype for s in get_thought(model).store.states} == {torch.float32}


def test_thought_state_ignores_autocast():
    """Under a bf16-mixed step's autocast, S_g and every update are the float32 ones, bit for bit."""
    model, _ = tiny_pte()
    enc = get_thought(model)
    keys, values = torch.randn(2, 5, 32), torch.randn(2, 5, 32)  # [B, m, H_kv*D] of the tiny model

    def states() -> tuple[torch.Tensor, torch.Tensor]:
        s0 = enc.layers[0].initial_state(enc._proj[0], 2)
        return s0, enc.layers[0].update(s0, enc._proj[0][0], keys, values)

    reference = states()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = states()
    for a, b in zip(reference, mixed):
        assert b.dtype == torch.float32 and torch.equal(a, b)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("mode", ["bf16-true", "bf16-mixed", "16-true"])
def test_low_precision_replay_matches_rollout(mode, family):
    model, tok = tiny_pte(family)
    with _low_precision(model, mode):
        ro = run(model, tok, PROMPTS, CachePolicy("pte", window=8), 40, temperature=1.0)
        replayed = full_replay(model, ro)
    assert len(ro.evict_before) > 3
    assert ro.logprobs.dtype == replayed.dtype == torch.float32
    gap = (replayed - ro.logprobs)[ro.response_mask].abs()
    assert gap.max() < BF16_MAX_GAP and gap.mean() < BF16_MEAN_GAP
    assert {s.dtype for s in get_thought(model).store.states} == {torch.float32}


@pytest.mark.parametrize("state_grad", ["detach", "chain"])
@pytest.mark.parametrize("mode", ["bf16-true", "bf16-mixed"])
def test_bf16_policy_update(mode, state_grad):
    """One GRPO step: finite loss, float32 gradients on every adapter parameter, float32 AdamW state, base intact."""
    cfg = load_config(TINY, ["rollout.max_new_tokens=16", "cache.window=6", f"thought.state_grad={state_grad}"])
    model, tok = build_model(cfg)
    gen = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if name.endswith("lr_a"):  # A = 0 at init would leave every other adapter gradient zero
            p.data = torch.randn(p.shape, generator=gen) * 0.5
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    with _low_precision(model, mode):
        base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        rollouts = generate_rollouts(model, tok, PROMPTS[:2] * 2, cfg, "pte", gen)
        exp = build_experience(model, rollouts, torch.tensor([1.0, 0.0, 0.0, 1.0]), cfg)
        stats = policy_update(model, exp, cfg, lambda loss: loss.backward())
    opt.step()
    assert any(ro.evict_before for ro in rollouts) and torch.isfinite(torch.tensor(stats["loss"]))
    assert all(p.dtype == p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in params)
    assert all(p.grad.abs().sum() > 0 for p in params)
    assert {s["exp_avg"].dtype for s in opt.state.values()} == {torch.float32} and len(opt.state) == len(params)
    frozen = dict(model.named_parameters())
    assert all(frozen[n].grad is None and torch.equal(frozen[n], p) for n, p in base.items())
    assert _dtypes(model) == ({torch.bfloat16 if mode == "bf16-true" else torch.float32}, {torch.float32})
    assert {s.dtype for s in get_thought(model).store.states} == {torch.float32}


def test_eval_in_bf16(tmp_path, monkeypatch):
    """eval.py runs in ``model.dtype``: a float32 PTE adapter on a bf16 base, generating and grading."""
    cfg = load_config(TINY, ["method=pte"])
    adapter = export_adapter(build_model(cfg)[0], cfg, tmp_path / "adapter")
    seen = []
    monkeypatch.setattr(pte.evaluation.evaluate, "rollout", _recording(pte.evaluation.evaluate.rollout, seen))
    fixture = ROOT / "tests" / "fixtures" / "eval" / "math500.jsonl"
    args = [
        f"ckpt={adapter}",
        "model.dtype=bfloat16",
        "policies=[pte]",
        "windows=[4]",
        "limit=2",
        "benchmarks=[math500]",
    ]
    args += [f"eval.paths.math500={fixture}", "eval.max_new_tokens=10", f"eval.out_dir={tmp_path / 'eval'}"]
    results = eval_cli.main(args)
    assert seen and all(s == ({torch.bfloat16}, {torch.float32}) for s in seen)
    assert results["settings"][0]["benchmarks"]["math500"]["problems"] == 2


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed", "16-true"])
def test_train_in_low_precision(precision, tmp_path, monkeypatch):
    """train.py with ``trainer.precision``: rollouts, replay and the val evaluation under that precision; the
    checkpointed adapter and AdamW state float32."""
    monkeypatch.setattr(pte.training.module, "build_reward", digit_train.digit_reward)
    seen: dict[str, list] = {"step": [], "val": []}

    def context(model: torch.nn.Module) -> tuple:
        return _dtypes(model), torch.is_autocast_enabled("cpu"), torch.get_default_dtype()

    module, callbacks = pte.training.module, pte.training.callbacks
    for name in ("generate_rollouts", "policy_update"):
        monkeypatch.setattr(module, name, _recording(getattr(module, name), seen["step"], context))
    monkeypatch.setattr(callbacks, "sample_batch", _recording(callbacks.sample_batch, seen["val"], context))
    overrides = ["trainer.max_steps=1", "trainer.val_every=1", "trainer.val_limit=2", "rollout.max_new_tokens=12"]
    train.main(
        [
            "--config",
            TINY,
            f"trainer.out_dir={tmp_path}",
            "trainer.run_name=run",
            *overrides,
            f"trainer.precision={precision}",
        ]
    )
    mixed = precision == "bf16-mixed"
    base = torch.float32 if mixed else {"bf16-true": torch.bfloat16, "16-true": torch.float16}[precision]
    expected = (({base}, {torch.float32}), mixed, torch.float32)
    assert seen["step"] and seen["val"] and all(s == expected for s in seen["step"] + seen["val"])
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["state_dict"] and {v.dtype for v in ckpt["state_dict"].values()} == {torch.float32}
    states = ckpt["optimizer_states"][0]["state"].values()
    assert states and {s[k].dtype for s in states for k in ("exp_avg", "exp_avg_sq")} == {torch.float32}
    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    assert {"val/accuracy", "train/loss"} <= set(acc.Tags()["scalars"])


BENCH_SPIES = {  # benchmark -> (module, the engine entry its timed work calls with the model)
    "decode": (decode, "rollout"),
    "rollout-memory": (rollout_memory, "rollout"),
    "train-memory": (train_memory, "replay"),
    "flops": (flops, "rollout"),
    "step-time": (step_time, "generate_rollouts"),
}
BENCH_ARGS = {  # each benchmark at its tiniest, in bf16
    "decode": [
        "--lengths",
        "8",
        "--batch",
        "2",
        "--repeats",
        "1",
        "--warmup",
        "4",
        "--window",
        "4",
        "--prompt-len",
        "6",
    ]
    + ["--methods", "generate", "window", "pte", "--dtype", "bfloat16"],
    "rollout-memory": ["--lengths", "12", "--batch", "2", "--window", "4", "--prompt-len", "6", "--dtype", "bfloat16"]
    + ["--policies", "window", "pte"],
    "train-memory": ["--lengths", "16", "--window", "4", "--prompt-len", "6", "--dtype", "bfloat16"],
    "flops": ["--lengths", "12", "--window", "4", "--prompt-len", "6", "--dtype", "bfloat16"],
    "step-time": [
        "--methods",
        "pte",
        "lora_c",
        "--steps",
        "1",
        "rollout.batch_size=2",
        "rollout.group_size=2",
        "rollout.micro_batch=2",
    ]
    + ["rollout.max_new_tokens=8", "cache.window=4", "model.dtype=bfloat16", "reward.workers=1"],
}


@pytest.mark.parametrize("name", list(BENCH_SPIES))
def test_benchmark_runs_in_bf16(name, tmp_path, monkeypatch):
    """Each benchmark at the tiniest size with bf16 weights: the base in bf16, any adapter in float32."""
    module, entry = BENCH_SPIES[name]
    seen = []
    monkeypatch.setattr(module, entry, _recording(getattr(module, entry), seen))
    monkeypatch.setattr(common, "in_child", lambda bench, setting: BENCHMARKS[bench].child(setting))  # no processes
    out = tmp_path / "result.json"
    bench_main([name, "--model", "tiny-llama", *BENCH_ARGS[name], "--json", str(out)])
    assert json.loads(out.read_text())["rows"]
    assert seen and all(frozen == {torch.bfloat16} and trainable <= {torch.float32} for frozen, trainable in seen)
    assert any(trainable == {torch.float32} for _, trainable in seen)  # an adapter was timed
