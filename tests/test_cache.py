"""The bounded cache on its own: exact eviction sizes and tensors that later chunks cannot overwrite."""

from __future__ import annotations

import pytest
import torch

from pte.engine.cache import BoundedKVCache, CachePolicy
from pte.engine.encoder import attach_thought
from pte.engine.forward import forward_hidden, forward_tokens, output_head
from pte.engine.generate import encode_prompts
from pte.engine.replay import replay
from pte.engine.rollout import new_cache, prompt_positions
from pte.engine.thought import ThoughtConfig
from pte.training.memory import TensorPeak
from tests.helpers import PROMPTS, run, tiny, tiny_pte


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


@pytest.mark.parametrize(("window", "ratio"), [(8, 0.25), (10, 0.3)])  # 10 % 3 != 0: evicted slots wrap around
@pytest.mark.parametrize("retain", [True, False])
def test_eviction_moves_nothing_and_hands_over_the_stored_kv(monkeypatch, retain, window, ratio):
    """Through every eviction the held tokens keep their slots and K/V, and each evicted entry of an evicting row is
    the K/V stored for that row's token at that position, in position order (rows evict apart without retain)."""
    model, tok = tiny_pte()
    real, rounds = BoundedKVCache.evict_due, []

    def spy(self):
        keys, pos, valid = [k.clone() for k in self.keys], self.pos.clone(), self.valid.clone()
        out = real(self)
        held = self.valid  # [B, capacity]
        assert not (held & ~valid).any() and torch.equal(self.pos[held], pos[held])
        for now, then in zip(self.keys, keys):
            assert torch.equal(now.transpose(1, 2)[held], then.transpose(1, 2)[held])  # [n, H, D]
        for ev_k, _ev_v, ev_pos, rows in out:
            for b in rows.nonzero().flatten().tolist():
                assert (ev_pos[b].diff() > 0).all()
                slots = [int(((pos[b] == p) & valid[b]).nonzero()) for p in ev_pos[b].tolist()]
                for layer, then in zip(ev_k, keys):
                    assert torch.equal(layer[b], then[b][:, slots])  # [H, e, D]
            rounds.append(rows.all().item())
        return out

    monkeypatch.setattr(BoundedKVCache, "evict_due", spy)
    run(model, tok, PROMPTS, CachePolicy("pte", window=window, evict_ratio=ratio, retain_prompt=retain), 40)
    assert len(rounds) >= 3 and all(rounds) == retain


def test_select_rows_copies_one_layer_at_a_time():
    """Dropping finished rows holds at most one layer's kept keys beyond the cache (not a second cache), and keeps
    exactly the kept rows' K/V."""
    model, tok = tiny(num_hidden_layers=4)
    ids, mask = encode_prompts(tok, PROMPTS * 2)  # 6 rows
    cache = new_cache(model, CachePolicy("window", window=8), ids.shape[1], 8)
    with torch.no_grad():
        forward_tokens(model, cache, ids, prompt_positions(mask), mask)
    rows = [0, 2, 3, 5]
    before = [k[rows].clone() for k in cache.keys]
    layer = before[0].numel() * before[0].element_size()  # one layer's kept keys
    held = sum(t.numel() * t.element_size() for t in (*cache.keys, *cache.values))
    with TensorPeak() as peak:  # on CPU only blocks allocated inside the block report their release: copy them in
        cache.keys, cache.values = [k.clone() for k in cache.keys], [v.clone() for v in cache.values]
        cache.select_rows(rows)
    assert peak.peak <= held + layer + 4096, (peak.peak, held, layer)
    assert all(torch.equal(k, b) for k, b in zip(cache.keys, before))


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_hidden_states_through_the_head_are_the_logits(family):
    """The replay's path (final hidden states taken at the LM head's input, the head applied after) gives the logits
    the model's own forward gives, to the bit."""
    model, tok = tiny(family)
    ids, mask = encode_prompts(tok, PROMPTS)
    policy, p = CachePolicy("full"), ids.shape[1]
    with torch.no_grad():
        caches = [BoundedKVCache(2, policy, p, policy.capacity(p, 0)) for _ in range(2)]
        logits = forward_tokens(model, caches[0], ids, prompt_positions(mask), mask, logits_from=5)
        hidden = forward_hidden(model, caches[1], ids, prompt_positions(mask), mask, hidden_from=5)
        assert torch.equal(output_head(model)(hidden).float(), logits)
        assert torch.equal(caches[0].keys[1], caches[1].keys[1])
