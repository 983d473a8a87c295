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

Memory bounds (``replay.*``, pte.config.ReplayCfg), none of which changes a log-prob or a gradient: the rows replay
in blocks of ``micro_batch`` (rows are independent); a chunk longer than ``max_chunk_tokens`` runs as several
forwards with nothing evicted between them, each attending the earlier ones' K/V live (pte/engine/live_kv.py); the LM
head runs on ``logits_chunk`` positions at a time from the final hidden states (pte/engine/logprobs.py); and with
``checkpointing`` every decoder layer is rerun in the backward (pte/engine/forward.py).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from transformers import PreTrainedModel

from pte.config import ReplayCfg
from pte.engine.cache import BoundedKVCache
from pte.engine.encoder import get_thought, start_thought
from pte.engine.forward import forward_hidden, forward_tokens, output_head
from pte.engine.logprobs import token_logprobs
from pte.engine.rollout import Rollout, new_cache, prompt_positions
from pte.training.lockstep import is_sharded, most_over_ranks


@dataclass
class ReplayChunk:
    """Log-probs of response tokens ``[start, start + n)`` for the rollout's ``rows``."""

    start: int
    logprobs: torch.Tensor  # [b, n], differentiable when grad is enabled
    entropy: torch.Tensor  # [b, n], detached
    rows: slice = field(default_factory=lambda: slice(None))

    @property
    def stop(self) -> int:
        return self.start + self.logprobs.shape[1]

    @property
    def at(self) -> tuple[slice, slice]:
        """Where this chunk's entries sit in the rollout's ``[B, T]`` tensors."""
        return self.rows, slice(self.start, self.stop)


def replay(
    model: PreTrainedModel, ro: Rollout, full_cache: bool = False, limits: ReplayCfg | None = None
) -> Iterator[ReplayChunk]:
    """Yield per-chunk log-probs of all of ``ro``'s rows under ``ro.policy``.

    With ``full_cache`` the responses are scored without any eviction, in one chunk (the reference). ``limits``
    (default: ``ReplayCfg()``) bounds each forward; its ``micro_batch`` is for :func:`replay_all` and is not read here.
    """
    limits = limits or ReplayCfg()
    policy = replace(ro.policy, name="full", sink_tokens=0) if full_cache else ro.policy
    cuts = [] if full_cache else ro.evict_before
    b, p = ro.prompt_ids.shape
    t = ro.response_ids.shape[1]
    if t == 0:
        return
    cache = new_cache(model, policy, p, t)
    cache.init_rows(ro.prompt_mask)  # the first forward may hold only part of the prompt
    encoder = start_thought(model, policy.uses_thought, b)
    chain = policy.uses_thought and encoder.cfg.state_grad == "chain" and torch.is_grad_enabled()
    if chain:
        encoder.link()
    head = output_head(model)
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
            ids = resp[:, a:z]
        start = 0 if k == 0 else a + 1
        hidden = _chunk_hidden(model, cache, ids, pos, valid, p - 1 if k == 0 else 0, limits)  # [B, z + 1 - start, d]
        logp, ent = token_logprobs(head, hidden, resp[:, start : z + 1], ro.temperature, limits.logits_chunk)
        yield ReplayChunk(start=start, logprobs=logp, entropy=ent)
    if chain:
        encoder.backward_chain()


def _chunk_hidden(
    model: PreTrainedModel,
    cache: BoundedKVCache,
    ids: torch.Tensor,
    pos: torch.Tensor,
    valid: torch.Tensor,
    first: int,
    limits: ReplayCfg,
) -> torch.Tensor:
    """Final hidden states ``[B, q - first, d]`` of one chunk's ``q`` columns from column ``first`` on, in forwards of
    at most ``limits.max_chunk_tokens`` columns (nothing is evicted between them)."""
    q = ids.shape[1]
    step = limits.max_chunk_tokens or q
    parts = []
    for s in range(0, q, step):
        cols = slice(s, min(s + step, q))
        args = (ids[:, cols], pos[:, cols], valid[:, cols], max(first - s, 0))
        parts.append(forward_hidden(model, cache, *args, more=s + step < q, checkpointing=limits.checkpointing))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def take_rows(ro: Rollout, rows: slice | torch.Tensor) -> Rollout:
    """``ro``'s ``rows`` (a slice, or a ``[B]`` bool mask) alone, cut to their longest response (none for no row).

    It keeps the padded prompt width and every eviction step of the batch before its end: where none of its rows
    evicts, the step is a chunk boundary with nothing evicted, as it is for those rows in the whole batch's replay. So
    every row's log-probs and gradients are the whole batch's.
    """
    mask = ro.response_mask[rows]
    t = int(mask.sum(1).max()) if mask.shape[0] else 0
    return replace(
        ro,
        prompt_ids=ro.prompt_ids[rows],
        prompt_mask=ro.prompt_mask[rows],
        response_ids=ro.response_ids[rows, :t],
        response_mask=mask[:, :t],
        logprobs=ro.logprobs[rows, :t],
        truncated=ro.truncated[rows],
        evict_before=[j for j in ro.evict_before if j < t - 1],
        logits=None,
    )


