"""The keys and values a replay forward with gradients attends (docs/method.md section 4, the memory claim).

Notation: B rows, H kv heads, D head dim, S slots stored when the chunk began, q_i tokens of the chunk's i-th forward.

A replay chunk (the tokens between two eviction points) may run as several forwards (``replay.max_chunk_tokens``)
with nothing evicted between them. Each of its forwards attends, in this order,

    [the S stored slots as of the chunk's start] + [the live K/V of the chunk's earlier forwards] + [its own K/V]

so a later piece backpropagates into an earlier piece's K/V exactly as one forward over the whole chunk would, while
earlier chunks' K/V stay constants. Slots that the chunk's own forwards filled (freed slots handed out again) are
masked in the stored part by the validity snapshot of the chunk's start: the chunk's tokens are attended live only.

Activation checkpointing (pte.engine.forward) reruns every decoder layer in the backward. A :class:`Ticket` records what
a forward attended, and while the cache recomputes under it, it hands the rerun the same K/V and writes nothing: the
stored part is read again from the buffers, whose held slots do not change until the next eviction frees them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class LiveKV:
    """The chunk being replayed with gradients: its stored prefix, and the live K/V of its forwards so far.

    Args:
        stored: S, slots the chunk's forwards read from the buffers (the span before its first forward).
        valid: ``[B, S]`` the slots each row held when the chunk began.
        num_layers: decoder layers.
    """

    def __init__(self, stored: int, valid: torch.Tensor, num_layers: int) -> None:
        self.stored, self.valid = stored, valid
        self.pos: list[torch.Tensor] = []  # [B, q_i] positions of each earlier forward's tokens
        self.tok_valid: list[torch.Tensor] = []  # [B, q_i] their validity
        self.keys: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]  # per layer, [B, H, q_i, D] live
        self.values: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]

    @property
    def width(self) -> int:
        """Columns before the pending forward's own: S plus the tokens of the chunk's earlier forwards."""
        return self.stored + sum(p.shape[1] for p in self.pos)

    def columns(
        self, stored_pos: torch.Tensor, q_pos: torch.Tensor, q_valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions and validity ``[B, width + q]`` of the keys :meth:`attend` returns, from the cache's slot
        positions ``stored_pos [B, capacity]`` and the pending tokens' ``[B, q]``."""
        k_pos = torch.cat([stored_pos[:, : self.stored], *self.pos, q_pos], dim=1)
        return k_pos, torch.cat([self.valid, *self.tok_valid, q_valid], dim=1)

    def attend(
        self,
        layer: int,
        k_buf: torch.Tensor,
        v_buf: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        pieces: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ``[B, H, width + q, D]`` for ``layer``: a copy of the stored span of the buffers (so that writes of
        later chunks never reach a tensor the backward reads), the first ``pieces`` earlier forwards' live K/V (None
        = all of them), then the pending forward's ``keys``/``values``."""
        n = len(self.keys[layer]) if pieces is None else pieces
        k = torch.cat([k_buf[:, :, : self.stored], *self.keys[layer][:n], keys], dim=2)
        v = torch.cat([v_buf[:, :, : self.stored], *self.values[layer][:n], values], dim=2)
        return k, v

    def keep(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Hold a forward's live K/V ``[B, H, q, D]`` for the chunk's later forwards."""
        self.keys[layer].append(keys)
        self.values[layer].append(values)

    def advance(self, q_pos: torch.Tensor, q_valid: torch.Tensor) -> None:
        """Record the columns of the forward whose K/V :meth:`keep` holds."""
        self.pos.append(q_pos)
        self.tok_valid.append(q_valid)


@dataclass(frozen=True)
class Ticket:
    """What one checkpointed forward attended: its chunk, how many of the chunk's forwards preceded it, and the
    cache's eviction rounds then (an eviction since may have handed a held slot to another token)."""

    chunk: LiveKV
    pieces: int
    evictions: int
