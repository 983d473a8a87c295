"""One forward pass of a Hugging Face causal LM through the bounded cache.

The only place that knows Hugging Face calling conventions: the cache keyword (``cache=`` from
transformers 5.24, ``past_key_values=`` before), explicit per-row ``position_ids`` and an explicit 4D
additive mask, which Qwen2 and Llama take as-is, so the models run unpatched.
"""

from __future__ import annotations

import inspect
from functools import cache

import torch
from torch import nn
from transformers import PreTrainedModel

from pte.cache import BoundedKVCache
from pte.encoder import unwrap


@cache
def _cache_kwarg(model_cls: type) -> str:
    params = inspect.signature(model_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def compiled(model: PreTrainedModel) -> nn.Module:
    """``model`` under ``torch.compile(mode="reduce-overhead")`` for fixed-shape decode steps, built once and kept.

    Kept outside the module tree (in ``__dict__``), so the compiled twin is neither a submodule nor saved.
    """
    twin = model.__dict__.get("_pte_compiled")
    if twin is None:
        twin = torch.compile(model, mode="reduce-overhead", dynamic=False, fullgraph=False)
        model.__dict__["_pte_compiled"] = twin
    return twin


def forward_tokens(
    model: PreTrainedModel,
    cache: BoundedKVCache,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    logits_from: int = 0,
) -> torch.Tensor:
    """Run ``input_ids`` ``[B, q]`` at absolute ``positions`` ``[B, q]``, append them to ``cache``.

    Args:
        valid: ``[B, q]`` False for pad tokens, which no query may attend.
        logits_from: return logits only for query positions ``>= logits_from`` (saves the LM head on prompts).

    Returns:
        Float32 logits ``[B, q - logits_from, V]``.
    """
    dtype = next(model.parameters()).dtype
    mask = cache.mask(positions, valid, dtype)
    kwargs = {_cache_kwarg(type(unwrap(getattr(model, "_orig_mod", model)))): cache}  # a compiled twin's model
    out = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=input_ids.shape[1] - logits_from,
        **kwargs,
    )
    cache.advance(positions, valid)
    return out.logits.float()
