"""Cache policy D (method.md section 2): a preallocated KV store with a retained region and a thought window.

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

Storage: every layer's buffer ``[B, H, capacity, D]`` has one slot column per appended column (the left
padded prompt, then one generated token per step for every row); a column is dropped once no row keeps
it, so ``used`` is the held size. Keys are stored after rotary embedding, so every token keeps its absolute
position; the slot order does not matter to attention, only the mask built from positions does.
The object is passed to Hugging Face models as their cache (``update``/``get_seq_length``), so the
models run unpatched.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import torch

POLICIES = ("full", "window", "sink", "pte", "global_only")


@dataclass(frozen=True)
class CachePolicy:
    """When and what to evict. ``pte`` evicts like ``window`` and hands the evicted K/V to the thought encoder.

    On a model with a thought encoder, ``full``, ``window`` and ``sink`` run the base model (the update is
    off); ``global_only`` evicts like ``window`` and applies the update with the initial state S_g only, never
    absorbing evictions (the paper's Global-Only ablation).

    Args:
        name: one of ``full``, ``window``, ``sink``, ``pte``, ``global_only``.
        window: W, thought tokens kept in the sliding window (ignored by ``full``).
        evict_ratio: fraction of W evicted in one chunk (paper: 0.25 training, 0.15 inference); 0 = one token.
        sink_tokens: first generated tokens that are never evicted (``sink`` only).
        retain_prompt: keep the prompt outside the window (paper). False puts the prompt inside the window:
            each row's window runs over its own prompt and thoughts (a prompt may be longer than W), which
            with ``evict_ratio=0`` is a plain per-token sliding window.
    """

    name: str = "pte"
    window: int = 256
    evict_ratio: float = 0.25
    sink_tokens: int = 0
    retain_prompt: bool = True

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise ValueError(f"cache.policy={self.name!r}: expected one of {POLICIES}")
        if self.name != "full" and self.window < 1:
            raise ValueError(f"cache.window={self.window}: must be >= 1 for policy {self.name!r}")
        if not 0.0 <= self.evict_ratio < 1.0:
            raise ValueError(f"cache.evict_ratio={self.evict_ratio}: must be in [0, 1)")
        if self.sink_tokens and self.name != "sink":
            raise ValueError("cache.sink_tokens > 0 needs cache.policy=sink")

    @property
    def bounded(self) -> bool:
        return self.name != "full"

    @property
    def encodes_evicted(self) -> bool:
        return self.name == "pte"

    @property
    def uses_thought(self) -> bool:
        """The thought encoder's update is applied (``pte``, ``global_only``); other policies run the base model."""
        return self.name in ("pte", "global_only")

    @property
    def evict_tokens(self) -> int:
        """e: tokens evicted at once, at least one.

        The product is rounded to 9 decimals before flooring: ``0.29 * 100`` is 28.999999999999996 in binary.
        """
        return max(1, math.floor(round(self.evict_ratio * self.window, 9)))

    def evicted_before(self, u: int | torch.Tensor) -> int | torch.Tensor:
        """Stream tokens evicted before stream token ``u`` is appended (ints or a long tensor; 0 where u < W)."""
        w, e = self.window, self.evict_tokens
        if isinstance(u, torch.Tensor):
            return torch.where(u < w, 0, e * (torch.div(u - w, e, rounding_mode="floor") + 1))
        return 0 if u < w else e * ((u - w) // e + 1)

    def capacity(self, prompt_len: int, max_new_tokens: int) -> int:
        """Slots to preallocate for a batch with padded prompt length ``prompt_len``."""
        if not self.bounded:
            return prompt_len + max_new_tokens
        return prompt_len + self.sink_tokens + self.window


Eviction = tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]


class BoundedKVCache:
    """Preallocated per-layer K/V buffers with per-row positions and validity.

    Host-side bookkeeping (``_cols``, per-row pads and evicted counts) decides every eviction without
    reading the device, so decoding never synchronises on the cache.

    Args:
        num_layers: decoder layers of the model.
        policy: the eviction policy.
        prompt_len: P, the padded prompt length of this batch.
        capacity: slots to allocate per layer (``policy.capacity``).
    """

    def __init__(self, num_layers: int, policy: CachePolicy, prompt_len: int, capacity: int) -> None:
        self.policy, self.prompt_len, self.capacity = policy, prompt_len, capacity
        self.keys: list[torch.Tensor | None] = [None] * num_layers  # each [B, H, capacity, D]
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.pos: torch.Tensor | None = None  # [B, capacity] absolute rotary position, -1 where empty
        self.valid: torch.Tensor | None = None  # [B, capacity] slot may be attended
        self.keep_pos: torch.Tensor | None = None  # [B] K_b, positions below it are never evicted
        self.reset()

    def reset(self) -> None:
        """Forget every token but keep the allocated storage."""
        self.used = self.n_evictions = self.evicted_tokens = 0
        self.appended = 0  # columns ever appended; column g holds position g - pad_b in row b
        self._cols: list[int] = []  # appended column of each occupied slot, increasing
        self._pads: list[int] = []  # P - L_b per row
        self._keep: list[int] = []  # K_b per row
        self._done: list[int] = []  # stream tokens evicted per row
        self.keep_pos = None
        if self.valid is not None:
            self.valid.zero_()
            self.pos.fill_(-1)

    # -- Hugging Face cache interface -------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store the new K/V ``[B, H, q, D]`` after the kept slots and return all kept K/V for attention.

        With grad enabled (replay) the stored copy is detached, so a later chunk never backpropagates
        into an earlier one, while this forward still sees the live tensors. The returned K/V are then a new
        tensor, never a view of the buffer: attention may save them for a backward deferred past later
        chunks, which overwrite the buffer in place. Without grad (rollout) the view is returned, no copy.
        """
        q = key_states.shape[2]
        if self.used + q > self.capacity:
            raise RuntimeError(f"cache overflow: {self.used} + {q} tokens > capacity {self.capacity}")
        if self.keys[layer_idx] is None:
            b, h, _, d = key_states.shape
            shape = (b, h, self.capacity, d)
            self.keys[layer_idx] = key_states.new_zeros(shape)
            self.values[layer_idx] = value_states.new_zeros(shape)
        k_buf, v_buf = self.keys[layer_idx], self.values[layer_idx]
        end = self.used + q
        k_buf[:, :, self.used : end] = key_states.detach()
        v_buf[:, :, self.used : end] = value_states.detach()
        if torch.is_grad_enabled():
            return (
                torch.cat([k_buf[:, :, : self.used], key_states], dim=2),
                torch.cat([v_buf[:, :, : self.used], value_states], dim=2),
            )
        return k_buf[:, :, :end], v_buf[:, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.used

    # -- bookkeeping driven by the engine -----------------------------------------------------------
    def mask(self, q_pos: torch.Tensor, q_valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Additive attention mask ``[B, 1, q, used + q]`` for queries about to be appended.

        A query sees valid slots and valid new tokens at positions <= its own that its row's window still
        holds at that query (so a forward over many tokens, e.g. a prompt longer than the window, is a
        per-token sliding window). Each query also sees itself, so a pad query attends to something and
        never produces NaN (its output is never read).
        """
        b, q = q_pos.shape
        self._alloc_meta(b, q_pos.device)
        if self.keep_pos is None:
            self._init_rows(q_valid)
        k_pos = torch.cat([self.pos[:, : self.used], q_pos], dim=1)  # [B, used + q]
        k_valid = torch.cat([self.valid[:, : self.used], q_valid], dim=1)
        allowed = k_valid[:, None, :] & (k_pos[:, None, :] <= q_pos[:, :, None])  # [B, q, used + q]
        if self.policy.bounded and q > 1:  # one query: ``evict_due`` already left exactly its window valid
            keep = self.keep_pos[:, None]
            k_u, q_u = k_pos - keep, q_pos - keep  # stream indices, < 0 for kept tokens
            allowed &= (k_u < 0)[:, None, :] | (k_u[:, None, :] >= self.policy.evicted_before(q_u)[:, :, None])
        eye = torch.eye(q, dtype=torch.bool, device=q_pos.device)
        allowed[:, :, self.used :] |= eye
        out = torch.zeros(allowed.shape, dtype=dtype, device=q_pos.device)
        return out.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]

    def _init_rows(self, q_valid: torch.Tensor) -> None:
        """Learn each row's prompt length from the first forward, which starts with the padded prompt."""
        lengths = q_valid[:, : self.prompt_len].sum(1)  # [B]
        sinks = self.policy.sink_tokens
        self.keep_pos = lengths + sinks if self.policy.retain_prompt else torch.full_like(lengths, sinks)
        self._pads = [self.prompt_len - n for n in lengths.tolist()]  # the one device read per batch
        self._keep = self.keep_pos.tolist()
        self._done = [0] * len(self._pads)

    def _alloc_meta(self, batch: int, device: torch.device) -> None:
        if self.pos is None:
            self.pos = torch.full((batch, self.capacity), -1, dtype=torch.long, device=device)
            self.valid = torch.zeros((batch, self.capacity), dtype=torch.bool, device=device)

    def advance(self, q_pos: torch.Tensor, q_valid: torch.Tensor) -> None:
        """Record positions/validity of the ``q`` tokens the last forward stored."""
        q = q_pos.shape[1]
        self._alloc_meta(q_pos.shape[0], q_pos.device)
        self.pos[:, self.used : self.used + q] = q_pos
        self.valid[:, self.used : self.used + q] = q_valid
        self._cols.extend(range(self.appended, self.appended + q))
        self.used += q
        self.appended += q

    def evict_due(self) -> list[Eviction]:
        """Evict what each row's window must drop before the next column is appended, oldest first.

        Returns:
            One entry per eviction round: per-layer evicted keys and values ``[B, H, e, D]``, their positions
            ``[B, e]`` and the rows that evicted ``[B]`` (bool; other rows' entries are filler to ignore).
            A row may need several rounds at once (a prompt longer than the window); the thought encoder
            folds them in one at a time. Empty when nothing is due.
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
        if out:
            self._compact()
        return out

    def _evict_round(self, rows: list[bool], e: int) -> Eviction:
        """Take the oldest ``e`` stream tokens of every row in ``rows``; mark them invalid."""
        device = self.pos.device
        starts = []  # first slot of each row's evicted run (contiguous: every column between is held)
        for b, (pad, keep, done) in enumerate(zip(self._pads, self._keep, self._done, strict=True)):
            starts.append(bisect.bisect_left(self._cols, pad + keep + done) if rows[b] else 0)
            if rows[b]:
                self._done[b] += e
        mask = torch.tensor(rows, device=device)
        if all(rows) and len(set(starts)) == 1:  # synchronous eviction: one slice for every row
            s0 = starts[0]
            ev_k = [k[:, :, s0 : s0 + e].clone() for k in self.keys]
            ev_v = [v[:, :, s0 : s0 + e].clone() for v in self.values]
            ev_pos = self.pos[:, s0 : s0 + e].clone()
            self.valid[:, s0 : s0 + e] = False
        else:
            idx = torch.tensor(starts, device=device)[:, None] + torch.arange(e, device=device)  # [B, e]
            gather = idx[:, None, :, None]
            ev_k = [k.gather(2, gather.expand(-1, k.shape[1], -1, k.shape[3])) for k in self.keys]
            ev_v = [v.gather(2, gather.expand(-1, v.shape[1], -1, v.shape[3])) for v in self.values]
            ev_pos = self.pos.gather(1, idx)
            self.valid.scatter_(1, idx, self.valid.gather(1, idx) & ~mask[:, None])
        self.n_evictions += 1
        self.evicted_tokens += e * sum(rows)
        return ev_k, ev_v, ev_pos, mask

    def _compact(self) -> None:
        """Drop the slots no row holds any more (kept or still in its window), keeping the order."""
        rows = list(zip(self._pads, self._keep, self._done, strict=True))
        spans = {(pad, pad + keep) for pad, keep, _ in rows if keep > 0}  # kept columns of each row
        spans.add((min(pad + keep + done for pad, keep, done in rows), self.appended))  # every row's window
        live: list[int] = []
        for a, z in sorted(spans):  # slots of the union of spans, in order (self._cols is increasing)
            lo = max(bisect.bisect_left(self._cols, a), live[-1] + 1 if live else 0)
            live.extend(range(lo, bisect.bisect_left(self._cols, z)))
        n = len(live)
        if n == self.used:
            return
        idx = torch.tensor(live, device=self.pos.device)
        for buf in (*self.keys, *self.values):
            buf[:, :, :n] = buf[:, :, idx]
        for meta in (self.pos, self.valid):
            meta[:, :n] = meta[:, idx]
        self.pos[:, n : self.used] = -1
        self.valid[:, n : self.used] = False
        self._cols = [self._cols[i] for i in live]
        self.used = n

    def bytes_held(self) -> int:
        """Bytes of K/V in occupied slots (all layers, keys and values)."""
        k = self.keys[0]
        if k is None:
            return 0
        per_slot = k.shape[0] * k.shape[1] * k.shape[3] * k.element_size()
        return 2 * len(self.keys) * per_slot * self.used
