"""One GRPO step's experience and its chunk-by-chunk policy update (docs/method.md section 4).

Rollouts run under the bounded cache with the current weights, ``rollout.decode_batch`` rows at a time (all of a
process's rows by default); the update replays them in its own micro-batches (``replay.micro_batch``, else
``rollout.micro_batch``) chunk by chunk and backpropagates every chunk's share of the loss before the next chunk is
computed, so activation memory is set by the window, never by the response length.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from pte.config import Config, ConfigError, ReplayCfg
from pte.engine.cache import CachePolicy
from pte.engine.generate import encode_prompts, eos_ids
from pte.engine.noise import RowNoise
from pte.engine.replay import reference_logprobs, replay_all, take_rows
from pte.engine.rollout import Rollout, rollout
from pte.engine.shapes import kv_store
from pte.training.distributed import all_sum
from pte.training.grpo import AGGREGATIONS, group_advantages, k3_kl, token_loss


@dataclass
class Experience:
    """A step's rollouts (decode blocks, in order) with per-sequence advantages and per-token weights."""

    rollouts: list[Rollout]
    advantages: list[torch.Tensor]  # [n] per rollout
    weights: list[torch.Tensor]  # [n, T] per rollout; sum over everything = the batch loss normaliser
    ref_logprobs: list[torch.Tensor | None]


def generate_rollouts(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    prompts: list[str],
    cfg: Config,
    policy_name: str,
    generator: torch.Generator | None = None,
    draw: np.random.Generator | None = None,
) -> list[Rollout]:
    """Sample ``prompts`` (already formatted, one row per sequence) under the cache config, one rollout per block of
    ``rollout.decode_batch`` rows (0 = one block); with ``draw`` each block draws its schedule (``cache.train_*``).

    Every row draws from its own stream, seeded by one draw from ``generator`` for the whole call (pte/engine/noise.py),
    so the tokens do not depend on the blocks; with ``rollout.compile`` each block's cache takes its prompt bucket's
    shape (pte/engine/shapes.py).
    """
    device = next(model.parameters()).device
    r = cfg.rollout
    budget = max(len(r.prompt_buckets), 1)
    sampling = r.sampling(compile=r.compile, max_compiles=budget)
    noise = RowNoise.draw(generator, len(prompts), r.max_new_tokens, device)
    rows = r.decode_batch or len(prompts)
    if r.compile:  # the largest bucket's room from the start: the K/V storage never moves
        policy = cfg.cache.policy_for(1, policy_name)
        kv_store(model).reserve(rows, max(bucket_capacity(cfg, policy, n) for n in r.prompt_buckets))
    eos, out = eos_ids(tok, model), []
    for i in range(0, len(prompts), rows):
        ids, mask = encode_prompts(tok, prompts[i : i + rows], chat=False, device=device)
        longest = int(mask.sum(1).max())
        policy = cfg.cache.policy_for(longest, policy_name, draw)
        slots = bucket_capacity(cfg, policy, longest) if r.compile else 0
        block = noise[i : i + rows]
        out.append(rollout(model, ids, mask, policy, sampling, eos, tok.pad_token_id, noise=block, capacity=slots))
    return out


def bucket_capacity(cfg: Config, policy: CachePolicy, longest: int) -> int:
    """Cache slots for a block whose longest prompt has ``longest`` tokens: those of the smallest prompt bucket that
    holds it, under the largest window any prompt of that bucket can get (the window rule is monotone in the
    longest prompt: fixed, ``budget`` minus it, or the paper's W = it), so every block of a bucket has one shape.

    Raises:
        ConfigError: the prompt is longer than every bucket (it would need one compilation more than planned).
    """
    c, buckets = cfg.cache, sorted(cfg.rollout.prompt_buckets)
    hi = next((n for n in buckets if n >= longest), None)
    if hi is None:
        raise ConfigError(
            f"rollout.prompt_buckets: a {longest}-token prompt is longer than the largest bucket {buckets[-1]}; "
            "add a bucket that holds it"
        )
    lo = max([n + 1 for n in buckets if n < hi], default=1)  # the shortest longest-prompt this bucket takes
    window = c.window or (max(c.budget - lo, 1) if c.budget else hi)  # >= 1: a bucket the budget leaves no room in
    return replace(policy, window=window).capacity(hi, cfg.rollout.max_new_tokens)


def replay_limits(cfg: Config) -> ReplayCfg:
    """``replay.*`` with its micro-batch resolved: 0 = ``rollout.micro_batch`` rows (a rollout may hold more)."""
    return replace(cfg.replay, micro_batch=cfg.replay.micro_batch or cfg.rollout.micro_batch)


