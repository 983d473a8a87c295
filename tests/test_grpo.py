"""GRPO objective against hand-computed values (docs/method.md section 4)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import pte.engine.update
import pte.training.sft
from pte.config import load_config
from pte.engine.replay import ReplayChunk
from pte.engine.update import Experience, policy_update
from pte.training.grpo import (
    AGGREGATIONS,
    dapo_weights,
    dr_grpo_weights,
    group_advantages,
    grpo_weights,
    k3_kl,
    token_loss,
    uniform_groups,
)
from pte.training.sft import sft_update

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")


def test_group_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    adv = group_advantages(rewards, group_size=3, std_norm=True, eps=0.0)
    # group 1: mean 1/3, unbiased std sqrt(1/3) -> (2/3)/0.57735 = 1.1547, (-1/3)/0.57735 = -0.57735
    torch.testing.assert_close(adv[:3], torch.tensor([1.1547005, -0.5773503, -0.5773503]))
    torch.testing.assert_close(adv[3:], torch.zeros(3))  # agreeing group: no signal
    raw = group_advantages(rewards, group_size=3, std_norm=False)
    torch.testing.assert_close(raw[:3], torch.tensor([2 / 3, -1 / 3, -1 / 3]))
    assert uniform_groups(rewards, 3) == 1


def test_k3_kl_hand_computed_and_nonzero_gradient():
    logp = torch.tensor([-1.0, -2.0], requires_grad=True)
    ref = torch.tensor([-1.5, -2.0])
    kl = k3_kl(logp, ref)
    d = -0.5
    torch.testing.assert_close(kl.detach(), torch.tensor([math.exp(d) - d - 1, 0.0]))
    kl.sum().backward()
    # d/dlogp [exp(ref - logp) - (ref - logp) - 1] = 1 - exp(ref - logp)
    torch.testing.assert_close(logp.grad, torch.tensor([1 - math.exp(d), 0.0]))


def test_token_loss_clipping_hand_computed():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    loss, clipped = token_loss(logp, old, torch.tensor([1.0]), clip_low=0.2, clip_high=0.28)
    # A > 0: -min(r, clip(r)) -> -1.28 (clipped), -0.5, -1.1
    torch.testing.assert_close(loss, torch.tensor([[-1.28, -0.5, -1.1]]))
    assert clipped.tolist() == [[True, False, False]]
    loss, clipped = token_loss(logp, old, torch.tensor([-2.0]), clip_low=0.2, clip_high=0.28)
    # A < 0: -min(-2r, -2 clip(r)) = 2 max(r, clip(r)) -> 3.0, 1.6 (clipped at 0.8), 2.2
    torch.testing.assert_close(loss, torch.tensor([[3.0, 1.6, 2.2]]))
    assert clipped.tolist() == [[False, True, False]]


def test_token_loss_adds_beta_k3():
    logp, old, ref = torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([[-1.0, 0.0]])
    loss, _ = token_loss(logp, old, torch.tensor([0.0]), 0.2, 0.2, ref_logp=ref, beta=0.5)
    torch.testing.assert_close(loss, 0.5 * torch.tensor([[math.exp(-1) + 1 - 1, 0.0]]))


def test_aggregation_weights_hand_computed():
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    torch.testing.assert_close(grpo_weights(mask, 4), torch.tensor([[1 / 8] * 4, [1 / 4, 1 / 4, 0, 0]]))
    torch.testing.assert_close(dapo_weights(mask, 4), mask.float() / 6)
    torch.testing.assert_close(dr_grpo_weights(mask, 8), mask.float() / 16)
    assert set(AGGREGATIONS) == {"grpo", "dapo", "dr_grpo"}


@pytest.mark.parametrize("agg", sorted(AGGREGATIONS))
def test_chunked_loss_sums_to_full_loss(agg):
    """Per-chunk weighted sums add up to the batch loss: chunk-wise backward is exact."""
    torch.manual_seed(0)
    logp, old = torch.randn(3, 10), torch.randn(3, 10)
    mask = torch.rand(3, 10) > 0.3
    w = AGGREGATIONS[agg](mask, 10)
    loss, _ = token_loss(logp, old, torch.randn(3), 0.2, 0.28)
    full = (loss * w).sum()
    chunks = sum((loss[:, a:b] * w[:, a:b]).sum() for a, b in [(0, 4), (4, 7), (7, 10)])
    torch.testing.assert_close(chunks, full)


def test_masked_positions_never_make_the_loss_or_gradient_nan():
    """Pad positions after EOS with huge log-prob gaps (exp overflows) and zero weight change nothing."""
    logp = torch.tensor([[-1.0, -2.0, 0.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.1, -2.0, -500.0, 300.0]])  # gaps 500 and -300 at the pads
    ref = torch.tensor([[-1.2, -1.9, 400.0, -400.0]])
    mask = torch.tensor([[True, True, False, False]])
    w = mask.float() / 2
    loss_tok, _ = token_loss(logp, old, torch.tensor([1.0]), 0.2, 0.2, ref, beta=0.1, mask=mask)
    loss = (loss_tok * w).sum()
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert (loss_tok[~mask] == 0).all() and (logp.grad[~mask] == 0).all()
    real, _ = token_loss(logp[:, :2], old[:, :2], torch.tensor([1.0]), 0.2, 0.2, ref[:, :2], beta=0.1)
    torch.testing.assert_close(loss, (real * w[:, :2]).sum())
    assert torch.isfinite(k3_kl(logp.detach(), ref, mask)).all()


# --- garbage at masked positions (bf16 padding): finite loss, exactly zero gradient there -------------------------

GARBAGE = [1e4, -1e4, math.inf, -math.inf, math.nan]  # what a pad position's log-prob may hold


def _garbage_batch() -> tuple[torch.Tensor, ...]:
    """Two real tokens then one masked position per garbage value, in every input: ``(logp leaf, old, ref, mask)``."""
    real = torch.tensor([-1.0, -2.0])
    logp = torch.cat([real, torch.tensor(GARBAGE)])[None].requires_grad_()
    old = torch.cat([real - 0.1, torch.tensor(GARBAGE[::-1])])[None]
    ref = torch.cat([real - 0.2, torch.tensor(GARBAGE[1:] + GARBAGE[:1])])[None]
    mask = torch.arange(logp.shape[1])[None] < 2
    return logp, old, ref, mask


def _assert_clean(loss: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor) -> None:
    assert torch.isfinite(loss).all() and torch.isfinite(logp.grad).all()
    assert (logp.grad[~mask] == 0).all() and (logp.grad[mask] != 0).all()


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_token_loss_ignores_garbage_at_masked_positions(beta):
    logp, old, ref, mask = _garbage_batch()
    loss_tok, clipped = token_loss(logp, old, torch.tensor([1.5]), 0.2, 0.28, ref, beta, mask)
    (loss_tok * mask / 2).sum().backward()
    _assert_clean(loss_tok, logp, mask)
    assert (loss_tok[~mask] == 0).all() and not clipped[~mask].any()
    clean, _ = token_loss(logp[:, :2], old[:, :2], torch.tensor([1.5]), 0.2, 0.28, ref[:, :2], beta)
    torch.testing.assert_close(loss_tok[:, :2], clean)


def test_k3_kl_ignores_garbage_at_masked_positions():
    logp, _, ref, mask = _garbage_batch()
    kl = k3_kl(logp, ref, mask)
    kl.sum().backward()
    _assert_clean(kl, logp, mask)
    assert (kl[~mask] == 0).all()


def _chunk_stream(logp: torch.Tensor, entropy: torch.Tensor):
    """A stand-in for pte.engine.replay.replay_all: the whole response as one chunk of rollout 0."""

    def replay_all(model, rollouts, backward, *limits):
        yield 0, ReplayChunk(start=0, logprobs=logp, entropy=entropy)

    return replay_all


def _backward_into(losses: list):
    def backward(loss: torch.Tensor) -> None:
        losses.append(loss.detach())
        loss.backward()

    return backward


@pytest.mark.parametrize("agg", sorted(AGGREGATIONS))
def test_policy_update_stays_finite_with_garbage_at_masked_positions(monkeypatch, agg):
    """The loss, the KL and entropy statistics and the gradient, through pte.engine.update.policy_update."""
    logp, old, ref, mask = _garbage_batch()
    entropy = torch.cat([torch.tensor([0.5, 0.25]), torch.tensor(GARBAGE)])[None]
    monkeypatch.setattr(pte.engine.update, "replay_all", _chunk_stream(logp, entropy))
    cfg = load_config(TINY, ["grpo.beta=0.1", f"grpo.loss_agg={agg}"])
    ro = SimpleNamespace(logprobs=old, response_mask=mask)
    exp = Experience([ro], [torch.tensor([1.5])], [AGGREGATIONS[agg](mask, mask.shape[1])], [ref])
    losses: list[torch.Tensor] = []
    stats = policy_update(None, exp, cfg, _backward_into(losses))
    _assert_clean(torch.stack(losses), logp, mask)
    assert all(math.isfinite(v) for v in stats.values()), stats
    assert stats["entropy"] == 0.75 and stats["tokens"] == 2


def test_sft_update_stays_finite_with_garbage_at_masked_positions(monkeypatch):
    logp, _, _, mask = _garbage_batch()
    entropy = torch.cat([torch.tensor([0.5, 0.25]), torch.tensor(GARBAGE)])[None]
    monkeypatch.setattr(pte.training.sft, "replay_all", _chunk_stream(logp, entropy))
    ro = SimpleNamespace(response_ids=torch.zeros(mask.shape, dtype=torch.long), response_mask=mask)
    losses: list[torch.Tensor] = []
    stats = sft_update(None, [ro], _backward_into(losses))
    _assert_clean(torch.stack(losses), logp, mask)
    assert stats == {"loss": 3.0, "tokens": 2.0, "entropy": 0.75}
