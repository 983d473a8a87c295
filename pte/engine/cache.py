"""Cache policy D (docs/method.md section 2): a preallocated KV store with a retained region and a thought window.

Notation: B batch rows, H kv heads, D head dim, P padded prompt length, W window, e tokens evicted per
eviction, L decoder layers, L_b the real prompt length of row b, s ``sink_tokens``.

Which tokens a row keeps is defined on that row's own absolute positions, never on slots, so a row's
outputs do not depend on its batch-mates or on its left padding:
    kept       positions [0, K_b): K_b = L_b + s with ``retain_prompt`` (the prompt and the first s generated
               tokens), K_b = s without it (the first s real tokens, prompt or not); never evicted
    stream     positions K_b + u, u = 0, 1, ...: the evictable tokens, in order. Before stream token u is
               appended, ``evicted_before(u)`` of them are gone: none until W are held, then the oldest e
               at once each time the window would overflow
Pads are no token of the row: never attended, never kept, never in the stream, never evicted. With
``retain_prompt`` every row's stream starts at its first generated token, so all rows evict at the same
steps (the paper's synchronous eviction); without it, each row's window runs over its own prompt and
thoughts, and rows evict at their own steps (the engine cuts replay chunks at every row's evictions).

Storage is addressed by slot index, never by contiguity: every layer's buffer ``[B, H, capacity, D]``
takes each appended column (the left padded prompt, then one generated token per step for every row) into
a slot handed out by a free list, and a slot goes back to the list once no row holds its column, so an
eviction moves nothing and ``used`` is the held size. Which (row, slot) pairs may be attended lives in
``valid`` and, for a lone decode query, in the additive mask ``bias`` kept current in place by appends and
evictions, so a decode step builds no mask. Keys are stored after rotary embedding, so every token keeps
its absolute position; slot order does not matter to attention, only the mask built from positions does.
A later policy may therefore evict any (row, slot), and a finished row's slots may be refilled; ``select_rows``
drops finished rows from the batch, or copies a prompt prefilled once to the rows of its group. A forward with
gradients (the replay) attends the stored slots detached plus the live K/V of its chunk (pte/engine/live_kv.py).
The object is passed to Hugging Face models as their cache (``update``/``get_seq_length``), so the
models run unpatched.
"""

from __future__ import annotations

import contextlib
from collections import Counter, deque
from collections.abc import Iterator

import torch

from pte.engine.live_kv import LiveKV, Ticket
from pte.engine.policy import POLICIES, CachePolicy
from pte.engine.shapes import KVStore

__all__ = ["POLICIES", "BoundedKVCache", "CachePolicy", "Eviction"]  # the policy is re-exported: one import site

Eviction = tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]


