"""The thought state's scale: every eviction, not only the first, must be able to move the state."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest
import torch

from pte.engine.cache import CachePolicy
from pte.engine.calibrate import calibrate
from pte.engine.encoder import attach_thought, get_thought
from pte.engine.generate import encode_prompts
from pte.engine.thought import LayerThought, ThoughtConfig
from pte.training.module import lr_factor
from tests.helpers import PROMPTS, run, tiny


def _relative_moves(init_std: float, init_move: float | None = None, normalize: str = "rms") -> list[float]:
    """|S_k - S_{k-1}| / |S_{k-1}| of layer 0 at each eviction of a pte rollout (S_0 = S_g); with ``init_move`` the
    global tokens are first calibrated for it on the prompts' K/V.

    The tiny model's weights get a trained model's scale (std 1/sqrt(hidden), activations of order one), not Hugging
    Face's 0.02 init, under which every K/V, and so every increment, is tiny.
    """
    model, tok = tiny("llama", initializer_range=64**-0.5)
    attach_thought(model, ThoughtConfig(rank=4, global_tokens=3, alpha=8.0, init_std=init_std, normalize=normalize))
    policy = CachePolicy("pte", window=8, evict_ratio=0.25)
    if init_move is not None:
        calibrate(model, *encode_prompts(tok, PROMPTS), init_move, policy.evict_tokens)
    encoder = get_thought(model)
    absorb, moves = encoder.absorb, []

    def recording(*args, **kwargs) -> None:
        before = encoder.store.states[0].clone()
        absorb(*args, **kwargs)
        moves.append(float((encoder.store.states[0] - before).norm() / before.norm()))

    encoder.absorb = recording
    run(model, tok, PROMPTS[:2], policy, steps=40)
    return moves


def test_later_evictions_move_the_default_state():
    moves = _relative_moves(ThoughtConfig().init_std)
    assert len(moves) >= 8
    assert min(moves[2:]) > 0.05, moves  # the third eviction on still changes the state by more than 5 %


def test_tiny_global_tokens_let_the_first_eviction_own_the_state():
    """The trap the default avoids: S_g below the Normalize epsilon, so later evictions barely register."""
    moves = _relative_moves(0.02)
    assert moves[0] > 10 and max(moves[2:]) < 0.02, moves


@pytest.mark.parametrize("init_std", [0.02, 1.0, 50.0])
@pytest.mark.parametrize("init_move", [0.05, 0.3])
def test_calibrated_global_tokens_move_the_state_by_init_move(init_std, init_move):
    """Whatever scale the global tokens start at (the trap above included), calibration on the prompts' K/V sets how far
    each later eviction of a rollout moves the state."""
    later = sorted(_relative_moves(init_std, init_move)[1:])
    assert init_move / 2 < later[len(later) // 2] < init_move * 2, later


@pytest.mark.parametrize("init_std", [0.02, 1.0, 50.0])
def test_calibration_without_normalize_moves_the_state_by_init_move(init_std):
    """Without Normalize S_g is cubic in the global tokens' scale and an increment linear in it, so the move shrinks as
    the scale grows: the search must go the other way (it went to its bounds, and training to NaN at the second step)."""
    later = sorted(_relative_moves(init_std, 0.15, normalize="none")[1:])
    assert 0.075 < later[len(later) // 2] < 0.3, later


def test_calibration_warns_when_a_layer_cannot_reach_the_move(caplog):
    """A normalised state of fixed norm moves by at most 2x its norm: asking for 3 must name every layer it misses."""
    model, tok = tiny("llama", initializer_range=64**-0.5)
    attach_thought(model, ThoughtConfig(rank=4, global_tokens=3, alpha=8.0))
    with caplog.at_level("WARNING", logger="pte.engine.calibrate"):
        factors = calibrate(model, *encode_prompts(tok, PROMPTS), 3.0, 2)
    warned = [r.getMessage() for r in caplog.records if "reaches" in r.getMessage()]
    assert len(warned) == len(factors) == len(get_thought(model).layers), warned


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_lr_factor_warms_up_then_follows_the_schedule(schedule):
    f = [lr_factor(4, 20, schedule, s) for s in range(25)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    if schedule == "constant":
        assert f[4:] == [1.0] * 21
    else:
        assert f[4] == 1.0 and math.isclose(f[20], 0.1) and f[24] == f[20]
        assert all(a >= b for a, b in itertools.pairwise(f[4:]))


def test_bad_schedule_names_the_key():
    from pte.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="optim.schedule"):
        load_config("configs/tiny.yaml", ["optim.schedule=linear"])


def _layer(how: str) -> LayerThought:
    """One layer's thought parameters under state scale ``how`` (d_model = q_dim = 8, kv_dim = 4, r = 4, G = 3)."""
    return LayerThought(ThoughtConfig(rank=4, global_tokens=3, state_scale=how), d_model=8, q_dim=8, kv_dim=4)


@pytest.mark.parametrize(("how", "factor"), [("mean", 0.5), ("sum", 1.0)])
def test_state_scale_weighs_an_eviction_of_two_tokens(how, factor):
    """``mean`` averages the evicted tokens' terms (one token moves the state as far as many); ``sum`` adds them."""
    torch.manual_seed(0)
    layer = _layer(how)
    q_lat = torch.randn(3, 4)
    k, v = torch.randn(1, 2, 4), torch.randn(1, 2, 4)
    singles = layer._increment(q_lat, k[:, :1], v[:, :1]) + layer._increment(q_lat, k[:, 1:], v[:, 1:])
    torch.testing.assert_close(layer._increment(q_lat, k, v), factor * singles)


