"""Cache policy D (docs/method.md section 2): when a bounded cache evicts, and what it keeps.

The token model (kept prompt, evictable stream, synchronous or per-row eviction) is described in pte/engine/cache.py,
which applies a policy to its slots.
"""

from __future__ import annotations

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
