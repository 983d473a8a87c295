"""Cache policy D (method.md section 2): a preallocated KV store with a retained region and a thought window.

Notation: B batch rows, H kv heads, D head dim, P padded prompt length, W thought window, e tokens
evicted per eviction, L decoder layers.

Slot layout of every layer's buffer ``[B, H, capacity, D]``:
    [0, P)                 retained prompt, left padded (pads are invalid slots, never attended)
    [P, P + sinks)         the first ``sink_tokens`` generated tokens (``sink`` policy), never evicted
    [P + sinks, used)      thought tokens in generation order; the oldest ``e`` leave at each eviction
Keys are stored after rotary embedding, so every token keeps its absolute position for good; the slot
order does not matter to attention, only the explicit mask built from ``pos``/``valid`` does.
The object is passed to Hugging Face models as their cache (``update``/``get_seq_length``), so the
models run unpatched.
"""

from __future__ import annotations

import math
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
    """Preallocated per-layer K/V buffers with per-row positions and validity.

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
        self.used = 0
        self.n_evictions = 0
        self.evicted_tokens = 0

    def reset(self) -> None:
        """Forget every token but keep the allocated storage."""
        self.used = self.n_evictions = self.evicted_tokens = 0
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

        A query sees valid kept slots and valid new tokens at positions <= its own. Each query also sees
        itself, so a pad query attends to something and never produces NaN (its output is never read).
        """
        b, q = q_pos.shape
        self._alloc_meta(b, q_pos.device)
        k_pos = torch.cat([self.pos[:, : self.used], q_pos], dim=1)  # [B, used + q]
        k_valid = torch.cat([self.valid[:, : self.used], q_valid], dim=1)
        allowed = k_valid[:, None, :] & (k_pos[:, None, :] <= q_pos[:, :, None])  # [B, q, used + q]
        eye = torch.eye(q, dtype=torch.bool, device=q_pos.device)
        allowed[:, :, self.used :] |= eye
        out = torch.zeros(allowed.shape, dtype=dtype, device=q_pos.device)
        return out.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]

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
        self.used += q

    def evict(self, n: int) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Drop the ``n`` oldest evictable tokens and compact the window.

        Returns:
            Per-layer evicted keys and values ``[B, H, n, D]`` and their positions ``[B, n]``.
        """
        start = self.policy.keep(self.prompt_len)
        end = start + n
        if end > self.used:
            raise RuntimeError(f"cannot evict {n} tokens: only {self.used - start} evictable")
        ev_k = [k[:, :, start:end].clone() for k in self.keys]
        ev_v = [v[:, :, start:end].clone() for v in self.values]
        ev_pos = self.pos[:, start:end].clone()
        rest = self.used - end
        for buf in (*self.keys, *self.values):
            buf[:, :, start : start + rest] = buf[:, :, end : self.used].clone()
        for meta in (self.pos, self.valid):
            meta[:, start : start + rest] = meta[:, end : self.used].clone()
        self.pos[:, start + rest : self.used] = -1
        self.valid[:, start + rest : self.used] = False
        self.used -= n
        self.n_evictions += 1
        self.evicted_tokens += n
        return ev_k, ev_v, ev_pos

    def bytes_held(self) -> int:
        """Bytes of K/V in occupied slots (all layers, keys and values)."""
        k = self.keys[0]
        if k is None:
            return 0
        per_slot = k.shape[0] * k.shape[1] * k.shape[3] * k.element_size()
        return 2 * len(self.keys) * per_slot * self.used
