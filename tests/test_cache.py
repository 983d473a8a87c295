"""The bounded cache on its own: exact eviction sizes and tensors that later chunks cannot overwrite."""

from __future__ import annotations

import pytest
import torch

from pte.cache import BoundedKVCache, CachePolicy
from pte.encoder import attach_thought
from pte.forward import forward_tokens
from pte.generate import encode_prompts
from pte.replay import replay
from pte.rollout import prompt_positions
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


ROPES = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "longrope": {
        "rope_type": "longrope",
        "short_factor": [1.0 + i / 8 for i in range(8)],
        "long_factor": [2.0] * 8,
        "factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
}


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("rope", sorted(ROPES))
def test_pre_rope_keys_undo_every_rope_type_exactly(rope, family):
    """Un-rotated layer-0 keys equal k_proj of the normed embeddings (the keys before any rotation)."""
    model, tok = tiny(family, rope_parameters={**ROPES[rope], "rope_theta": 10000.0}, max_position_embeddings=256)
    encoder = attach_thought(model, ThoughtConfig(rank=4, global_tokens=3))
    encoder.store.enabled = False  # the base model
    ids, mask = encode_prompts(tok, PROMPTS)
    policy = CachePolicy("full")
    cache = BoundedKVCache(2, policy, ids.shape[1], policy.capacity(ids.shape[1], 0))
    with torch.no_grad():
        forward_tokens(model, cache, ids, prompt_positions(mask), mask)
        layer = model.model.layers[0]
        expected = layer.self_attn.k_proj.base(layer.input_layernorm(model.model.embed_tokens(ids)))
        got = encoder.pre_rope_keys([cache.keys[0]], cache.pos)[0]  # [B, H, P, D]
    b, h, p, d = got.shape
    got = got.transpose(1, 2).reshape(b, p, h * d)
    torch.testing.assert_close(got[mask], expected[mask], atol=1e-5, rtol=1e-5)
