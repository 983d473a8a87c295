"""``replay.*`` bounds the training pass's memory by design and changes no log-prob and no gradient (method.md §4)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

import pte.engine.replay
from pte.config import ConfigError, ReplayCfg, load_config
from pte.engine.cache import CachePolicy
from pte.engine.encoder import attach_thought, decoder_layers, get_thought
from pte.engine.forward import output_head
from pte.engine.generate import encode_prompts
from pte.engine.replay import reference_logprobs, replay, replay_all
from pte.engine.rollout import Rollout
from pte.models.tiny import tiny_model, tiny_tokenizer
from pte.training.memory import TensorPeak
from pte.training.sft import eviction_schedule, sft_update, teacher_forced
from tests.helpers import PROMPTS, THOUGHT, run, tiny, tiny_pte

EOS = list(range(40, 44))  # rows stop at different steps
BASE = ReplayCfg(micro_batch=0, max_chunk_tokens=0, logits_chunk=0, checkpointing=False)
KNOBS = {
    "micro_batch": ReplayCfg(micro_batch=1, logits_chunk=0),
    "chunk_cap": ReplayCfg(max_chunk_tokens=5, logits_chunk=0),
    "logits_chunk": ReplayCfg(logits_chunk=7),
    "checkpointing": ReplayCfg(logits_chunk=0, checkpointing=True),
    "all": ReplayCfg(micro_batch=2, max_chunk_tokens=4, logits_chunk=5, checkpointing=True),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _lora(policy: str):
    """A tiny peft LoRA model (random B, so that A learns too) and its rollout under ``policy``."""
    model, tok = tiny()
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8.0, lora_dropout=0.0, target_modules=TARGETS))
    gen = torch.Generator().manual_seed(2)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.1
    return model, tok, CachePolicy(policy, window=8, evict_ratio=0.25)


def _pte(state_grad: str = "detach"):
    """A tiny PTE model with A ~ N(0, 0.01) (see :func:`_setup`)."""
    model, tok = tiny_pte()
    enc = get_thought(model)
    enc.cfg = dataclasses.replace(enc.cfg, state_grad=state_grad)
    for name, p in model.named_parameters():
        if name.endswith("lr_a"):
            p.data *= 0.2
    return model, tok


def _setup(kind: str):
    """``pte-detach``, ``pte-chain``, ``lora`` (full cache) or ``lora_c`` (window): model, rollout, loss weights.

    Positive loss weights and a moderate A keep the float32 rounding of the gradient itself near 1e-6 (measured
    against float64). With signed weights and A ~ N(0, 0.25) the terms cancel, and the float32 gradient of the plain
    replay is 2e-3 off the float64 one, whatever the knobs.
    """
    if kind.startswith("pte"):
        model, tok = _pte(kind.split("-")[1])
        policy = CachePolicy("pte", window=8, evict_ratio=0.25)
    else:
        model, tok, policy = _lora("full" if kind == "lora" else "window")
    eos = EOS if kind.startswith("pte") else []  # the LoRA models sample these early: every row would stop
    ro = run(model, tok, PROMPTS, policy, 40, eos=eos, temperature=1.0, seed=0)
    weights = torch.rand(ro.response_ids.shape, generator=torch.Generator().manual_seed(3)) * ro.response_mask
    return model, ro, weights


def _replayed(model, ro: Rollout, weights: torch.Tensor, limits: ReplayCfg):
    """Log-probs ``[B, T]`` and the gradient of sum(weights x log-probs), each chunk backpropagated at once."""
    logp = torch.zeros_like(ro.logprobs)
    for _, chunk in replay_all(model, [ro], lambda loss: loss.backward(), limits):
        logp[chunk.at] = chunk.logprobs.detach()
        (chunk.logprobs * weights[chunk.at]).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    model.zero_grad()
    return logp, grads


@pytest.mark.parametrize("knob", sorted(KNOBS))
@pytest.mark.parametrize("kind", ["pte-detach", "pte-chain", "lora", "lora_c"])
def test_knobs_change_no_logprob_and_no_gradient(kind, knob):
    model, ro, weights = _setup(kind)
    assert kind == "lora" or len(ro.evict_before) >= 3
    mask = ro.response_mask
    base_logp, base_grads = _replayed(model, ro, weights, BASE)
    logp, grads = _replayed(model, ro, weights, KNOBS[knob])
    torch.testing.assert_close(logp[mask], base_logp[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(logp[mask], ro.logprobs[mask], atol=1e-4, rtol=0)
    assert grads.keys() == base_grads.keys() and len(grads) > 0
    for name, g in base_grads.items():
        torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("knob", sorted(KNOBS))
def test_reference_logprobs_unchanged_by_knobs(knob):
    model, ro, _ = _setup("pte-detach")
    mask = ro.response_mask
    ref = reference_logprobs(model, ro, KNOBS[knob])
    torch.testing.assert_close(ref[mask], reference_logprobs(model, ro, BASE)[mask], atol=1e-5, rtol=0)


def test_sft_gradient_unchanged_by_knobs():
    cfg = load_config("configs/tiny.yaml", ["cache.window=6"])
    model, tok = _pte()
    ro = teacher_forced(tok, PROMPTS, ["1 2 3 4 5 6 7 8 9", "12", "a b c d e f g h i j k"], cfg, "pte", "cpu")
    assert len(ro.evict_before) >= 2
    grads = []
    for limits in (BASE, KNOBS["all"]):
        sft_update(model, [ro], lambda loss: loss.backward(), limits)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        model.zero_grad()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-5, rtol=1e-5, msg=name)


def test_knobs_take_effect(monkeypatch):
    """The cap splits forwards, the head runs in pieces, checkpointing reruns every layer once, blocks hold 2 rows."""
    model, ro, weights = _setup("pte-detach")
    limits = KNOBS["all"]
    widths, head_rows, layer_calls = [], [], []
    real = pte.engine.replay.forward_hidden

    def spy(model, cache, ids, *args, **kwargs):
        widths.append(ids.shape)
        return real(model, cache, ids, *args, **kwargs)

    monkeypatch.setattr(pte.engine.replay, "forward_hidden", spy)
    hooks = [output_head(model).register_forward_hook(lambda m, a, out: head_rows.append(a[0].shape[0]))]
    hooks += [l.mlp.register_forward_pre_hook(lambda m, a: layer_calls.append(1)) for l in decoder_layers(model)]
    _replayed(model, ro, weights, limits)
    forwards = len(widths)
    for h in hooks:
        h.remove()
    assert max(w[1] for w in widths) == limits.max_chunk_tokens and max(w[0] for w in widths) == limits.micro_batch
    assert max(head_rows) == limits.logits_chunk
    assert len(layer_calls) == 2 * forwards * len(decoder_layers(model))  # forward + rerun (a pre-hook: the rerun
    # stops once it has rebuilt what the backward needs, inside the MLP)


def test_checkpointing_refuses_a_backward_after_the_next_chunk():
    model, ro, _ = _setup("pte-detach")
    chunks = list(replay(model, ro, limits=KNOBS["checkpointing"]))  # every graph kept: evictions happened since
    with pytest.raises(RuntimeError, match="replay.checkpointing"):
        torch.stack([c.logprobs.sum() for c in chunks]).sum().backward()


def test_chunk_cap_is_refused_under_fsdp():
    with pytest.raises(ConfigError, match="replay.max_chunk_tokens"):
        load_config("configs/tiny.yaml", ["trainer.strategy=fsdp", "replay.max_chunk_tokens=8"])


# --- memory: flat in vocabulary, response length and rows at fixed bounds ----------------------------------------


def _synthetic(rows: int, t: int) -> Rollout:
    """``rows`` prompts (PROMPTS repeated) with random ``t``-token responses under a 32-token PTE window."""
    tok = tiny_tokenizer()
    ids, mask = encode_prompts(tok, (PROMPTS * rows)[:rows])
    policy = CachePolicy("pte", window=32, evict_ratio=0.25)
    resp = torch.randint(4, len(tok), (rows, t), generator=torch.Generator().manual_seed(1))
    ones = torch.ones_like(resp, dtype=torch.bool)
    return Rollout(
        ids, mask, resp, ones, torch.zeros(rows, t), torch.zeros(rows, dtype=torch.bool), policy, 1.0,
        eviction_schedule(policy, mask, t),
    )  # fmt: skip


def _replay_peak(vocab: int, rows: int, t: int, limits: ReplayCfg) -> tuple[int, int]:
    """Peak tensor bytes of a whole replay with each chunk's backward, and the LM head's weight bytes."""
    model = tiny_model("qwen2", vocab)
    attach_thought(model, THOUGHT)
    ro = _synthetic(rows, t)
    with TensorPeak() as peak:
        for _, chunk in replay_all(model, [ro], lambda loss: loss.backward(), limits):
            chunk.logprobs.sum().backward()
    head = output_head(model).weight
    return peak.peak, head.numel() * head.element_size()


def test_replay_peak_is_flat_in_vocabulary_response_length_and_rows():
    """At V = 256, 1024 and T = 64, 256 and 6, 24 rows (micro-batch 6, 8 positions per head piece), the peak is that
    of one chunk's activations. Before the bounds the replay built [rows, tokens, V] float32 logits: +2.4 MB at 4V,
    and all 24 rows at once: 4x."""
    limits = ReplayCfg(micro_batch=6, logits_chunk=8)
    base, head = _replay_peak(256, 6, 64, limits)
    wide, wide_head = _replay_peak(1024, 6, 64, limits)
    long, _ = _replay_peak(256, 6, 256, limits)
    rows, _ = _replay_peak(256, 24, 64, limits)
    assert abs(wide - base) <= (wide_head - head) + 16 * 1024, (base, wide)
    assert abs(long - base) <= 0.02 * base, (base, long)
    assert abs(rows - base) <= 0.02 * base, (base, rows)


def test_checkpointing_and_chunk_cap_lower_the_peak():
    plain, _ = _replay_peak(256, 6, 64, ReplayCfg(logits_chunk=8))
    ckpt, _ = _replay_peak(256, 6, 64, ReplayCfg(logits_chunk=8, checkpointing=True))
    capped, _ = _replay_peak(256, 6, 64, ReplayCfg(logits_chunk=8, checkpointing=True, max_chunk_tokens=16))
    assert capped < 0.8 * ckpt < 0.8 * plain, (plain, ckpt, capped)


def test_entropy_is_finite_when_a_logit_is_minus_inf():
    """A vocabulary entry the head masks to -inf has p = 0 and adds 0 to the entropy (-(p log p) would give NaN)."""
    from pte.engine.logprobs import _piece

    head = torch.nn.Linear(4, 5, bias=False)
    mask = torch.tensor([0.0, 0.0, 0.0, float("-inf"), 0.0])
    logp, entropy = _piece(lambda h: head(h) + mask, torch.randn(3, 4), torch.tensor([0, 1, 2]), 1.0)
    assert torch.isfinite(entropy).all() and torch.isfinite(logp).all()
    _, uniform = _piece(lambda h: torch.zeros(1, 5) + mask, torch.zeros(1, 4), torch.tensor([0]), 1.0)
    assert torch.allclose(uniform, torch.tensor([math.log(4)]))  # uniform over the 4 live entries
