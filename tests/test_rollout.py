"""Rollout under every cache policy: parity with Hugging Face, batch invariance, masks and memory."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch

import pte.engine.forward
import pte.engine.rollout
from pte.engine.cache import CachePolicy
from pte.engine.encoder import get_thought
from pte.engine.generate import encode_prompts
from pte.engine.noise import RowNoise
from pte.engine.replay import full_replay
from pte.engine.rollout import DRAW_BLOCK, Rollout, SamplingConfig, draw, rollout
from tests.helpers import PROMPTS, run, tiny, tiny_pte


def hf_greedy(model, ids, steps: int, **kwargs):
    """Hugging Face's own greedy decoding with its default cache, no EOS, keeping every step's logits."""
    return model.generate(
        ids,
        max_new_tokens=steps,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        output_logits=True,
        return_dict_in_generate=True,
        **kwargs,
    )


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_full_policy_matches_hf_generate(family):
    model, tok = tiny(family)
    ids, mask = encode_prompts(tok, PROMPTS)
    hf = hf_greedy(model, ids, 40, attention_mask=mask.long())
    ours = run(model, tok, PROMPTS, CachePolicy("full"), 40, keep_logits=True)
    assert torch.equal(ours.response_ids, hf.sequences[:, ids.shape[1] :])
    torch.testing.assert_close(ours.logits, torch.stack(hf.logits, 1).float(), atol=1e-4, rtol=0)


def test_per_token_window_matches_qwen2_native_sliding_window():
    w = 24
    model, tok = tiny("qwen2", use_sliding_window=True, sliding_window=w, max_window_layers=0)
    prompt = ["Hi"]
    ids, _mask = encode_prompts(tok, prompt)
    assert ids.shape[1] < w
    hf = hf_greedy(model, ids, 60)
    policy = CachePolicy("window", window=w, evict_ratio=0.0, retain_prompt=False)
    ours = run(model, tok, prompt, policy, 60, keep_logits=True)
    assert len(ours.evict_before) > 20
    assert torch.equal(ours.response_ids, hf.sequences[:, ids.shape[1] :])
    torch.testing.assert_close(ours.logits, torch.stack(hf.logits, 1).float(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("retain", [True, False])
@pytest.mark.parametrize("kind", ["window", "pte", "sink", "global_only"])
def test_batch_invariance_through_evictions(kind, retain):
    """A row's tokens and log-probs are the same alone or batched; without a retained prompt, prompts of 21, 42 and
    31 tokens run under an 8-token window, each row's window over its own tokens."""
    model, tok = tiny_pte() if kind in ("pte", "global_only") else tiny()
    sinks = 2 if kind == "sink" else 0
    policy = CachePolicy(kind, window=8, evict_ratio=0.25, sink_tokens=sinks, retain_prompt=retain)
    batch = run(model, tok, PROMPTS, policy, 30)
    assert len(batch.evict_before) >= 3
    for i, prompt in enumerate(PROMPTS):
        alone = run(model, tok, [prompt], policy, 30)
        assert torch.equal(batch.response_ids[i], alone.response_ids[0])
        torch.testing.assert_close(batch.logprobs[i], alone.logprobs[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["full", "window", "pte"])
def test_finished_rows_leave_the_batch(kind):
    """EOS ends the longest-prompt row early: it leaves the cache at the next stop check, every row's tokens and
    log-probs equal its run alone, and in the end the cache holds exactly the slots of the rows left."""
    model, tok = tiny_pte() if kind == "pte" else tiny()
    policy = CachePolicy(kind, window=8, evict_ratio=0.25)
    free = run(model, tok, PROMPTS, policy, 40).response_ids
    # EOS: row 1's (42 prompt tokens) earliest token that row 0 never generates, so row 0 runs to the end
    eos = [next(int(x) for x in free[1] if x not in free[0])]
    ro = run(model, tok, PROMPTS, policy, 40, eos=eos)
    assert ro.response_mask[0].all() and ro.held_rows[0] == 3 and ro.held_rows[-1] < 3, ro.held_rows
    assert all(a >= b for a, b in itertools.pairwise(ro.held_rows))
    for i, prompt in enumerate(PROMPTS):
        alone = run(model, tok, [prompt], policy, 40, eos=eos)
        n = int(alone.response_mask.sum())
        assert torch.equal(ro.response_ids[i, :n], alone.response_ids[0, :n])
        torch.testing.assert_close(ro.logprobs[i, :n], alone.logprobs[0, :n], atol=1e-4, rtol=0)
    stay = [p for p, m in zip(PROMPTS, ro.response_mask[:, -1]) if m]  # the rows left in the cache at the end
    rest = run(model, tok, stay, policy, 40, eos=eos)
    assert ro.used_slots[-1] == rest.used_slots[-1] and ro.kv_bytes[-1] == rest.kv_bytes[-1]
    if kind == "pte":
        torch.testing.assert_close(full_replay(model, ro) * ro.response_mask, ro.logprobs, atol=1e-4, rtol=0)


def test_rows_stay_in_the_batch_under_per_row_eviction():
    """Without a retained prompt rows evict at their own steps, which replay needs from every row: no row leaves."""
    model, tok = tiny()
    policy = CachePolicy("window", window=8, evict_ratio=0.25, retain_prompt=False)
    free = run(model, tok, PROMPTS, policy, 24).response_ids
    ro = run(model, tok, PROMPTS, policy, 24, eos=[next(int(x) for x in free[1] if x not in free[0])])
    assert ro.response_mask[0].all() and not ro.response_mask[1].all() and ro.held_rows == [3] * 24


def test_positions_masks_and_retained_prompt(monkeypatch):
    """Record every forward: positions rise per row, no query sees a later key or a pad, prompts stay."""
    model, tok = tiny_pte()
    calls = []
    real_mask, real_evict = pte.engine.cache.BoundedKVCache.mask, pte.engine.cache.BoundedKVCache.evict_due

    def spy_mask(self, q_pos, q_valid, dtype, more=False):
        out = real_mask(self, q_pos, q_valid, dtype, more)
        k_pos, k_valid = self.columns(q_pos, q_valid)  # the keys this forward attends, in mask order
        calls.append((q_pos.clone(), q_valid.clone(), k_pos.clone(), k_valid.clone(), out[:, 0] == 0))
        return out

    evicted = []

    def spy_evict(self):
        out = real_evict(self)
        evicted.extend(pos.clone() for _k, _v, pos, _rows in out)
        return out

    monkeypatch.setattr(pte.engine.cache.BoundedKVCache, "mask", spy_mask)
    monkeypatch.setattr(pte.engine.cache.BoundedKVCache, "evict_due", spy_evict)
    ro = run(model, tok, PROMPTS, CachePolicy("pte", window=8, evict_ratio=0.25), 30)
    lengths = ro.prompt_mask.sum(1)
    last = torch.full((len(PROMPTS),), -1)
    for q_pos, q_valid, k_pos, k_valid, allowed in calls:
        real_q = torch.where(q_valid, q_pos, -1)
        assert (real_q.max(1).values > last).all()
        last = real_q.max(1).values
        seen = allowed & q_valid[:, :, None]  # [B, q, kv] for real queries
        assert not (seen & ~k_valid[:, None, :]).any(), "a pad or empty slot was attended"
        assert not (seen & (k_pos[:, None, :] > q_pos[:, :, None])).any(), "a query saw a later key"
    assert len(evicted) >= 3
    for pos in evicted:
        assert (pos >= lengths[:, None]).all(), "a real prompt token was evicted"


def test_pte_at_init_equals_window():
    model, tok = tiny_pte(random_a=False)
    window = run(model, tok, PROMPTS, CachePolicy("window", window=8), 30)
    ours = run(model, tok, PROMPTS, CachePolicy("pte", window=8), 30)
    assert len(ours.evict_before) >= 3
    assert torch.equal(ours.response_ids, window.response_ids)
    assert torch.equal(ours.logprobs, window.logprobs)


def test_rollout_decodes_in_inference_mode_and_hands_back_normal_tensors(monkeypatch):
    """Decoding skips autograd's bookkeeping (inference mode), samples what no_grad samples, and its tensors leave
    inference mode, so replay may save them for backward."""
    model, tok = tiny_pte(random_a=True)
    modes, forward = [], pte.engine.rollout.forward_tokens

    def spy(*args, **kwargs):
        modes.append(torch.is_inference_mode_enabled())
        return forward(*args, **kwargs)

    monkeypatch.setattr(pte.engine.rollout, "forward_tokens", spy)
    ro = run(model, tok, PROMPTS, CachePolicy("pte", window=8), 16, temperature=1.0)
    assert modes and all(modes)
    tensors = [v for v in vars(ro).values() if isinstance(v, torch.Tensor)]
    assert len(tensors) >= 6 and not any(t.is_inference() for t in tensors)
    ids, mask = encode_prompts(tok, PROMPTS)
    sampling, gen = SamplingConfig(temperature=1.0, max_new_tokens=16), torch.Generator().manual_seed(0)
    plain = torch.no_grad()(rollout.__wrapped__)(
        model, ids, mask, CachePolicy("pte", window=8), sampling, [], tok.pad_token_id, gen
    )
    assert torch.equal(plain.response_ids, ro.response_ids) and torch.equal(plain.logprobs, ro.logprobs)


def test_thought_state_changes_outputs_once_a_is_nonzero():
    model, tok = tiny_pte(random_a=True)
    window = run(model, tok, PROMPTS, CachePolicy("window", window=8), 30)
    ours = run(model, tok, PROMPTS, CachePolicy("pte", window=8), 30)
    assert not torch.allclose(ours.logprobs, window.logprobs)


def test_eos_stops_rows_and_masks_the_rest():
    model, tok = tiny()
    ro = run(model, tok, PROMPTS, CachePolicy("window", window=8), 40, eos=list(range(10, 60)), temperature=1.0)
    lengths = ro.response_mask.sum(1)
    assert lengths.min() < ro.response_ids.shape[1]
    for row, n in enumerate(lengths.tolist()):
        assert ro.response_mask[row, :n].all() and not ro.response_mask[row, n:].any()
        assert (ro.response_ids[row, n:] == tok.pad_token_id).all()
        assert (ro.logprobs[row, n:] == 0).all()


@pytest.mark.parametrize("kind", ["full", "window", "pte"])
def test_kv_bytes_flat_under_bounded_policies(kind):
    model, tok = tiny_pte(random_a=False)
    ro = run(model, tok, ["Hi"], CachePolicy(kind, window=64, evict_ratio=0.25), 2048)
    kv = ro.kv_bytes
    assert len(kv) == 2048
    if kind == "full":
        steps = kv[1:] - kv[:-1]
        assert torch.all(steps == steps[0]) and steps[0] > 0, "full cache must grow by one slot per token"
    else:
        first = ro.evict_before[0] + 1
        held = kv[first:]
        assert held.max() == held.min() + (ro.policy.evict_tokens - 1) * ro.slot_bytes
        assert held[-64:].max() == held[64:128].max()
        assert held.max() < kv.new_tensor(2048 * ro.slot_bytes) / 10


def test_prompt_longer_than_window_matches_qwen2_native_sliding_window():
    w = 6
    model, tok = tiny("qwen2", use_sliding_window=True, sliding_window=w, max_window_layers=0)
    prompt = [PROMPTS[1]]
    ids, _mask = encode_prompts(tok, prompt)
    assert ids.shape[1] > 3 * w
    hf = hf_greedy(model, ids, 30)
    policy = CachePolicy("window", window=w, evict_ratio=0.0, retain_prompt=False)
    ours = run(model, tok, prompt, policy, 30, keep_logits=True)
    assert torch.equal(ours.response_ids, hf.sequences[:, ids.shape[1] :])
    torch.testing.assert_close(ours.logits, torch.stack(hf.logits, 1).float(), atol=1e-4, rtol=0)


def test_pads_never_enter_window_state_or_sinks(monkeypatch):
    """Every evicted entry of an evicting row is a real token of that row, and sinks are never evicted."""
    model, tok = tiny_pte()
    evicted = []
    real_evict = pte.engine.cache.BoundedKVCache.evict_due

    def spy_evict(self):
        out = real_evict(self)
        evicted.extend((pos.clone(), rows.clone()) for _k, _v, pos, rows in out)
        return out

    monkeypatch.setattr(pte.engine.cache.BoundedKVCache, "evict_due", spy_evict)
    policy = CachePolicy("sink", window=8, evict_ratio=0.25, sink_tokens=2, retain_prompt=False)
    run(model, tok, PROMPTS, policy, 30)
    seen = [[] for _ in PROMPTS]
    for pos, rows in evicted:
        for b in rows.nonzero().flatten().tolist():
            seen[b].extend(pos[b].tolist())
    for b, got in enumerate(seen):
        assert got == list(range(2, 2 + len(got))), f"row {b} evicted {got}: pads, sinks or out of order"


@pytest.mark.parametrize("kind", ["full", "window", "sink"])
def test_pte_checkpoint_under_plain_policies_is_the_base_model(kind):
    model, tok = tiny_pte(random_a=True)
    base, _ = tiny()
    base.requires_grad_(False)  # frozen like the PTE model's base: on AVX-512 CPUs torch's linear on a strided input
    # (the LM head's last-position slice) takes another kernel when the weight requires grad, which moves the last bit
    policy = CachePolicy(kind, window=8, evict_ratio=0.25, sink_tokens=2 if kind == "sink" else 0)
    ours = run(model, tok, PROMPTS, policy, 30)
    ref = run(base, tok, PROMPTS, policy, 30)
    assert torch.equal(ours.response_ids, ref.response_ids)
    assert torch.equal(ours.logprobs, ref.logprobs)


def test_global_only_applies_initial_state_and_never_absorbs(monkeypatch):
    model, tok = tiny_pte(random_a=True)
    wide = CachePolicy("pte", window=64)  # no eviction: pte runs on S_g only, as global_only always does
    assert torch.equal(
        run(model, tok, PROMPTS, wide, 30).logprobs,
        run(model, tok, PROMPTS, replace(wide, name="global_only"), 30).logprobs,
    )
    calls = []
    monkeypatch.setattr(type(get_thought(model)), "absorb", lambda self, *a: calls.append(a))
    ablation = run(model, tok, PROMPTS, CachePolicy("global_only", window=8), 30)
    window = run(model, tok, PROMPTS, CachePolicy("window", window=8), 30)
    assert len(ablation.evict_before) >= 3 and not calls
    assert not torch.equal(ablation.logprobs, window.logprobs), "S_g must modulate the weights"


@pytest.mark.parametrize("window", [8, 24])
def test_sink_batch_invariance_when_windows_and_sinks_interleave(window):
    """With W=24 the 42-token row's window still covers the columns where shorter rows keep their sinks."""
    model, tok = tiny_pte()
    policy = CachePolicy("sink", window=window, evict_ratio=0.25, sink_tokens=2, retain_prompt=False)
    batch = run(model, tok, PROMPTS, policy, 30)
    for i, prompt in enumerate(PROMPTS):
        alone = run(model, tok, [prompt], policy, 30)
        assert torch.equal(batch.response_ids[i], alone.response_ids[0])
        torch.testing.assert_close(batch.logprobs[i], alone.logprobs[0], atol=1e-4, rtol=0)


def uniforms(rows: int) -> torch.Tensor:
    return RowNoise.draw(torch.Generator().manual_seed(0), rows, 1, "cpu").uniforms()[:, 0]


def test_draw_follows_the_probabilities_and_never_picks_zero_mass():
    probs = torch.tensor([[0.0, 0.2, 0.0, 0.5, 0.3, 0.0]]).repeat(20000, 1)
    tokens = draw(probs, uniforms(len(probs)))
    freq = torch.bincount(tokens, minlength=6).double() / len(tokens)
    assert (freq[probs[0] == 0] == 0).all()
    torch.testing.assert_close(freq, probs[0].double(), atol=0.015, rtol=0)


def test_draw_across_blocks_hits_block_edges_and_skips_empty_blocks():
    """Mass on the first and last entry of blocks, whole blocks empty, a vocabulary that is no multiple of a block."""
    v = 3 * DRAW_BLOCK + 5
    probs = torch.zeros(v)
    hot = {0: 0.1, DRAW_BLOCK - 1: 0.2, DRAW_BLOCK: 0.3, 3 * DRAW_BLOCK + 4: 0.4}  # block 2 is empty
    for i, p in hot.items():
        probs[i] = p
    tokens = draw(probs.repeat(20000, 1), uniforms(20000))
    freq = torch.bincount(tokens, minlength=v).double() / len(tokens)
    assert set(tokens.unique().tolist()) == set(hot)
    torch.testing.assert_close(freq, probs.double(), atol=0.015, rtol=0)


def test_compiled_decode_matches_eager():
    """rollout.compile on a CPU: the compiled decode steps (fixed-shape cache) give the eager tokens and log-probs."""
    model, tok = tiny_pte()
    policy = CachePolicy("pte", window=8, evict_ratio=0.25)
    eager = run(model, tok, PROMPTS, policy, 24)
    ids, mask = encode_prompts(tok, PROMPTS)
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=24, compile=True)
    ours = rollout(model, ids, mask, policy, sampling, [], tok.pad_token_id)
    assert len(ours.evict_before) >= 3
    assert torch.equal(ours.response_ids, eager.response_ids)
    torch.testing.assert_close(ours.logprobs, eager.logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("kind", "retain"), [("pte", True), ("window", False), ("full", True)])
