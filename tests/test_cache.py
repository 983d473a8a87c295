"""The bounded cache on its own: exact eviction sizes and tensors that later chunks cannot overwrite."""

from __future__ import annotations

import pytest
import torch

from pte.cache import CachePolicy
from pte.encoder import attach_thought
from pte.replay import replay
from pte.thought import ThoughtConfig
from tests.helpers import PROMPTS, run, tiny


@pytest.mark.parametrize(("ratio", "window", "expected"), [(0.29, 100, 29), (0.15, 20, 3), (0.1, 30, 3), (0.25, 8, 2)])
def test_evict_tokens_is_exact_for_decimal_ratios(ratio, window, expected):
    assert CachePolicy("window", window=window, evict_ratio=ratio).evict_tokens == expected


@pytest.mark.parametrize("targets", [("o_proj",), ("q_proj",)])
def test_backward_deferred_over_chunks_when_kv_carry_no_parameter(targets):
    """Layer 0's K/V need no grad here, so the cache must not hand attention a buffer the next chunk overwrites."""
    model, tok = tiny(num_key_value_heads=4)  # multi-head: attention keeps the cache's K/V as given
    attach_thought(model, ThoughtConfig(rank=4, global_tokens=3, alpha=8.0, target_modules=targets))
    ro = run(model, tok, PROMPTS, CachePolicy("pte", window=8, evict_ratio=0.25), 30)
    chunks = list(replay(model, ro))  # every chunk's graph kept alive: one backward at the end
    assert len(chunks) >= 3
    torch.stack([c.logprobs.sum() for c in chunks]).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
