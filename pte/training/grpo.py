"""Cache-aware GRPO objective (docs/method.md section 4), as pure tensor functions.

Notation: N sequences (prompts x group size n), T response tokens. Every loss is written as a weighted
sum of per-token terms, L = sum_{i,t} w_{i,t} l_{i,t}, so that the sum of per-chunk losses over the
replay's chunks is exactly the loss of the whole batch and chunk-wise backward gives the same gradient.
The aggregation choice only changes the weights w (one named function each).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, std_norm: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """r_i = (s_i - mean(s)) / (std(s) + eps) within each group of ``group_size`` consecutive rows. ``[N]``.

    ``std_norm=False`` keeps only the mean baseline (Dr. GRPO).
    """
    groups = rewards.view(-1, group_size)  # [N / n, n]
    centred = groups - groups.mean(dim=1, keepdim=True)
    if std_norm:
        scale = groups.std(dim=1, keepdim=True) + eps
        centred = centred / scale.clamp(min=torch.finfo(scale.dtype).tiny)  # agreeing group: 0 / tiny = 0
    return centred.reshape(-1)


def uniform_groups(rewards: torch.Tensor, group_size: int) -> int:
    """Groups whose rewards all agree: they carry no learning signal."""
    groups = rewards.view(-1, group_size)
    return int((groups == groups[:, :1]).all(dim=1).sum())


def _local(value: torch.Tensor) -> torch.Tensor:
    return value


# Each takes ``total``, which sums a batch-wide normaliser over processes (pte.training.distributed.all_sum) when the
# batch is sharded, so every shard's weights are its part of the global batch's weights.
def grpo_weights(mask: torch.Tensor, max_len: int, total: Callable = _local) -> torch.Tensor:
    """GRPO: mean over each sequence's tokens, then over sequences. ``mask [N, T]`` -> ``w [N, T]``."""
    m = mask.float()
    return m / m.sum(1, keepdim=True).clamp(min=1) / total(m.new_tensor(m.shape[0]))


def dapo_weights(mask: torch.Tensor, max_len: int, total: Callable = _local) -> torch.Tensor:
    """DAPO: one mean over all tokens of the batch, so long responses weigh more."""
    m = mask.float()
    return m / total(m.sum()).clamp(min=1)


def dr_grpo_weights(mask: torch.Tensor, max_len: int, total: Callable = _local) -> torch.Tensor:
    """Dr. GRPO: a constant normaliser (sequences x generation limit), free of length bias."""
    m = mask.float()
    return m / (total(m.new_tensor(m.shape[0])) * max_len)


AGGREGATIONS = {"grpo": grpo_weights, "dapo": dapo_weights, "dr_grpo": dr_grpo_weights}


def masked_gap(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``a - b``, set to 0 where ``mask`` is False before anything is exponentiated.

    Positions after EOS or with zero weight may hold any log-prob gap; exp of a large one is inf, and
    inf (or NaN) times a zero weight is NaN, in the loss and in its gradient. Masking the gap first keeps
    every masked term finite and its gradient exactly zero.
    """
    d = a - b
    return d if mask is None else d.masked_fill(~mask, 0.0)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """k3 estimator of KL(pi_theta || pi_ref) per token: exp(d) - d - 1 with d = log pi_ref - log pi_theta.

    Unlike k1 (= -d), its gradient on on-policy samples is not zero in expectation (docs/method.md section 6).
    ``mask`` (bool, like ``logp``): positions outside it give exactly 0.
    """
    d = masked_gap(ref_logp, logp, mask)
    return torch.exp(d) - d - 1


def token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float,
    clip_high: float,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate plus beta * k3 KL.

    Args:
        logp, old_logp: ``[N, t]`` current and rollout log-probs of the sampled tokens.
        advantages: ``[N]`` group advantages, broadcast over tokens.
        clip_low, clip_high: ratio clipped to [1 - clip_low, 1 + clip_high] (DAPO's clip-higher when unequal).
        ref_logp: ``[N, t]`` full-cache reference log-probs (needed when beta > 0).
        mask: ``[N, t]`` bool, tokens that carry weight; elsewhere the loss is exactly 0 (never NaN).

    Returns:
        ``(loss [N, t], clipped [N, t] bool)``.
    """
    ratio = torch.exp(masked_gap(logp, old_logp, mask))
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped_obj = ratio.clamp(1 - clip_low, 1 + clip_high) * adv
    loss = -torch.minimum(unclipped, clipped_obj)
    if beta > 0:
        loss = loss + beta * k3_kl(logp, ref_logp, mask)
    if mask is not None:
        loss = loss.masked_fill(~mask, 0.0)  # a non-finite advantage or log-prob at a masked token stays out
    return loss, (clipped_obj < unclipped).detach()
