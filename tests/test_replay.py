"""Chunked replay reproduces the rollout exactly and trains only the PTE parameters."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from pte.engine.cache import CachePolicy
from pte.engine.encoder import get_thought, load_thought, save_thought
from pte.engine.replay import full_replay, reference_logprobs, replay
from tests.helpers import PROMPTS, THOUGHT, run, tiny, tiny_pte

EOS = list(range(40, 44))  # a few characters: rows stop at different steps


@pytest.mark.parametrize("family,context", [("qwen2", "token"), ("llama", "token"), ("llama", "pair")])
def test_replay_logprobs_equal_rollout(family, context):
    model, tok = tiny_pte(family, thought=dataclasses.replace(THOUGHT, evicted_context=context))
    ro = run(model, tok, PROMPTS, CachePolicy("pte", window=8, evict_ratio=0.25), 40, eos=EOS, temperature=1.0, seed=0)
    lengths = ro.response_mask.sum(1)
    assert len(ro.evict_before) >= 3
    assert lengths.min() < lengths.max(), "rows must stop at different steps"
    replayed = full_replay(model, ro)
    assert replayed.shape == ro.logprobs.shape
    torch.testing.assert_close(replayed[ro.response_mask], ro.logprobs[ro.response_mask], atol=1e-4, rtol=0)


def test_replay_chunks_cover_response_once():
    model, tok = tiny_pte()
    ro = run(model, tok, PROMPTS, CachePolicy("pte", window=8, evict_ratio=0.25), 30)
    chunks = list(replay(model, ro))
    assert len(chunks) == len(ro.evict_before) + 1
    assert chunks[0].start == 0 and chunks[-1].stop == ro.response_ids.shape[1]
    assert all(a.stop == b.start for a, b in itertools.pairwise(chunks))
    assert all(c.logprobs.shape[1] <= 8 + 1 for c in chunks), "a chunk is bounded by the window"


def test_reference_uses_full_cache_and_no_adapter():
    model, tok = tiny_pte()
    ro = run(model, tok, PROMPTS, CachePolicy("pte", window=8), 30)
    base, _ = tiny()
    with torch.no_grad():
        chunks = list(replay(base, ro, full_cache=True))
    assert len(chunks) == 1
    ref = reference_logprobs(model, ro)
    torch.testing.assert_close(ref, chunks[0].logprobs, atol=1e-5, rtol=0)
    assert not torch.allclose(ref, ro.logprobs, atol=1e-3)
    assert get_thought(model).store.enabled


def test_last_chunk_loss_trains_only_pte_parameters():
    model, tok = tiny_pte(random_a=False)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    kinds = {"global_tokens", "lat_q", "lat_k", "lat_v", "lr_a", "lr_b"}
    assert {n.split(".")[-1] if "lat_" not in n else n.split(".")[-2] for n in trainable} == kinds
    ro = run(model, tok, PROMPTS, CachePolicy("pte", window=8), 30)
    opt = torch.optim.Adam(trainable.values(), lr=1e-2)
    for step in range(2):  # step 0 makes A non-zero; step 1 must reach every PTE parameter
        opt.zero_grad()
        *_, last = replay(model, ro)
        (-last.logprobs.mean()).backward()
        if step == 0:
            opt.step()
    for name, p in trainable.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_adapter_roundtrip(tmp_path):
    model, tok = tiny_pte()
    save_thought(model, tmp_path)
    fresh, _ = tiny()
    load_thought(fresh, tmp_path)
    assert get_thought(fresh).cfg == get_thought(model).cfg
    policy = CachePolicy("pte", window=8)
    assert torch.equal(run(fresh, tok, PROMPTS, policy, 20).logprobs, run(model, tok, PROMPTS, policy, 20).logprobs)


@pytest.mark.parametrize("kind,context", [("pte", "token"), ("pte", "pair"), ("sink", "token")])
def test_replay_equals_rollout_without_retained_prompt(kind, context):
    """Rows evict at their own steps (prompts of 21, 42 and 31 tokens, window 8): replay cuts at all of them."""
    model, tok = tiny_pte(thought=dataclasses.replace(THOUGHT, evicted_context=context))
    policy = CachePolicy(kind, window=8, evict_ratio=0.25, sink_tokens=2 if kind == "sink" else 0, retain_prompt=False)
    ro = run(model, tok, PROMPTS, policy, 40, eos=EOS, temperature=1.0, seed=0)
    assert len(ro.evict_before) >= 6
    replayed = full_replay(model, ro)
    torch.testing.assert_close(replayed[ro.response_mask], ro.logprobs[ro.response_mask], atol=1e-4, rtol=0)


def test_replay_of_pte_rollout_without_encoder_says_so():
    model, tok = tiny_pte()
    ro = run(model, tok, PROMPTS, CachePolicy("pte", window=8), 20)
    base, _ = tiny()
    with pytest.raises(ValueError, match="no thought encoder"):
        full_replay(base, ro)


@pytest.mark.parametrize("retain", [True, False])
def test_replay_equals_rollout_when_slots_wrap(retain):
    """W=10, e=3: freed slots come back out of order, so later chunks land in scattered slots; replay with grad (live
    K/V after the stored ones) and without still reproduces the rollout's log-probs."""
    model, tok = tiny_pte()
    policy = CachePolicy("pte", window=10, evict_ratio=0.3, retain_prompt=retain)
    ro = run(model, tok, PROMPTS, policy, 50, temperature=1.0, seed=0)
    assert len(ro.evict_before) >= 10
    live = torch.cat([c.logprobs.detach() for c in replay(model, ro)], dim=1)
    for replayed in (full_replay(model, ro), live):
        torch.testing.assert_close(replayed[ro.response_mask], ro.logprobs[ro.response_mask], atol=1e-4, rtol=0)
