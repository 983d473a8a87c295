"""One forward pass of a Hugging Face causal LM through the bounded cache.

The only place that knows Hugging Face calling conventions: the cache keyword (``cache=`` from
transformers 5.24, ``past_key_values=`` before), explicit per-row ``position_ids`` and an explicit 4D
additive mask, which Qwen2 and Llama take as-is, so the models run unpatched; ``logits_to_keep`` and the LM head
as the model's output embeddings, whose input (the final hidden states) the replay takes instead of full logits;
and the decoder layers, which the replay may run under activation checkpointing.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from functools import cache

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from pte.engine.cache import BoundedKVCache
from pte.engine.encoder import decoder_layers, unwrap


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
    return _run(model, cache, input_ids, positions, valid, input_ids.shape[1] - logits_from).logits.float()


def forward_hidden(
    model: PreTrainedModel,
    cache: BoundedKVCache,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    hidden_from: int = 0,
    more: bool = False,
    checkpointing: bool = False,
) -> torch.Tensor:
    """:func:`forward_tokens` without the LM head: the final hidden states ``[B, q - hidden_from, d]`` (after the
    final norm, in the model's dtype), for log-probs taken through the head in pieces (pte/engine/logprobs.py).

    The head's input is taken by a forward pre-hook that hands the head an empty slice, so the model never builds a
    ``[B, q, V]`` tensor, and the whole model still runs through its own ``forward`` (FSDP's hooks on the root
    included).

    Args:
        hidden_from: first query position whose hidden state is returned (may be >= q: none).
        more: with grad, the next forward continues this replay chunk (see ``BoundedKVCache.mask``).
        checkpointing: with grad, rerun each decoder layer in the backward instead of keeping its activations.
    """
    q = input_ids.shape[1]
    keep = max(q - hidden_from, 0)
    taken: list[torch.Tensor] = []

    def take(head: nn.Module, args: tuple) -> tuple:
        taken.append(args[0])  # [B, max(keep, 1), d]
        return (args[0][:, :0],)

    handle = output_head(model).register_forward_pre_hook(take)
    layers = checkpointed_layers(model, cache) if checkpointing else contextlib.nullcontext()
    try:
        with layers:
            _run(model, cache, input_ids, positions, valid, max(keep, 1), more)
    finally:
        handle.remove()
    return taken[0][:, taken[0].shape[1] - keep :]


def output_head(model: nn.Module) -> nn.Module:
    """The LM head (output embeddings) of a causal LM, peft-wrapped or not."""
    return unwrap(model).get_output_embeddings()


def _run(
    model: PreTrainedModel,
    cache: BoundedKVCache,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    keep: int,
    more: bool = False,
) -> ModelOutput:
    """The model's forward over ``input_ids`` with logits for the last ``keep`` positions; ``cache`` advanced."""
    dtype = next(model.parameters()).dtype
    mask = cache.mask(positions, valid, dtype, more)
    kwargs = {_cache_kwarg(type(unwrap(getattr(model, "_orig_mod", model)))): cache}  # a compiled twin's model
    out = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=keep,
        **kwargs,
    )
    cache.advance(positions, valid)
    return out


@contextlib.contextmanager
def checkpointed_layers(model: nn.Module, cache: BoundedKVCache) -> Iterator[None]:
    """Run every decoder layer of ``model`` under non-reentrant activation checkpointing while the block is open.

    Hugging Face's own gradient checkpointing turns the cache off (a rerun would store K/V a second time), so each
    layer's ``forward`` is wrapped here for the block, on the instance: module hooks (FSDP's) stay outside the
    checkpoint, as in Hugging Face. The rerun in the backward goes through ``cache.recomputing``, so it attends what
    the forward attended and stores nothing (pte/engine/live_kv.py).
    """
    layers = list(decoder_layers(model))
    for layer in layers:
        layer.forward = _checkpointed(layer, cache)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def _checkpointed(layer: nn.Module, cache: BoundedKVCache) -> Callable[..., torch.Tensor]:
    """``layer.forward`` under ``torch.utils.checkpoint`` when grad is on; the first call is the forward, any later
    one a rerun under the forward's ticket."""
    forward = type(layer).forward.__get__(layer)

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        ticket, calls = cache.ticket(), []

        def body(*a, **kw):
            if not calls:
                calls.append(None)
                return forward(*a, **kw)
            with cache.recomputing(ticket):
                return forward(*a, **kw)

        return checkpoint(body, *args, use_reentrant=False, **kwargs)

    return run
