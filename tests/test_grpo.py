"""GRPO objective against hand-computed values (method.md section 4)."""

from __future__ import annotations

import math

import pytest
import torch

from pte.grpo import (
    AGGREGATIONS,
    dapo_weights,
    dr_grpo_weights,
    group_advantages,
    grpo_weights,
    k3_kl,
    token_loss,
    uniform_groups,
)


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
    assert (kl >= 0).all()


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