def build_experience(model: nn.Module, rollouts: list[Rollout], rewards: torch.Tensor, cfg: Config) -> Experience:
    """Group advantages, loss weights over the whole batch and, if beta > 0, full-cache reference log-probs.

    Under multi-process training the batch is the global one: the weights' normaliser is summed over processes.
    """
    g = cfg.grpo
    adv = group_advantages(rewards, cfg.rollout.group_size, g.std_norm, g.adv_eps)
    t_max = max(ro.response_ids.shape[1] for ro in rollouts)
    masks = [ro.response_mask.clone() for ro in rollouts]
    if g.mask_truncated:
        for m, ro in zip(masks, rollouts):
            m[ro.truncated] = False
    padded = torch.cat([nn.functional.pad(m, (0, t_max - m.shape[1])) for m in masks])  # [N, T_max]
    weights = AGGREGATIONS[g.loss_agg](padded, cfg.rollout.max_new_tokens, all_sum)  # global normaliser
    sizes = [m.shape[0] for m in masks]
    w_split = [w[:, : m.shape[1]] for w, m in zip(weights.split(sizes), masks)]
    refs = [reference_logprobs(model, ro, replay_limits(cfg)) if g.beta > 0 else None for ro in rollouts]
    return Experience(rollouts, list(adv.split(sizes)), w_split, refs)


def loss_rows(exp: Experience, beta: float) -> list[torch.Tensor]:
    """Per rollout, ``[n]`` bool: the rows whose loss can be non-zero. A row without weighted tokens has none; with
    ``beta`` 0 neither has one of zero advantage, whose clipped surrogate is exactly 0 at every token (token_loss)."""
    return [(w != 0).any(1) & ((a != 0) | (beta > 0)) for w, a in zip(exp.weights, exp.advantages)]


def only_rows(exp: Experience, keep: list[torch.Tensor]) -> Experience:
    """``exp`` restricted to the rows ``keep`` (per rollout, ``[n]`` bool), each rollout cut to its longest kept row."""
    rollouts = [take_rows(ro, k) for ro, k in zip(exp.rollouts, keep)]
    lengths = [ro.response_ids.shape[1] for ro in rollouts]
    weights = [w[k, :t] for w, k, t in zip(exp.weights, keep, lengths)]
    refs = [None if r is None else r[k, :t] for r, k, t in zip(exp.ref_logprobs, keep, lengths)]
    return Experience(rollouts, [a[k] for a, k in zip(exp.advantages, keep)], weights, refs)


def policy_update(model: nn.Module, exp: Experience, cfg: Config, backward: Callable[[torch.Tensor], None]) -> dict:
    """Backpropagate the GRPO loss chunk by chunk over every replay micro-batch (no optimiser step here).

    With ``replay.skip_zero_loss`` only the rows whose loss can be non-zero are replayed (loss_rows); if that leaves
    a trainable parameter without a gradient, it gets a zero one, as the replay of the skipped rows would have given
    it, so the optimiser steps as it would have. On a sharded model each rollout is padded with zero-loss chunks to
    the most any process replays, so every process runs as many forwards and backwards (pte.training.lockstep).

    Returns:
        Sums for logging: loss, weighted KL, clipped and masked token counts, entropy, rows and replayed rows; and the
        rollout/replay gap |replay log-prob - rollout log-prob| over response tokens (``logp_gap_sum``,
        ``logp_gap_max``): 0 up to rounding when the replay reproduces the rollout (float32), the kernels' rounding in
        bf16.
    """
    g = cfg.grpo
    stats = {"loss": 0.0, "kl": 0.0, "clipped": 0.0, "tokens": 0.0, "entropy": 0.0}
    stats |= {"logp_gap_sum": 0.0, "logp_gap_max": 0.0, "rows": float(sum(len(a) for a in exp.advantages))}
    skipped = False
    if cfg.replay.skip_zero_loss:
        keep = loss_rows(exp, g.beta)
        skipped = not all(bool(k.all()) for k in keep)
        exp = only_rows(exp, keep) if skipped else exp
    stats["replayed_rows"] = float(sum(len(a) for a in exp.advantages))
    for i, chunk in replay_all(model, exp.rollouts, backward, replay_limits(cfg)):
        ro, w, ref = exp.rollouts[i], exp.weights[i], exp.ref_logprobs[i]
        at, adv = chunk.at, exp.advantages[i][chunk.rows]
        ref_chunk = ref[at] if ref is not None else None
        weighted = w[at] != 0
        old = ro.logprobs[at]
        loss_tok, clipped = token_loss(chunk.logprobs, old, adv, g.clip_low, g.clip_high, ref_chunk, g.beta, weighted)
        loss = (loss_tok * w[at]).sum()
        backward(loss)
        mask = ro.response_mask[at]
        gap = (chunk.logprobs.detach() - old).abs().masked_fill(~mask, 0.0)
        stats["logp_gap_sum"] += float(gap.sum())
        stats["logp_gap_max"] = max(stats["logp_gap_max"], float(gap.max()))
        stats["loss"] += float(loss.detach())
        stats["clipped"] += float((clipped & mask).sum())
        stats["tokens"] += float(mask.sum())
        stats["entropy"] += float(chunk.entropy.masked_fill(~mask, 0.0).sum())  # x * 0 is NaN for x = inf
        if ref_chunk is not None:
            stats["kl"] += float((k3_kl(chunk.logprobs.detach(), ref_chunk, mask) * mask).sum())
    if skipped:
        for p in model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
    return stats
