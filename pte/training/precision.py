"""The precision rule: a low-precision frozen base, float32 for everything that learns or accumulates.

- Frozen base weights take the configured low precision: ``model.dtype`` at load, ``trainer.precision`` =
  ``bf16-true`` / ``16-true`` (cast once at setup) or ``bf16-mixed`` (autocast; the weights stay float32).
- Trainable adapters (PTE's h_g, W^a, A, B; peft's LoRA A, B), the thought state, the log-probs and the optimiser
  state stay float32: bf16 resolves 2^-8 of a value, so an Adam step of 1e-5 (the paper's lr) is lost on any
  weight above ~3e-3, and the state sums every eviction of a sequence.
- Adapters compute in the activation dtype (ThoughtLinear casts A and B at use); the state update runs in float32
  (pte.engine.thought.LayerThought, autocast off).

Lightning's ``HalfPrecision`` would instead ``.to(dtype)`` the whole module (adapters included) and make bf16 the
default dtype inside every step (rollout log-probs and rewards included); :func:`frozen_base_precision` does neither.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

HALF = {"bf16-true": torch.bfloat16, "16-true": torch.float16}


def cast_base(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the frozen floating-point parameters of ``model`` to ``dtype`` and the trainable ones to float32.

    Buffers keep their dtype (the rotary ``inv_freq`` stays float32, as ``from_pretrained(dtype=...)`` leaves it).
    Goes through ``Module._apply`` like ``.to()``, so parameters keep their identity (tied weights stay tied, an
    optimiser's references stay valid) and FSDP2-sharded modules re-register their shards.
    """
    frozen = {id(p) for p in model.parameters() if not p.requires_grad and p.is_floating_point()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}

    def convert(t: torch.Tensor) -> torch.Tensor:
        if id(t) in frozen:
            return t.to(dtype)
        return t.float() if id(t) in trainable else t

    return model._apply(convert)


def trainer_precision(precision: str) -> tuple[str | None, list]:
    """``(precision, plugins)`` for ``L.Trainer``: a half precision goes through :func:`frozen_base_precision`
    (Lightning refuses both a flag and a plugin), any other value is passed on as the flag."""
    if precision in HALF:
        return None, [frozen_base_precision()(precision)]
    return precision, []


@functools.cache
def frozen_base_precision() -> type:
    """Lightning's ``HalfPrecision`` for ``bf16-true`` / ``16-true`` under the precision rule: the class, built on
    first use so that importing this module (benchmarks, inference) does not import Lightning (~2 s).

    Its ``convert_module`` casts only the frozen base (:func:`cast_base`); the default dtype stays float32 in every
    context, so tensors made inside a step (log-probs, rewards, advantages) are float32, while the activations are
    low precision anyway, as the base weights are.
    """
    from lightning.pytorch.plugins.precision import HalfPrecision

    class FrozenBasePrecision(HalfPrecision):
        def convert_module(self, module: nn.Module) -> nn.Module:
            return cast_base(module, self._desired_input_dtype)

        def tensor_init_context(self) -> contextlib.AbstractContextManager:
            return contextlib.nullcontext()

        def module_init_context(self) -> contextlib.AbstractContextManager:
            return contextlib.nullcontext()

        def forward_context(self) -> contextlib.AbstractContextManager:
            return contextlib.nullcontext()

    return FrozenBasePrecision
