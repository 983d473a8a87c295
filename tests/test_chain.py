"""The exact gradient through the state chain (thought.state_grad=chain) and the teacher-forced SFT replay."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pte.engine.cache import CachePolicy
from pte.engine.encoder import get_thought
from pte.engine.replay import full_replay, replay
from pte.training.sft import eviction_schedule
from tests.helpers import PROMPTS, run, tiny_pte


def _weighted_chunks(model, ro, weights, backward) -> None:
    for chunk in replay(model, ro):
        backward((chunk.logprobs * weights[:, chunk.start : chunk.stop]).sum())


def _grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return out


def _setup(state_grad: str):
    model, tok = tiny_pte()
    enc = get_thought(model)
    enc.cfg = dataclasses.replace(enc.cfg, state_grad=state_grad)
    ro = run(model, tok, PROMPTS, CachePolicy("pte", window=8, evict_ratio=0.25), 40, temperature=1.0)
    weights = torch.randn(ro.response_ids.shape, generator=torch.Generator().manual_seed(3))
    return model, ro, weights


def test_chain_gradient_equals_unchunked_autograd():
    """Per-chunk backward + one chain backward == autograd of the summed losses with the state never detached."""
    model, ro, weights = _setup("chain")
    assert len(ro.evict_before) >= 4
    _weighted_chunks(model, ro, weights, lambda loss: loss.backward())
    chain = _grads(model)

    model_ref, _, _ = _setup("detach")
    enc = get_thought(model_ref)
    enc.detach_states = lambda: None  # keep the whole state graph; earlier chunks' K/V stay detached in the cache
    losses: list[torch.Tensor] = []
    _weighted_chunks(model_ref, ro, weights, losses.append)
    torch.autograd.backward(losses)
    ref = _grads(model_ref)
    assert chain.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(chain[name], ref[name], atol=1e-5, rtol=1e-4, msg=name)


def test_detach_truncates_what_chain_keeps():
    """The two modes differ exactly on the parameters that write the state (else the chain test proves nothing)."""
    model, ro, weights = _setup("chain")
    _weighted_chunks(model, ro, weights, lambda loss: loss.backward())
    chain = _grads(model)
    get_thought(model).cfg = dataclasses.replace(get_thought(model).cfg, state_grad="detach")
    _weighted_chunks(model, ro, weights, lambda loss: loss.backward())
    detach = _grads(model)
    writers = [n for n in chain if "pte_thought" in n]
    readers = [n for n in chain if n.endswith(("lr_a", "lr_b"))]
    assert writers and readers
    assert all(not torch.allclose(chain[n], detach[n], atol=1e-6) for n in writers)
    for n in readers:  # A and B read the state in each chunk: their gradient does not go through the chain
        torch.testing.assert_close(chain[n], detach[n], atol=1e-6, rtol=1e-5)


def test_chain_refuses_deferred_backward():
    model, ro, weights = _setup("chain")
    with pytest.raises(RuntimeError, match="state_grad=chain"):
        _weighted_chunks(model, ro, weights, lambda loss: None)


def test_chain_replay_log_probs_unchanged():
    model, ro, _ = _setup("chain")
    torch.testing.assert_close(
        full_replay(model, ro)[ro.response_mask], ro.logprobs[ro.response_mask], atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("window,ratio,retain", [(8, 0.25, True), (5, 0.0, True), (16, 0.5, True), (6, 0.25, False)])
def test_teacher_forced_schedule_matches_rollout(window, ratio, retain):
    model, tok = tiny_pte()
    policy = CachePolicy("window", window=window, evict_ratio=ratio, retain_prompt=retain)
    ro = run(model, tok, PROMPTS, policy, 37)
    assert ro.evict_before
    assert eviction_schedule(policy, ro.prompt_mask, 37) == ro.evict_before
