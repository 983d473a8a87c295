"""Cache policy D (method.md section 2): a preallocated KV store with a retained region and a thought window.

Notation: B batch rows, H kv heads, D head dim, P padded prompt length, W thought window, e tokens
evicted per eviction, L decoder layers.

Index-based layout: every layer's buffer ``[B, H, capacity, D]`` holds tokens in slots that are handed
out from a free list and given back on eviction; nothing is ever moved. ``order`` lists the occupied slots
in arrival order (shared by all rows, host side, so no device sync): its first ``keep`` entries (the
retained prompt, then the ``sink`` tokens) are never evicted, ``evict(n)`` frees the n oldest of the rest
(``evict_slots`` frees arbitrary ones, for importance-aware policies). Keys are stored after rotary
embedding, so every token keeps its absolute position; the slot order does not matter to attention, only
the mask built from ``pos``/``valid`` does. Single-token decode reads a preallocated additive mask
``[B, 1, 1, capacity]`` that eviction and appends keep current in place, so a decode step allocates no
mask. The object is passed to Hugging Face models as their cache (``update``/``get_seq_length``), so the
models run unpatched.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch

POLICIES = ("full", "window", "sink", "pte")


@dataclass(frozen=True)
class CachePolicy:
    """When and what to evict. ``pte`` evicts like ``window`` and hands the evicted K/V to the thought encoder.

    Args:
        name: one of ``full``, ``window``, ``sink``, ``pte``.
        window: W, thought tokens kept in the sliding window (ignored by ``full``).
        evict_ratio: fraction of W evicted in one chunk (paper: 0.25 training, 0.15 inference); 0 = one token.
        sink_tokens: first generated tokens that are never evicted (``sink`` only).
        retain_prompt: keep the prompt outside the window (paper). False puts the prompt inside the window,
            which reproduces a plain per-token sliding window.
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
    def evict_tokens(self) -> int:
        """e: tokens evicted at once, at least one.

        The product is rounded to 9 decimals before flooring: ``0.29 * 100`` is 28.999999999999996 in binary.
        """
        return max(1, math.floor(round(self.evict_ratio * self.window, 9)))

    def keep(self, prompt_len: int) -> int:
        """Slots [0, keep) that are never evicted."""
        return (prompt_len if self.retain_prompt else 0) + self.sink_tokens

    def capacity(self, prompt_len: int, max_new_tokens: int) -> int:
        """Slots to preallocate for a batch with padded prompt length ``prompt_len``."""
        if not self.bounded:
            return prompt_len + max_new_tokens
        return self.keep(prompt_len) + self.window

    def to_evict(self, used: int, prompt_len: int, incoming: int = 1) -> int:
        """Tokens to evict before ``incoming`` more are appended to ``used`` occupied slots."""
        if not self.bounded or used + incoming <= self.capacity(prompt_len, 0):
            return 0
        return self.evict_tokens