@torch.no_grad()
def test_sum_scale_leaves_nearly_the_same_state_however_a_trace_is_cut():
    """Two tokens evicted one at a time or together: ``sum`` ends near the same state, ``mean`` does not."""
    torch.manual_seed(0)
    k, v = 0.3 * torch.randn(1, 2, 4), 0.3 * torch.randn(1, 2, 4)  # [B, m, kv_dim]
    q_proj, k_proj, v_proj = (torch.nn.Linear(8, n, bias=False) for n in (8, 4, 4))  # frozen base projections
    gap = {}
    for how in ("mean", "sum"):
        torch.manual_seed(1)  # the same thought parameters for both
        layer = _layer(how)
        s0 = layer.initial_state((q_proj, k_proj, v_proj), batch=1)
        apart = layer.update(layer.update(s0, q_proj, k[:, :1], v[:, :1]), q_proj, k[:, 1:], v[:, 1:])
        gap[how] = float((apart - layer.update(s0, q_proj, k, v)).norm() / s0.norm())
    assert gap["sum"] < 0.25 * gap["mean"], gap


def test_pair_context_folds_each_evicted_token_beside_its_predecessor():
    """Evictions of two tokens: both rows, then row 0 alone, then row 1 alone (the same K/V as row 0's second). Each K/V row of the increment is the
    token's own row then its predecessor's (zeros before the first), carried across evictions per row."""
    model, _ = tiny("llama", initializer_range=64**-0.5)
    cfg = ThoughtConfig(rank=4, global_tokens=3, alpha=8.0, evicted_keys="post_rope", evicted_context="pair")
    encoder = attach_thought(model, cfg)
    encoder.begin(2)
    layers = len(encoder.layers)
    gen = torch.Generator().manual_seed(0)
    heads, dim = model.config.num_key_value_heads, model.config.hidden_size // model.config.num_attention_heads
    kv = [[torch.randn(2, heads, 2, dim, generator=gen) for _ in range(layers)] for _ in range(4)]  # k1, v1, k2, v2
    both, first = torch.tensor([True, True]), torch.tensor([True, False])
    expected = [s.clone() for s in encoder.store.states]
    encoder.absorb(kv[0], kv[1], torch.tensor([[5, 6], [5, 6]]), both)
    encoder.absorb(kv[2], kv[3], torch.tensor([[7, 8], [7, 8]]), first)
    encoder.absorb(kv[2], kv[3], torch.tensor([[9, 10], [7, 8]]), ~first)  # row 1 now: after its own first eviction

    def flat(x):
        return x.transpose(1, 2).flatten(2)  # [B, m, H_kv*D]

    for i, lt in enumerate(encoder.layers):
        q = encoder._proj[i][0]
        k1, v1, k2, v2 = (flat(x[i]) for x in kv)
        zero = torch.zeros_like(k1[:, :1])
        s1 = lt.update(expected[i], q, *(torch.cat([x, torch.cat([zero, x[:, :1]], 1)], -1) for x in (k1, v1)))
        s2 = lt.update(
            s1, q, *(torch.cat([b, torch.cat([a[:, 1:], b[:, :1]], 1)], -1) for a, b in ((k1, k2), (v1, v2)))
        )
        torch.testing.assert_close(encoder.store.states[i], torch.stack([s2[0], s2[1]]))
    token = attach_thought(tiny("llama", initializer_range=64**-0.5)[0], replace(cfg, evicted_context="token"))
    assert encoder.layers[0].lat_k.in_features == 2 * token.layers[0].lat_k.in_features


def test_write_gate_starts_open_and_can_shut_a_token_out():
    """At init the gate weighs every term by 1 (the ungated increment, so an untrained gated adapter is the paper's);
    shut on one token, that token's term leaves the increment; its parameters get a gradient."""
    torch.manual_seed(0)
    q_lat = torch.randn(3, 4)
    k, v = torch.randn(1, 3, 4), torch.randn(1, 3, 4)  # [B, m, kv_dim]
    torch.manual_seed(1)
    plain = _layer("sum")
    torch.manual_seed(1)
    gated = LayerThought(ThoughtConfig(rank=4, global_tokens=3, state_scale="sum", write_gate=True), 8, 8, 4)
    assert plain.gate is None
    torch.testing.assert_close(gated._increment(q_lat, k, v), plain._increment(q_lat, k, v), rtol=0, atol=0)
    top, second = k[0, :, 0].topk(2).values
    with torch.no_grad():  # g = 2 sigmoid(1e4 (threshold - K[0])): 0 on the largest K[0], 2 on the others
        gated.gate.weight.zero_()
        gated.gate.weight[0, 0] = -1e4
        gated.gate.bias.fill_(1e4 * float(top + second) / 2)
    shut = int(k[0, :, 0].argmax())
    rest = [t for t in range(3) if t != shut]
    torch.testing.assert_close(gated._increment(q_lat, k, v), 2 * plain._increment(q_lat, k[:, rest], v[:, rest]))
    gated.gate.weight.data.zero_()
    gated.gate.bias.data.zero_()
    gated._increment(q_lat, k, v).square().sum().backward()
    assert gated.gate.weight.grad.abs().sum() > 0 and gated.gate.bias.grad.abs() > 0
