"""The chunked policy update: activation memory flat in response length, gradients equal to the full pass."""

from __future__ import annotations

import math

import pytest
import torch

from pte.config import load_config
from pte.engine.cache import CachePolicy
from pte.engine.update import build_experience, generate_rollouts, policy_update
from pte.training.precision import cast_base
from pte.training.prompts import config_prompt
from tests.helpers import PROMPTS, run, tiny_pte

CFG = load_config("configs/tiny.yaml", ["rollout.group_size=3", "rollout.batch_size=3", "rollout.micro_batch=3"])


def peak_saved_bytes(model, ro) -> int:
    """Largest total of tensors saved for backward at any chunk's backward (the activation memory)."""
    live = {"bytes": 0, "peak": 0}

    def pack(t: torch.Tensor) -> torch.Tensor:
        live["bytes"] += t.numel() * t.element_size()
        return t

    def backward(loss: torch.Tensor) -> None:
        live["peak"] = max(live["peak"], live["bytes"])
        loss.backward()
        live["bytes"] = 0

    exp = build_experience(model, [ro], torch.tensor([1.0, 0.0, 0.5]), CFG)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        policy_update(model, exp, CFG, backward)
    return live["peak"]


@pytest.mark.parametrize("kind", ["pte", "global_only"])
def test_activation_memory_flat_in_response_length(kind):
    """``global_only`` with a window no response fills: the update is trained, nothing is ever evicted."""
    model, tok = tiny_pte()
    policy = CachePolicy(kind, window=16 if kind == "pte" else 1024, evict_ratio=0.25)
    short = peak_saved_bytes(model, run(model, tok, PROMPTS, policy, 64))
    long = peak_saved_bytes(model, run(model, tok, PROMPTS, policy, 256))
    if kind == "pte":
        assert long <= 1.2 * short, f"bounded replay grew {long / short:.2f}x for 4x the response"
    else:
        assert long > 2 * short, "the measurement must see growth when nothing is evicted"


def test_chunked_gradient_equals_unchunked_sum():
    """Backward per chunk accumulates the same gradient as one backward of the summed chunk losses."""
    model, tok = tiny_pte()
    ro = run(model, tok, PROMPTS, CachePolicy("pte", window=8), 30, temperature=1.0)
    exp = build_experience(model, [ro], torch.tensor([1.0, 0.0, 0.5]), CFG)
    params = [p for p in model.parameters() if p.requires_grad]
    policy_update(model, exp, CFG, lambda loss: loss.backward())
    chunked = [p.grad.clone() for p in params]
    model.zero_grad()
    losses = []
    policy_update(model, exp, CFG, losses.append)
    torch.autograd.backward(losses)
    for a, p in zip(chunked, params):
        torch.testing.assert_close(a, p.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rollout_replay_gap(dtype):
    """|replay - rollout| log-prob over response tokens: float32 rounding in float32; in bf16 (a bf16 base under
    float32 adapters) the one-token decode and the chunk's parallel forward round differently."""
    model, tok = tiny_pte()
    cast_base(model, dtype)
    ro = run(model, tok, PROMPTS, CachePolicy("pte", window=8), 30, temperature=1.0)
    exp = build_experience(model, [ro], torch.tensor([1.0, 0.0, 0.5]), CFG)
    stats = policy_update(model, exp, CFG, lambda loss: loss.backward())
    gap_max, gap_mean = stats["logp_gap_max"], stats["logp_gap_sum"] / stats["tokens"]
    assert math.isfinite(gap_max) and math.isfinite(gap_mean)
    if dtype == torch.float32:
        assert gap_max < 1e-4
    else:
        assert 0 < gap_mean <= gap_max < 0.5


def test_decode_batch_changes_no_token_and_replay_still_matches():
    """Eight rows (two groups of four, prompts of 21 and 42 tokens) decoded in blocks of four or all at once: same
    seed, same tokens and log-probs, though each block pads its prompts to its own longest; the update's replay of
    the one 8-row rollout, in its own micro-batches of four, reproduces the rollout's log-probs."""
    model, tok = tiny_pte()
    over = ["rollout.batch_size=8", "rollout.group_size=4", "rollout.micro_batch=4", "cache.window=8"]
    prompts = [config_prompt(tok, CFG.data, q) for q in ("Hi", "What is 12 + 30? Think.") for _ in range(4)]
    outs = {}
    for rows in (4, 0):
        cfg = load_config("configs/tiny.yaml", [*over, f"rollout.decode_batch={rows}", "rollout.max_new_tokens=30"])
        outs[rows] = generate_rollouts(model, tok, prompts, cfg, "pte", torch.Generator().manual_seed(5))
    blocks, (whole,) = outs[4], outs[0]
    assert len(blocks) == 2 and blocks[0].prompt_ids.shape[1] < whole.prompt_ids.shape[1]
    assert len(whole.evict_before) >= 3
    t = whole.response_ids.shape[1]
    pad = [torch.nn.functional.pad(x, (0, t - x.shape[1])) for x in (blocks[0].response_ids, blocks[1].response_ids)]
    assert torch.equal(torch.cat(pad), whole.response_ids)
    logp = [torch.nn.functional.pad(x, (0, t - x.shape[1])) for x in (blocks[0].logprobs, blocks[1].logprobs)]
    torch.testing.assert_close(torch.cat(logp), whole.logprobs, atol=1e-5, rtol=0)
    exp = build_experience(model, [whole], torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 0.0, 0.5]), cfg)
    widths = []
    stats = policy_update(model, exp, cfg, lambda loss: widths.append(1) or loss.backward())
    assert stats["logp_gap_max"] < 1e-4 and len(widths) == 2 * (len(whole.evict_before) + 1)