class BoundedKVCache:
    """Preallocated per-layer K/V buffers with per-row positions and validity, addressed by slot index.

    Host-side bookkeeping (the free list, the slot of every column, per-row pads and evicted counts) decides
    every eviction without reading the device, so decoding never synchronises on the cache.

    Args:
        num_layers: decoder layers of the model.
        policy: the eviction policy.
        prompt_len: P, the padded prompt length of this batch.
        capacity: slots to allocate per layer (``policy.capacity``).
        static: attend all ``capacity`` slots and write through a device index, so every decode step has the
            same shapes and no Python-int dependence inside the model (``torch.compile`` / CUDA graphs).
        store: K/V storage to take the buffers from (pte/engine/shapes.py), so they keep their addresses across
            rollouts; a static cache without one gets its own.
    """

    def __init__(
        self,
        num_layers: int,
        policy: CachePolicy,
        prompt_len: int,
        capacity: int,
        static: bool = False,
        store: KVStore | None = None,
    ) -> None:
        self.policy, self.prompt_len, self.capacity, self.static = policy, prompt_len, capacity, static
        self.store = store if store is not None or not static else KVStore()
        self.keys: list[torch.Tensor | None] = [None] * num_layers  # each [B, H, capacity, D]
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.pos: torch.Tensor | None = None  # [B, capacity] absolute rotary position (stale where not valid)
        self.valid: torch.Tensor | None = None  # [B, capacity] the row holds a real token in the slot
        self.bias: torch.Tensor | None = None  # [B, 1, 1, capacity] additive mask of a lone query: 0 where valid
        self.keep_pos: torch.Tensor | None = None  # [B] K_b, positions below it are never evicted
        self.reset()

    def reset(self) -> None:
        """Forget every token but keep the allocated storage."""
        self.n_evictions = self.evicted_tokens = 0
        self.appended = 0  # columns ever appended; column g holds position g - pad_b in row b
        self.free: deque[int] = deque(range(self.capacity))  # slots to hand out, oldest freed first
        self.high = 0  # slots [0, high) were ever written: what a dynamic-shape forward attends
        self._slot_of: list[int] = []  # slot of each appended column (stale once the slot is released)
        self._holders = [0] * self.capacity  # rows holding each slot's token; the slot is free again at 0
        self._pads: list[int] = []  # P - L_b per row
        self._keep: list[int] = []  # K_b per row
        self._done: list[int] = []  # stream tokens evicted per row
        self._write: list[int] = []  # slots of the pending forward's tokens
        self._write_idx: torch.Tensor | None = None  # the same on the device, when a slice cannot address them
        self._grad = False  # the pending forward runs with grad: it attends the stored span detached + ``_chunk``
        self._more = False  # more forwards of the same replay chunk follow the pending one
        self._chunk: LiveKV | None = None  # the replay chunk the grad forwards belong to
        self._recompute: Ticket | None = None  # a checkpointed layer is being rerun in the backward
        self.keep_pos = None
        if self.valid is not None:
            self.valid.zero_()
            self.pos.fill_(-1)
            self.bias.fill_(torch.finfo(self.bias.dtype).min)

    @property
    def used(self) -> int:
        """Occupied slots (held by at least one row)."""
        return self.capacity - len(self.free)

    @property
    def span(self) -> int:
        """Slots a forward attends: all of them when static, else those ever written."""
        return self.capacity if self.static else self.high

    # -- Hugging Face cache interface -------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store the new K/V ``[B, H, q, D]`` in the slots ``mask`` chose and return the K/V to attend.

        Without grad (rollout) the stored span itself is returned, as views. With grad (replay) the stored copy
        is detached, so a later chunk never backpropagates into an earlier one, and the live tensors follow a
        copy of the stored span and the chunk's earlier live K/V (pte/engine/live_kv.py): attention may save them for a
        backward deferred past later chunks, which overwrite the buffer in place. A checkpointed layer's rerun
        (:meth:`recomputing`) gets what its forward attended and writes nothing.
        """
        if self.keys[layer_idx] is None:
            self.keys[layer_idx], self.values[layer_idx] = self._new_kv(layer_idx, key_states, key_states.shape[0])
        k_buf, v_buf = self.keys[layer_idx], self.values[layer_idx]
        if self._recompute is not None:
            t = self._recompute
            return t.chunk.attend(layer_idx, k_buf, v_buf, key_states, value_states, t.pieces)
        if self._grad:
            out = self._chunk.attend(layer_idx, k_buf, v_buf, key_states, value_states)  # [B, H, width + q, D]
            if self._more:
                self._chunk.keep(layer_idx, key_states, value_states)
        self._put(k_buf, key_states.detach(), 2)
        self._put(v_buf, value_states.detach(), 2)
        if self._grad:
            return out
        return k_buf[:, :, : self.span], v_buf[:, :, : self.span]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.used

    def _new_kv(self, layer_idx: int, like: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed K and V buffers ``[rows, H, capacity, D]`` shaped after ``like [*, H, *, D]`` (store views if any)."""
        if self.store is not None:
            return self.store.views(layer_idx, like, rows, self.capacity)
        _, h, _, d = like.shape
        return like.new_zeros((rows, h, self.capacity, d)), like.new_zeros((rows, h, self.capacity, d))

    def _put(self, t: torch.Tensor, value: torch.Tensor, dim: int) -> None:
        """Write ``value`` into the pending slots of ``t`` along its slot dimension ``dim``.

        K/V buffers ``[B, H, capacity, D]`` take ``[B, H, q, D]`` (dim 2); per-slot metadata ``[B, capacity]`` takes
        ``[B, q]`` (dim 1).
        """
        if self._write_idx is not None:
            t.index_copy_(dim, self._write_idx, value)
        else:
            t.narrow(dim, self._write[0], len(self._write)).copy_(value)

    # -- bookkeeping driven by the engine -----------------------------------------------------------
    def mask(self, q_pos: torch.Tensor, q_valid: torch.Tensor, dtype: torch.dtype, more: bool = False) -> torch.Tensor:
        """Choose slots for the ``q`` queries about to be appended and return their additive attention mask.

        The mask is ``[B, 1, q, span]`` over the slots (``[B, 1, q, width + q]`` with grad, in the column order of
        ``LiveKV.attend``). With grad, ``more`` says that the next forward continues the same replay chunk (nothing
        evicted between them), so it attends this forward's K/V live. A query sees valid slots and valid new tokens at positions <= its own that its row's window
        still holds at that query (so a forward over many tokens, e.g. a prompt longer than the window, is a
        per-token sliding window). Each query also sees itself, so a pad query attends to something and never
        produces NaN (its output is never read). A lone query without grad gets a view of ``bias``: every
        stored token precedes it and ``evict_due`` already left exactly its window valid.
        """
        b, q = q_pos.shape
        self._alloc_meta(b, q_pos.device, dtype)
        if self.keep_pos is None:
            self.init_rows(q_valid)
        self._take(q, q_pos.device, more)
        if q == 1 and not self._grad:
            self.bias[:, 0, 0, self._write[0]] = 0.0
            return self.bias[..., : self.span]
        k_pos, k_valid = self.columns(q_pos, q_valid)  # [B, columns]
        allowed = k_valid[:, None, :] & (k_pos[:, None, :] <= q_pos[:, :, None])  # [B, q, columns]
        if self.policy.bounded and q > 1:
            keep = self.keep_pos[:, None]
            k_u, q_u = k_pos - keep, q_pos - keep  # stream indices, < 0 for kept tokens
            allowed &= (k_u < 0)[:, None, :] | (k_u[:, None, :] >= self.policy.evicted_before(q_u)[:, :, None])
        own = range(self._chunk.width, self._chunk.width + q) if self._grad else self._write  # each query's column
        allowed[:, torch.arange(q, device=q_pos.device), torch.tensor(own, device=q_pos.device)] = True
        out = torch.zeros(allowed.shape, dtype=dtype, device=q_pos.device)
        return out.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]

    def columns(self, q_pos: torch.Tensor, q_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions and validity ``[B, columns]`` of the keys the pending forward attends, in mask order."""
        if self._grad:
            return self._chunk.columns(self.pos, q_pos, q_valid)
        k_pos, k_valid = self.pos[:, : self.span].clone(), self.valid[:, : self.span].clone()
        self._put(k_pos, q_pos, 1)
        self._put(k_valid, q_valid, 1)
        return k_pos, k_valid

    def _take(self, q: int, device: torch.device, more: bool) -> None:
        """Hand out the slots of the next ``q`` columns; a grad forward opens a replay chunk unless one is open."""
        if q > len(self.free):
            raise RuntimeError(f"cache overflow: {self.used} + {q} tokens > capacity {self.capacity}")
        self._grad, self._more = torch.is_grad_enabled(), more
        if self._grad and self._chunk is None:
            self._chunk = LiveKV(self.span, self.valid[:, : self.span].clone(), len(self.keys))
        self._write = [self.free.popleft() for _ in range(q)]
        self.high = max(self.high, max(self._write) + 1)
        first = self._write[0]
        if self.static and q == 1:
            self._write_idx = self._slot.fill_(first)
        elif self.static or self._write != list(range(first, first + q)):
            self._write_idx = torch.tensor(self._write, device=device)
        else:
            self._write_idx = None

    def init_rows(self, prompt_valid: torch.Tensor) -> None:
        """Learn each row's prompt length from the validity of the padded prompt (``[B, >= P]``; the first forward's,
        unless a caller that splits the prompt over several forwards passes it first)."""
        if prompt_valid.shape[1] < self.prompt_len:
            raise RuntimeError(f"the first forward holds {prompt_valid.shape[1]} of {self.prompt_len} prompt columns")
        lengths = prompt_valid[:, : self.prompt_len].sum(1)  # [B]
        sinks = self.policy.sink_tokens
        self.keep_pos = lengths + sinks if self.policy.retain_prompt else torch.full_like(lengths, sinks)
        self._pads = [self.prompt_len - n for n in lengths.tolist()]  # the one device read per batch
        self._keep = self.keep_pos.tolist()
        self._done = [0] * len(self._pads)

    def _alloc_meta(self, batch: int, device: torch.device, dtype: torch.dtype) -> None:
        if self.pos is None:
            self.pos = torch.full((batch, self.capacity), -1, dtype=torch.long, device=device)
            self.valid = torch.zeros((batch, self.capacity), dtype=torch.bool, device=device)
            self.bias = torch.full((batch, 1, 1, self.capacity), torch.finfo(dtype).min, dtype=dtype, device=device)
            self._slot = torch.zeros(1, dtype=torch.long, device=device)  # static mode's one-token write index

    def advance(self, q_pos: torch.Tensor, q_valid: torch.Tensor) -> None:
        """Record positions/validity of the ``q`` tokens the last forward stored."""
        self._put(self.pos, q_pos, 1)
        self._put(self.valid, q_valid, 1)
        dtype = self.bias.dtype
        self._put(self.bias[:, 0, 0], torch.where(q_valid, 0.0, torch.finfo(dtype).min).to(dtype), 1)
        for g, slot in enumerate(self._write, start=self.appended):  # column g is a token of rows with pad <= g
            self._holders[slot] = sum(pad <= g for pad in self._pads) if g < self.prompt_len else len(self._pads)
        self._slot_of.extend(self._write)
        self.appended += len(self._write)
        if self._grad and self._more:
            self._chunk.advance(q_pos, q_valid)
        elif self._grad:
            self._chunk = None
        self._write, self._write_idx, self._grad = [], None, False

    def ticket(self) -> Ticket:
        """What the pending grad forward attends, for a rerun of one of its layers in the backward."""
        return Ticket(self._chunk, len(self._chunk.pos), self.n_evictions)

    @contextlib.contextmanager
    def recomputing(self, ticket: Ticket) -> Iterator[None]:
        """Rerun a checkpointed layer: ``update`` returns the K/V its forward attended and stores nothing.

        Raises:
            RuntimeError: an eviction happened since the forward (the next chunk began before this one's backward),
                so a slot it attended may hold another token now.
        """
        if ticket.evictions != self.n_evictions:
            raise RuntimeError(
                "replay.checkpointing: a chunk's backward ran after the next chunk's evictions; backpropagate each "
                "chunk's loss before asking for the next chunk"
            )
        self._recompute = ticket
        try:
            yield
        finally:
            self._recompute = None

    def evict_due(self) -> list[Eviction]:
        """Evict what each row's window must drop before the next column is appended, oldest first.

        Returns:
            One entry per eviction round: per-layer evicted keys and values ``[B, H, e, D]``, their positions
            ``[B, e]`` (increasing) and the rows that evicted ``[B]`` (bool; other rows' entries are filler to
            ignore). A row may need several rounds at once (a prompt longer than the window); the thought
            encoder folds them in one at a time. Empty when nothing is due.
        """
        if not self.policy.bounded or not self._pads:
            return []
        e = self.policy.evict_tokens
        due = [
            self.policy.evicted_before(self.appended - pad - keep) - done
            for pad, keep, done in zip(self._pads, self._keep, self._done, strict=True)
        ]
        out = []
        while any(due):
            rows = [d > 0 for d in due]
            out.append(self._evict_round(rows, e))
            due = [d - e if r else d for d, r in zip(due, rows, strict=True)]
        return out

    def _evict_round(self, rows: list[bool], e: int) -> Eviction:
        """Take the oldest ``e`` stream tokens of every row in ``rows`` and stop attending them."""
        firsts = [self._oldest_held(b) for b in range(len(self._pads))]
        filler = firsts[rows.index(True)]  # rows that keep their tokens read an evicting row's (ignored)
        # [B][e] slot of each evicted token, by position: the row's oldest stream columns still held
        slots = [self._slot_of[f : f + e] for f in (f if r else filler for f, r in zip(firsts, rows, strict=True))]
        self._done = [d + e if r else d for d, r in zip(self._done, rows, strict=True)]
        self._release([s for s, r in zip(slots, rows, strict=True) if r])
        if all(rows) and all(s == slots[0] for s in slots):  # synchronous eviction: one index for every row
            ev_k, ev_v, ev_pos = self._drop_shared(slots[0])
        else:
            ev_k, ev_v, ev_pos = self._drop_rows(slots, rows)
        self.n_evictions += 1
        self.evicted_tokens += e * sum(rows)
        return ev_k, ev_v, ev_pos, torch.tensor(rows, device=self.pos.device)

    def _drop_shared(self, slots: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Copy out and stop attending the same ``slots`` in every row: K/V ``[B, H, e, D]``, positions ``[B, e]``."""
        first = slots[0]
        if slots == list(range(first, first + len(slots))):  # a slice: no index tensor to build
            at: slice | torch.Tensor = slice(first, first + len(slots))
            ev_k = [k[:, :, at].clone() for k in self.keys]
            ev_v = [v[:, :, at].clone() for v in self.values]
        else:
            at = torch.tensor(slots, device=self.pos.device)
            ev_k = [k.index_select(2, at) for k in self.keys]
            ev_v = [v.index_select(2, at) for v in self.values]
        ev_pos = self.pos[:, at].clone()
        self.valid[:, at] = False
        self.bias[:, 0, 0, at] = torch.finfo(self.bias.dtype).min
        return ev_k, ev_v, ev_pos

    def _drop_rows(
        self, slots: list[list[int]], rows: list[bool]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Copy out ``slots[b]`` of every row and stop attending them in the rows that evict."""
        device = self.pos.device
        idx = torch.tensor(slots, device=device)  # [B, e]
        gather = idx[:, None, :, None]
        ev_k = [k.gather(2, gather.expand(-1, k.shape[1], -1, k.shape[3])) for k in self.keys]
        ev_v = [v.gather(2, gather.expand(-1, v.shape[1], -1, v.shape[3])) for v in self.values]
        ev_pos = self.pos.gather(1, idx)
        keep = ~torch.tensor(rows, device=device)[:, None]  # [B, 1] rows whose entries stay
        self.valid.scatter_(1, idx, self.valid.gather(1, idx) & keep)
        bias = self.bias[:, 0, 0]  # [B, capacity] view
        bias.scatter_(1, idx, bias.gather(1, idx).masked_fill(~keep, torch.finfo(bias.dtype).min))
        return ev_k, ev_v, ev_pos

    def _release(self, dropped: list[list[int]]) -> None:
        """Count one holder less for every (row, slot) in ``dropped`` and give back slots that no row holds.

        Any choice of (row, slot) pairs works, not only the oldest tokens: slot indices define a token.
        """
        for slots in dropped:
            for slot in slots:
                self._holders[slot] -= 1
                if self._holders[slot] == 0:
                    self.free.append(slot)

    def select_rows(self, rows: list[int]) -> None:
        """Hold batch ``rows`` in this order, repeats allowed: finished rows leave the batch (they stop costing
        attention, memory and evictions), or a prompt prefilled once is copied to each row of its group.

        Holders are recounted and slots that no row holds go back to the free list. One layer is copied at a time and
        its old buffer is dropped before the next is copied, so the step holds at most one layer's rows beyond the
        cache itself (with a store, the rows are copied into its views). Not for dropping rows of a ``static``
        cache, whose shapes are fixed.
        """
        counts = Counter(rows)
        for b in range(len(self._pads)):
            if counts[b] == 0:
                self._release([self._held_slots(b)])
            elif counts[b] > 1:  # its copies hold its slots too
                for slot in self._held_slots(b):
                    self._holders[slot] += counts[b] - 1
        idx = torch.tensor(rows, device=self.pos.device)
        for i in range(len(self.keys)):
            if self.store is not None:  # [B', H, capacity, D] copied into the store's views
                k, v = self.keys[i].index_select(0, idx), self.values[i].index_select(0, idx)
                self.keys[i], self.values[i] = self._new_kv(i, k, len(rows))
                self.keys[i].copy_(k)
                self.values[i].copy_(v)
            else:
                self.keys[i] = self.keys[i].index_select(0, idx)
                self.values[i] = self.values[i].index_select(0, idx)
        self.pos, self.valid, self.bias = (t.index_select(0, idx) for t in (self.pos, self.valid, self.bias))
        self.keep_pos = self.keep_pos.index_select(0, idx)
        self._pads, self._keep, self._done = ([x[b] for b in rows] for x in (self._pads, self._keep, self._done))

    def _oldest_held(self, b: int) -> int:
        """Column of row ``b``'s oldest stream token not yet evicted (the next one its window drops)."""
        return self._pads[b] + self._keep[b] + self._done[b]

    def _held_slots(self, b: int) -> list[int]:
        """Slots of the columns row ``b`` still holds: its kept tokens and its stream tokens not yet evicted."""
        kept = range(self._pads[b], min(self._pads[b] + self._keep[b], self.appended))
        return [self._slot_of[g] for g in (*kept, *range(self._oldest_held(b), self.appended))]

    @property
    def slot_bytes(self) -> int:
        """K/V bytes of one row in one occupied slot (all layers, keys and values); 0 before the first forward."""
        k = self.keys[0]
        return 0 if k is None else 2 * len(self.keys) * k.shape[1] * k.shape[3] * k.element_size()
