"""Chunked teacher-forced replay of a rollout (docs/method.md section 4, "memory claim").

The replay rebuilds the rollout's conditioning exactly: same retained prompt, same window contents,
same thought state, cut into chunks at the rollout's eviction points. Within a chunk nothing is
evicted, so one parallel forward over the chunk equals the token-by-token rollout. Each chunk is
yielded with its log-probs while its graph is alive: the caller backpropagates the chunk's loss before
asking for the next one. The cache stores detached K/V and the state is detached between chunks, so
activation memory is bounded by the window, not by the response length. With ``thought.state_grad: chain`` each
chunk reads leaf copies of the states instead, and once the caller has backpropagated the last chunk the replay
sends every chunk's dL/dS through the chain of state updates in one backward (exact state gradient; the evicted
K/V enter as constants).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
from torch import nn
from transformers import PreTrainedModel

from pte.encoder import get_thought, start_thought
from pte.forward import forward_tokens
from pte.lockstep import is_sharded, most_over_ranks
from pte.rollout import Rollout, new_cache, prompt_positions


@dataclass
class ReplayChunk:
    """Log-probs of response tokens ``[start, start + n)`` for every row."""

    start: int
    logprobs: torch.Tensor  # [B, n], differentiable when grad is enabled
    entropy: torch.Tensor  # [B, n], detached

    @property
    def stop(self) -> int:
        return self.start + self.logprobs.shape[1]


def _chunk_stats(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of ``targets`` and the entropy, from ``logits [B, n, V]`` at the sampling temperature."""
    logp = torch.log_softmax(logits / temperature if temperature > 0 else logits, dim=-1)
    chosen = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(-1)
    return chosen, entropy


def replay(model: PreTrainedModel, ro: Rollout, full_cache: bool = False) -> Iterator[ReplayChunk]:
    """Yield per-chunk log-probs of ``ro``'s responses under ``ro.policy``.

    With ``full_cache`` the responses are scored without any eviction, in one chunk (the reference).
    """
    policy = replace(ro.policy, name="full", sink_tokens=0) if full_cache else ro.policy
    cuts = [] if full_cache else ro.evict_before
    b, p = ro.prompt_ids.shape
    t = ro.response_ids.shape[1]
    if t == 0:
        return
    cache = new_cache(model, policy, p, t)
    encoder = start_thought(model, policy.uses_thought, b)
    chain = policy.uses_thought and encoder.cfg.state_grad == "chain" and torch.is_grad_enabled()
    if chain:
        encoder.link()
    lengths = ro.prompt_mask.sum(1)
    resp = ro.response_ids
    bounds = [0, *cuts, t - 1]
    for k, (a, z) in enumerate(itertools.pairwise(bounds)):
        pos = lengths[:, None] + torch.arange(a, z, device=resp.device)  # [B, z - a]
        valid = torch.ones_like(pos, dtype=torch.bool)
        if k == 0:
            ids = torch.cat([ro.prompt_ids, resp[:, :z]], dim=1)
            pos = torch.cat([prompt_positions(ro.prompt_mask), pos], dim=1)
            valid = torch.cat([ro.prompt_mask, valid], dim=1)
            logits = forward_tokens(model, cache, ids, pos, valid, logits_from=p - 1)
        else:
            if chain:
                encoder.unlink()
            elif policy.uses_thought:
                encoder.detach_states()
            for evicted in cache.evict_due():
                if policy.encodes_evicted:
                    encoder.absorb(*evicted)
            if chain:
                encoder.link()
            logits = forward_tokens(model, cache, resp[:, a:z], pos, valid)
        start = 0 if k == 0 else a + 1
        logp, ent = _chunk_stats(logits, resp[:, start : z + 1], ro.temperature)
        yield ReplayChunk(start=start, logprobs=logp, entropy=ent)
    if chain:
        encoder.backward_chain()


def chunk_count(ro: Rollout) -> int:
    """How many chunks :func:`replay` yields for ``ro``: one per eviction point, plus the first."""
    return len(ro.evict_before) + 1 if ro.response_ids.shape[1] else 0


def replay_all(
    model: nn.Module, rollouts: list[Rollout], backward: Callable[[torch.Tensor], None]
) -> Iterator[tuple[int, ReplayChunk]]:
    """``(i, chunk)`` for every chunk of each ``rollouts[i]`` in order; the caller backpropagates each chunk's loss.

    On a sharded model (FSDP) every chunk's forward and backward are collectives, so after each rollout this
    process runs zero-loss chunks (:func:`idle_loss`, through ``backward``) up to the most chunks any process
    replays for it (pte.lockstep); unsharded, nothing is added.
    """
    counts = [chunk_count(ro) for ro in rollouts]
    device = rollouts[0].response_ids.device if rollouts else torch.device("cpu")
    most = most_over_ranks(counts, is_sharded(model), device)
    for i, (ro, n, top) in enumerate(zip(rollouts, counts, most, strict=True)):
        for chunk in replay(model, ro):
            yield i, chunk
        for _ in range(top - n):
            backward(idle_loss(model, ro))


def idle_loss(model: nn.Module, ro: Rollout) -> torch.Tensor:
    """A zero loss whose backward runs through every layer as a real chunk's does (FSDP's collectives included).

    One token (the last prompt token of the first row, always real under left padding) through a fresh cache and
    thought state; times zero, so it adds nothing to any gradient.
    """
    cache = new_cache(model, ro.policy, 1, 1)
    start_thought(model, ro.policy.uses_thought, 1)
    ids = ro.prompt_ids[:1, -1:]
    logits = forward_tokens(model, cache, ids, torch.zeros_like(ids), torch.ones_like(ids, dtype=torch.bool))
    return logits.sum() * 0.0


def full_replay(model: PreTrainedModel, ro: Rollout) -> torch.Tensor:
    """Log-probs ``[B, T]`` of ``ro`` under ``ro.policy`` in one tensor (no grad; for checks and eval)."""
    with torch.no_grad():
        return torch.cat([c.logprobs for c in replay(model, ro)], dim=1)


def reference_logprobs(model: PreTrainedModel, ro: Rollout) -> torch.Tensor:
    """pi_ref: full cache, adapters off (docs/method.md section 4). ``[B, T]``, no grad."""
    encoder = get_thought(model)
    with torch.no_grad(), adapters_disabled(model):
        if encoder is not None:
            encoder.store.enabled = False
        try:
            return torch.cat([c.logprobs for c in replay(model, ro, full_cache=True)], dim=1)
        finally:
            if encoder is not None:
                encoder.store.enabled = True


def adapters_disabled(model: PreTrainedModel) -> contextlib.AbstractContextManager:
    """peft's adapter-off context for LoRA models, a no-op context otherwise."""
    disable = getattr(model, "disable_adapter", None)
    return disable() if callable(disable) else contextlib.nullcontext()