def _update(model, exp, *overrides: str) -> tuple[dict, list[torch.Tensor | None], int]:
    """policy_update from zeroed gradients: its stats, every trainable parameter's gradient, the backward count."""
    cfg = load_config("configs/tiny.yaml", [*SIX, *overrides])
    model.zero_grad(set_to_none=True)
    calls: list[None] = []
    stats = policy_update(model, exp, cfg, lambda loss: calls.append(loss.backward()))
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters() if p.requires_grad]
    return stats, grads, len(calls)


SIX = ["rollout.group_size=3", "rollout.batch_size=6", "rollout.micro_batch=2", "grpo.beta=0"]


@pytest.mark.parametrize("agg", ["dapo", "grpo"])
def test_skipping_zero_loss_rows_keeps_the_loss_and_gradient(agg):
    """Two groups of three in blocks of two: the first group's rewards agree, so with ``replay.skip_zero_loss`` only
    the second group is replayed (fewer backwards), with the loss and gradient of replaying all six rows."""
    model, tok = tiny_pte()
    cfg = load_config("configs/tiny.yaml", [*SIX, f"grpo.loss_agg={agg}"])
    ro = run(model, tok, PROMPTS[1:] * 3, CachePolicy("pte", window=8), 30, temperature=1.0, seed=3)
    assert len(ro.evict_before) >= 3 and bool(ro.response_mask[3:].any(1).all())
    rewards = torch.tensor([0.5, 0.5, 0.5, 1.0, 0.0, 0.25])
    exp = build_experience(model, [ro], rewards, cfg)
    moved = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the policy moved since sampling: ratios off 1, so the loss is not float noise around 0
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=moved))
    full, full_grads, full_calls = _update(model, exp, "replay.skip_zero_loss=false", f"grpo.loss_agg={agg}")
    skip, skip_grads, skip_calls = _update(model, exp, "replay.skip_zero_loss=true", f"grpo.loss_agg={agg}")
    assert (full["rows"], full["replayed_rows"], skip["rows"], skip["replayed_rows"]) == (6, 6, 6, 3)
    assert skip_calls < full_calls
    assert abs(full["loss"]) > 1e-4 and skip["loss"] == pytest.approx(full["loss"], rel=1e-6, abs=1e-9)
    for a, b in zip(full_grads, skip_grads, strict=True):
        assert b is not None
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
    assert any(g.abs().sum() > 0 for g in skip_grads)
    with_kl = [f"grpo.loss_agg={agg}", "grpo.beta=0.1"]
    exp = build_experience(model, [ro], rewards, load_config("configs/tiny.yaml", [*SIX, *with_kl]))
    kl, *_ = _update(model, exp, "replay.skip_zero_loss=true", *with_kl)
    assert kl["replayed_rows"] == 6, "with a KL term every weighted row has a loss"


def test_nothing_to_replay_still_gives_every_parameter_a_zero_gradient():
    """Every group agrees: no chunk is replayed, and each trainable parameter gets the exact zero gradient the full
    replay gives it (not None), so AdamW still takes its momentum step as it would have."""
    model, tok = tiny_pte()
    cfg = load_config("configs/tiny.yaml", SIX)
    ro = run(model, tok, PROMPTS[1:] * 3, CachePolicy("pte", window=8), 30, temperature=1.0, seed=3)
    exp = build_experience(model, [ro], torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]), cfg)
    full, full_grads, full_calls = _update(model, exp, "replay.skip_zero_loss=false")
    skip, skip_grads, skip_calls = _update(model, exp, "replay.skip_zero_loss=true")
    assert full_calls > 0 and skip_calls == 0 and skip["replayed_rows"] == 0 and skip["loss"] == full["loss"] == 0
    for a, b in zip(full_grads, skip_grads, strict=True):
        assert a is not None and b is not None and torch.equal(a, b) and not b.any()
