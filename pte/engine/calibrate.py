"""Give the thought state a memory at initialisation: scale the global tokens so that one eviction moves the
normalised state by ``thought.init_move``.

``S <- N(S + S')`` shrinks an evicted token's term by every later increment: with moves near 100 % the state keeps
a token for a few evictions. How far an increment moves the state depends on the model's K/V scale, which the
equations leave unnormalised: with the global tokens at N(0, 1) one eviction moves the toy base's state by 40-97 %, an
evicted value is gone long before its recall, and SFT spends hundreds of steps near chance lengthening that memory
(docs/results.md, "Why SFT sat on the recall plateau"). The increment is linear in ``W_Q h_g`` and S_g is normalised
whatever its scale, so the move grows with the global tokens' scale, and each layer's scale is set by bisection.
Without Normalize (``normalize: none``) S_g is cubic in that scale and the move shrinks as it grows; the bisection
follows whichever way the move goes.

The move is measured on a simulated chain: evictions of ``m`` consecutive rows of the base model's own pre-rotary K and
V on sample text (the run's held-out prompts and worked solutions), folded in by the layer's own update. Sampled rows
stand in for generated thoughts, so a long eviction (the paper's 25 % of a 3K window) can be calibrated from short
prompts.
"""

from __future__ import annotations

import logging
import math
from functools import partial

import torch
from torch import nn
from transformers import PreTrainedModel

from pte.engine.encoder import decoder_layers, get_thought
from pte.engine.thought import LayerThought

log = logging.getLogger(__name__)

Rows = tuple[torch.Tensor, torch.Tensor]  # one layer's pre-rotary K and V rows [N, width] in text order


def kv_rows(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor) -> list[Rows]:
    """Per layer, the base model's pre-rotary K and V rows of the valid tokens of ``ids`` ``[B, T]`` (one forward,
    the update off); with ``evicted_context: pair`` each row beside its predecessor's (zeros before a sequence)."""
    encoder = get_thought(model)
    captured: dict[tuple[int, int], torch.Tensor] = {}
    hooks = [
        proj.register_forward_hook(lambda _m, _i, out, key=(i, j): captured.__setitem__(key, out.detach().float()))
        for i, projs in enumerate(encoder.projections)
        for j, proj in enumerate(projs[1:])
    ]
    enabled, encoder.store.enabled = encoder.store.enabled, False
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask.long(), use_cache=False)
    finally:
        encoder.store.enabled = enabled
        for h in hooks:
            h.remove()
    out = []
    for i in range(len(decoder_layers(model))):
        k, v = captured[(i, 0)], captured[(i, 1)]  # [B, T, kv]
        if encoder.cfg.evicted_context == "pair":
            before = nn.functional.pad(mask, (1, 0))[:, :-1, None]  # [B, T, 1]: the previous column holds a token
            k, v = (torch.cat([x, nn.functional.pad(x, (0, 0, 1, 0))[:, :-1] * before], dim=-1) for x in (k, v))
        out.append((k[mask], v[mask]))
    return out


def simulated_move(layer: LayerThought, proj: tuple[nn.Module, ...], rows: Rows, m: int, starts: list[int]) -> float:
    """Median relative change ``||S_new - S|| / ||S||`` of the state over evictions of ``m`` consecutive rows from
    each of ``starts`` in turn, the first eviction (from S_g) left out."""
    k, v = rows
    wrap = torch.arange(m)
    s = layer.initial_state(proj, 1)  # [1, G, r]
    moves = []
    for start in starts:
        at = (start + wrap) % k.shape[0]
        new = layer.update(s, proj[0], k[at][None], v[at][None])
        moves.append(float((new - s).norm() / s.norm()))
        s = new
    return float(torch.tensor(moves[1:]).median())


def _scaled_move(
    layer: LayerThought,
    proj: tuple[nn.Module, ...],
    rows: Rows,
    m: int,
    starts: list[int],
    tokens: torch.Tensor,
    log_factor: float,
) -> float:
    """``simulated_move`` with the layer's global tokens set to ``tokens`` x exp(``log_factor``)."""
    layer.global_tokens.copy_(tokens * math.exp(log_factor))
    return simulated_move(layer, proj, rows, m, starts)


def calibrate(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, target: float, m: int) -> list[float]:
    """Scale each layer's global tokens so that an eviction of ``m`` tokens moves its state by ``target``.

    Returns the factors applied per layer. Draws nothing from the global random generators.
    """
    encoder = get_thought(model)
    rows = kv_rows(model, ids, mask)
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, rows[0][0].shape[0], (13,), generator=gen).tolist()
    factors = []
    with torch.no_grad():
        for layer, proj, layer_rows in zip(encoder.layers, encoder.projections, rows):
            tokens = layer.global_tokens.detach().clone()
            move = partial(_scaled_move, layer, proj, layer_rows, m, starts, tokens)
            lo, hi = math.log(1e-4), math.log(1e4)  # log of the factor
            grows = move(hi) >= move(lo)  # normalised: S fixed in norm, S' linear in the scale; `none`: S_g is cubic
            for _ in range(40):
                mid = (lo + hi) / 2
                if (move(mid) < target) == grows:
                    lo = mid
                else:
                    hi = mid
            reached = move((lo + hi) / 2)  # leaves the global tokens at the chosen scale
            factors.append(math.exp((lo + hi) / 2))
            if not target / 2 < reached < 2 * target:  # the move saturates, or the factor hit the search's bounds
                log.warning("thought.init_move=%s: layer %d reaches %.3g at most", target, len(factors) - 1, reached)
    return factors