def test_prefill_runs_once_per_group_and_changes_no_output(kind, retain, monkeypatch):
    """Two groups of three samples: the prompt's forward holds one row per distinct prompt, and every row's sampled
    tokens and log-probs equal its run alone with its own stream (whose prompt forward is its own). Without a
    retained prompt the 42-token prompt is longer than the 8-token window, so rows evict right after the prompt."""
    model, tok = tiny_pte() if kind == "pte" else tiny()
    policy = CachePolicy(kind, window=8, evict_ratio=0.25, retain_prompt=retain)
    prompts = [PROMPTS[1]] * 3 + [PROMPTS[2]] * 3
    ids, mask = encode_prompts(tok, prompts)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=30)
    noise = RowNoise.draw(torch.Generator().manual_seed(0), len(prompts), 30, "cpu")
    widths = []
    real_forward = pte.engine.rollout.forward_tokens
    monkeypatch.setattr(
        pte.engine.rollout, "forward_tokens", lambda m, c, i, *a: widths.append(i.shape) or real_forward(m, c, i, *a)
    )
    batch = rollout(model, ids, mask, policy, sampling, [], tok.pad_token_id, noise=noise)
    assert widths[0] == (2, ids.shape[1]) and set(widths[1:]) == {(6, 1)}
    assert len(set(map(tuple, batch.response_ids.tolist()))) == 6, "each sample draws its own tokens"
    for b in range(len(prompts)):
        alone = rollout(
            model, ids[b : b + 1], mask[b : b + 1], policy, sampling, [], tok.pad_token_id, noise=noise[b : b + 1]
        )
        assert torch.equal(batch.response_ids[b], alone.response_ids[0])
        torch.testing.assert_close(batch.logprobs[b], alone.logprobs[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(full_replay(model, batch) * batch.response_mask, batch.logprobs, atol=1e-4, rtol=0)


def test_kv_held_per_sequence_does_not_depend_on_how_many_rows_finish_early():
    """kv_bytes_held / rows is the cache a sequence holds at the end, even when most rows left the batch before it."""

    def stats(held: list[int]) -> dict:
        ro = Rollout(
            prompt_ids=torch.zeros(4, 3, dtype=torch.long),
            prompt_mask=torch.ones(4, 3, dtype=torch.bool),
            response_ids=torch.zeros(4, 5, dtype=torch.long),
            response_mask=torch.ones(4, 5, dtype=torch.bool),
            logprobs=torch.zeros(4, 5),
            truncated=torch.zeros(4, dtype=torch.bool),
            policy=CachePolicy("window", 2),
            temperature=1.0,
            used_slots=[4, 5, 5, 5, 5],
            held_rows=held,
            slot_bytes=10,
        )
        return ro.stats()

    assert stats([4] * 5)["kv_bytes_held"] == stats([4, 4, 1, 1, 1])["kv_bytes_held"] == 5 * 10 * 4
    assert stats([4, 4, 1, 1, 1])["kv_bytes_peak"] == 5 * 10 * 4