class BoundedKVCache:
    """Preallocated per-layer K/V buffers with per-row positions and validity, addressed by slot index.

    Args:
        num_layers: decoder layers of the model.
        policy: the eviction policy.
        prompt_len: P, the padded prompt length of this batch.
        capacity: slots to allocate per layer (``policy.capacity``).
        static: attend all ``capacity`` slots and index writes with a device tensor, so every decode step
            has the same shapes and no Python-int dependence (for ``torch.compile`` / CUDA graphs).
    """

    def __init__(
        self, num_layers: int, policy: CachePolicy, prompt_len: int, capacity: int, static: bool = False
    ) -> None:
        self.policy, self.prompt_len, self.capacity, self.static = policy, prompt_len, capacity, static
        self.keys: list[torch.Tensor | None] = [None] * num_layers  # each [B, H, capacity, D]
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.pos: torch.Tensor | None = None  # [B, capacity] absolute rotary position, -1 where empty
        self.valid: torch.Tensor | None = None  # [B, capacity] slot may be attended
        self.bias: torch.Tensor | None = None  # [B, 1, 1, capacity] additive mask of a one-token query
        self.reset()

    def reset(self) -> None:
        """Forget every token but keep the allocated storage."""
        self.order: list[int] = []  # occupied slots, oldest first
        self.free: deque[int] = deque(range(self.capacity))
        self.high = 0  # slots [0, high) have been written at least once: the attended span
        self.n_evictions = self.evicted_tokens = 0
        self._write: list[int] = []  # slots of the pending forward's tokens
        self._write_idx: torch.Tensor | None = None  # the same as a device tensor (static or scattered)
        self._live = False  # pending forward returns live K/V (grad) after the stored span
        if self.valid is not None:
            self.valid.zero_()
            self.pos.fill_(-1)
            self.bias.fill_(torch.finfo(self.bias.dtype).min)

    @property
    def used(self) -> int:
        """Occupied slots."""
        return len(self.order)

    @property
    def span(self) -> int:
        """Slots a forward attends: everything ever written (all of them in static mode)."""
        return self.capacity if self.static else self.high

    # -- Hugging Face cache interface -------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store the new K/V ``[B, H, q, D]`` in the slots ``mask`` chose and return the K/V to attend.

        Without grad the stored span itself is returned (views, no copy). With grad (replay) the stored
        copy is detached and the live tensors are appended after a copy of the stored span, so a later
        chunk never backpropagates into an earlier one, and no saved tensor aliases a buffer that a later
        eviction or write changes.
        """
        if self.keys[layer_idx] is None:
            b, h, _, d = key_states.shape
            self.keys[layer_idx] = key_states.new_zeros((b, h, self.capacity, d))
            self.values[layer_idx] = value_states.new_zeros((b, h, self.capacity, d))
        k_buf, v_buf = self.keys[layer_idx], self.values[layer_idx]
        self._store(k_buf, key_states.detach())
        self._store(v_buf, value_states.detach())
        if self._live:  # cat copies: the pending slots' stored copies are in the span but masked out
            k_span, v_span = k_buf[:, :, : self.span], v_buf[:, :, : self.span]
            return torch.cat([k_span, key_states], dim=2), torch.cat([v_span, value_states], dim=2)
        return k_buf[:, :, : self.span], v_buf[:, :, : self.span]

    def _store(self, buf: torch.Tensor, new: torch.Tensor) -> None:
        if self._write_idx is not None:
            buf.index_copy_(2, self._write_idx, new)
        else:
            buf[:, :, self._write[0] : self._write[0] + len(self._write)] = new

    def _set(self, meta: torch.Tensor, value: torch.Tensor | float) -> None:
        """Write ``value`` into the pending slots of a ``[B, capacity]`` or ``[B, 1, 1, capacity]`` tensor."""
        if self._write_idx is not None:
            meta[..., self._write_idx] = value
        else:
            meta[..., self._write[0] : self._write[0] + len(self._write)] = value

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.used

    # -- bookkeeping driven by the engine -----------------------------------------------------------
    def mask(self, q_pos: torch.Tensor, q_valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Choose slots for ``q`` queries about to be appended and return their additive attention mask.

        The mask is ``[B, 1, q, span]`` over the slots (plus ``q`` trailing columns for the live K/V when
        grad is enabled). A query sees valid stored slots and valid new tokens at positions <= its own, and
        always itself, so a pad query never produces NaN (its output is never read). A lone query without
        grad gets a view of the maintained bias: every stored token precedes it.
        """
        b, q = q_pos.shape
        self._alloc_meta(b, q_pos.device, dtype)
        if q > len(self.free):
            raise RuntimeError(f"cache overflow: {self.used} + {q} tokens > capacity {self.capacity}")
        self._write = [self.free.popleft() for _ in range(q)]
        self.high = max(self.high, max(self._write) + 1)
        self._live = torch.is_grad_enabled()
        self._write_idx = None
        if self.static and q == 1:
            self._write_idx = self._slot.fill_(self._write[0])
        elif self.static or self._write[-1] - self._write[0] != q - 1:  # static, or free slots wrap around
            self._write_idx = torch.tensor(self._write, device=q_pos.device)
        if q == 1 and not self._live:
            self.bias[:, 0, 0, self._write[0]] = 0.0
            return self.bias[..., : self.span]
        k_pos, k_valid = self.columns(q_pos, q_valid)
        allowed = k_valid[:, None, :] & (k_pos[:, None, :] <= q_pos[:, :, None])  # [B, q, columns]
        own = torch.tensor(self._write, device=q_pos.device)
        if self._live:
            own = torch.arange(self.span, self.span + q, device=q_pos.device)
        allowed[:, torch.arange(q, device=q_pos.device), own] = True
        out = torch.zeros(allowed.shape, dtype=dtype, device=q_pos.device)
        return out.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]

    def columns(self, q_pos: torch.Tensor, q_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions and validity ``[B, columns]`` of the keys the pending forward attends, in mask order."""
        k_pos, k_valid = self.pos[:, : self.span].clone(), self.valid[:, : self.span].clone()
        if self._live:
            return torch.cat([k_pos, q_pos], dim=1), torch.cat([k_valid, q_valid], dim=1)
        self._set(k_pos, q_pos)
        self._set(k_valid, q_valid)
        return k_pos, k_valid

    def _alloc_meta(self, batch: int, device: torch.device, dtype: torch.dtype) -> None:
        if self.pos is None:
            self.pos = torch.full((batch, self.capacity), -1, dtype=torch.long, device=device)
            self.valid = torch.zeros((batch, self.capacity), dtype=torch.bool, device=device)
            self.bias = torch.full((batch, 1, 1, self.capacity), torch.finfo(dtype).min, dtype=dtype, device=device)
            self._slot = torch.zeros(1, dtype=torch.long, device=device)  # static mode's one-token write index

    def advance(self, q_pos: torch.Tensor, q_valid: torch.Tensor) -> None:
        """Record positions/validity of the ``q`` tokens the last forward stored."""
        self._set(self.pos, q_pos)
        self._set(self.valid, q_valid)
        self._set(self.bias[:, 0, 0], torch.where(q_valid, 0.0, torch.finfo(self.bias.dtype).min).to(self.bias.dtype))
        self.order.extend(self._write)
        self._write, self._write_idx, self._live = [], None, False

    def evict(self, n: int) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Free the ``n`` oldest evictable tokens (FIFO, the paper's policy); see ``evict_slots``."""
        keep = self.policy.keep(self.prompt_len)
        if keep + n > self.used:
            raise RuntimeError(f"cannot evict {n} tokens: only {self.used - keep} evictable")
        return self.evict_slots(self.order[keep : keep + n])

    def evict_slots(self, slots: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Free the given occupied slots (same for every row); nothing else moves.

        Returns:
            Per-layer evicted keys and values ``[B, H, n, D]`` and positions ``[B, n]``, in arrival order.
        """
        gone = set(slots)
        slots = [s for s in self.order if s in gone]
        if len(slots) != len(gone):
            raise RuntimeError(f"cannot evict slots {sorted(gone - set(slots))}: not occupied")
        idx = torch.tensor(slots, device=self.pos.device)
        ev_k = [k.index_select(2, idx) for k in self.keys]
        ev_v = [v.index_select(2, idx) for v in self.values]
        ev_pos = self.pos.index_select(1, idx)
        self.pos[:, idx] = -1
        self.valid[:, idx] = False
        self.bias[:, 0, 0, idx] = torch.finfo(self.bias.dtype).min
        self.order = [s for s in self.order if s not in gone]
        self.free.extend(slots)
        self.n_evictions += 1
        self.evicted_tokens += len(slots)
        return ev_k, ev_v, ev_pos

    def bytes_held(self) -> int:
        """Bytes of K/V in occupied slots (all layers, keys and values)."""
        k = self.keys[0]
        if k is None:
            return 0
        per_slot = k.shape[0] * k.shape[1] * k.shape[3] * k.element_size()
        return 2 * len(self.keys) * per_slot * self.used