def row_blocks(ro: Rollout, rows: int) -> list[tuple[slice, Rollout]]:
    """``ro`` in blocks of at most ``rows`` rows (0 = one block), each cut to its own longest response (take_rows)."""
    b = ro.response_ids.shape[0]
    if rows <= 0 or rows >= b:
        return [(slice(0, b), ro)]
    return [(sl, take_rows(ro, sl)) for sl in (slice(i, min(i + rows, b)) for i in range(0, b, rows))]


def chunk_count(ro: Rollout, rows: int = 0) -> int:
    """How many chunks :func:`replay_all` yields for ``ro`` in blocks of ``rows`` rows (0 = all): per block, one per
    eviction point before its longest response ends, plus the first."""
    return sum(len(b.evict_before) + 1 for _, b in row_blocks(ro, rows) if b.response_ids.shape[1])


def replay_all(
    model: nn.Module,
    rollouts: list[Rollout],
    backward: Callable[[torch.Tensor], None],
    limits: ReplayCfg | None = None,
) -> Iterator[tuple[int, ReplayChunk]]:
    """``(i, chunk)`` for every chunk of each ``rollouts[i]`` in order, row block by row block (``limits.micro_batch``;
    ``chunk.rows`` says which); the caller backpropagates each chunk's loss.

    On a sharded model (FSDP) every chunk's forward and backward are collectives, so after each rollout this
    process runs zero-loss chunks (:func:`idle_loss`, through ``backward``) up to the most chunks any process
    replays for it (pte.training.lockstep); unsharded, nothing is added. The counts include the row blocks, so the
    processes may replay different numbers of rows (a rollout of no rows replays nothing).
    """
    limits = limits or ReplayCfg()
    counts = [chunk_count(ro, limits.micro_batch) for ro in rollouts]
    most = most_over_ranks(counts, is_sharded(model))
    for i, (ro, n, top) in enumerate(zip(rollouts, counts, most, strict=True)):
        for rows, block in row_blocks(ro, limits.micro_batch):
            for chunk in replay(model, block, limits=limits):
                yield i, replace(chunk, rows=rows)
        for _ in range(top - n):
            backward(idle_loss(model, ro))


def idle_loss(model: nn.Module, ro: Rollout) -> torch.Tensor:
    """A zero loss whose backward runs through every layer as a real chunk's does (FSDP's collectives included).

    One token (id 0: ``ro`` may hold no row) through a fresh cache and thought state; times zero, so it adds nothing to
    any gradient.
    """
    cache = new_cache(model, ro.policy, 1, 1)
    start_thought(model, ro.policy.uses_thought, 1)
    ids = torch.zeros((1, 1), dtype=torch.long, device=ro.prompt_ids.device)
    logits = forward_tokens(model, cache, ids, torch.zeros_like(ids), torch.ones_like(ids, dtype=torch.bool))
    return logits.sum() * 0.0


def full_replay(model: PreTrainedModel, ro: Rollout, limits: ReplayCfg | None = None) -> torch.Tensor:
    """Log-probs ``[B, T]`` of ``ro`` under ``ro.policy`` in one tensor (no grad; for checks and eval)."""
    return _scores(model, ro, False, limits or ReplayCfg())


def reference_logprobs(model: PreTrainedModel, ro: Rollout, limits: ReplayCfg | None = None) -> torch.Tensor:
    """pi_ref: full cache, adapters off (docs/method.md section 4). ``[B, T]``, no grad, in ``limits``' bounds."""
    encoder = get_thought(model)
    with adapters_disabled(model):
        if encoder is not None:
            encoder.store.enabled = False
        try:
            return _scores(model, ro, True, limits or ReplayCfg())
        finally:
            if encoder is not None:
                encoder.store.enabled = True


def _scores(model: PreTrainedModel, ro: Rollout, full_cache: bool, limits: ReplayCfg) -> torch.Tensor:
    """Every chunk's log-probs in one ``[B, T]`` tensor, row block by row block; 0 past a block's longest response."""
    out = torch.zeros_like(ro.logprobs)
    with torch.no_grad():
        for rows, block in row_blocks(ro, limits.micro_batch):
            for c in replay(model, block, full_cache, limits):
                out[rows, c.start : c.stop] = c.logprobs
    return out


def adapters_disabled(model: PreTrainedModel) -> contextlib.AbstractContextManager:
    """peft's adapter-off context for LoRA models, a no-op context otherwise."""
    disable = getattr(model, "disable_adapter", None)
    return disable() if callable(disable) else contextlib.nullcontext()
