"""What every benchmark shares: the models, synchronised timing, medians, memory probes and result output."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from pte.machine import cpu_name
from pte.models.load import load_model_and_tokenizer
from pte.models.tiny import tiny_model
from pte.training.memory import max_rss_bytes
from pte.training.precision import cast_base

# Mid-size random models: big enough that matrix work, not Python, dominates a decode step (GQA 8/2 heads).
MID = {
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
}
MID_VOCAB = 32000
MODELS = ("mid-llama", "mid-qwen2", "smollm2", "tiny-llama", "tiny-qwen2")


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load(name: str, dtype: str = "float32") -> tuple[PreTrainedModel, int]:
    """A frozen model on the benchmark device, its weights in ``dtype``, and its vocabulary size.

    ``mid-*`` are random (seed 0) with a 32K vocabulary; the rest come from ``pte.models``.
    """
    if name.startswith("mid-"):
        model = tiny_model(name.removeprefix("mid-"), MID_VOCAB, seed=0, **MID).requires_grad_(False)
        vocab = MID_VOCAB
    elif name in MODELS:
        model, tok = load_model_and_tokenizer(name, "float32")
        vocab = len(tok) if name.startswith("tiny-") else model.config.vocab_size
    else:
        raise ValueError(f"--model {name!r}: expected one of {MODELS}")
    model.generation_config.eos_token_id = None  # every run generates exactly the requested tokens
    model.generation_config.pad_token_id = 0
    return place(model, dtype), vocab


def place(model: nn.Module, dtype: str) -> nn.Module:
    """``model`` on the benchmark device with its frozen base in ``dtype`` and its adapter (if any) in float32, as
    training holds them (pte/training/precision.py); ``model.to(dtype=...)`` would cast the adapter too."""
    return cast_base(model.to(device()), getattr(torch, dtype))


def prompts(batch: int, length: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompt ids ``[batch, length]`` (ids >= 4, clear of the tiny tokenizer's specials) and a full mask."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (batch, length), generator=gen)
    return ids.to(device()), torch.ones_like(ids, dtype=torch.bool).to(device())


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    """Wall seconds of ``fn(*args)`` with the device synchronised on both ends, and its result."""
    sync()
    start = time.perf_counter()
    out = fn(*args)
    sync()
    return time.perf_counter() - start, out


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each function over ``repeats`` rounds, interleaved so drifting machine load hits all alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            times[key].append(timed(fn)[0])
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def peak_bytes() -> int:
    """Peak memory so far: CUDA max allocated, else the process's resident high-water mark."""
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else max_rss_bytes()


def current_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated()
    import psutil

    return psutil.Process().memory_info().rss


def set_threads(n: int) -> None:
    """Use ``n`` CPU threads here and in every child process this run starts."""
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)


def in_child(bench: str, setting: dict) -> dict:
    """Run one setting of ``bench`` in a fresh Python process (own peak memory) and return its JSON result."""
    cmd = [sys.executable, "-m", "pte.bench", bench, "--child", json.dumps(setting)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{bench} child {setting} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def conditions() -> dict:
    """What a reader needs to compare figures: device, threads, versions."""
    import transformers

    info = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),  # 1, 5, 15 min: other work on the machine slows every figure
        # glibc's mmap threshold moves generate()'s CPU speed by up to 1.7x (docs/performance.md): say if it was fixed
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_", "glibc default (dynamic)"),
    }
    return info


def table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table of ``rows`` restricted to ``columns`` (floats to 3 significant digits)."""

    def fmt(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write(result: dict, path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2))
