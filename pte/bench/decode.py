"""``decode``: generated tokens/s of the engine against Hugging Face ``generate()``, same weights and sampling.

Every method samples at temperature 1 with top-k and top-p off, generates exactly ``n`` tokens per row (no
EOS) from the same random prompt, on the same device, dtype, attention kernel (sdpa) and thread count, and
is warmed up before timing; the methods alternate within each repeat and the median is reported.
``generate-static`` is ``generate(cache_implementation="static")``; ``--compile`` runs the engine's decode steps
compiled (``rollout.compile``); ``--lengths 8192`` is the 8K setting.
``generate`` runs the plain model (the ``pte`` method runs a copy with the thought encoder attached, so the
baselines pay nothing for its wrapped linears). ``linears-only`` is no decoder but a floor: the model's linear
layers alone (every projection and the LM head, in model order) on one token per row, ``n`` times, which any
decode of this model must pay; every row also reports its time per step.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

from pte.bench import common
from pte.engine.cache import CachePolicy
from pte.engine.encoder import attach_thought
from pte.engine.rollout import SamplingConfig, rollout
from pte.engine.thought import ThoughtConfig

METHODS = ("generate", "generate-static", "full", "window", "pte", "linears-only")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="mid-llama", choices=common.MODELS)
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048], help="new tokens per row, e.g. 512 2048 8192")
    p.add_argument("--batch", type=int, nargs="+", default=[8])
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--methods", nargs="+", default=["generate", "window", "pte"], choices=METHODS)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=16, help="tokens of the untimed warm-up run (0: the full length)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--compile", action="store_true", help="torch.compile the engine's decode steps (rollout.compile)")


def _linears_only(model: nn.Module, batch: int, n: int):
    """A zero-argument function that runs every linear layer of ``model`` on ``[batch, d_in]``, ``n`` times."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    w = linears[0].weight
    inputs = [torch.randn(batch, m.in_features, device=w.device, dtype=w.dtype) for m in linears]

    @torch.no_grad()
    def run() -> None:
        for _ in range(n):
            for m, x in zip(linears, inputs, strict=True):
                m(x)

    return run


def _runner(method: str, base, pte_model, ids, mask, n: int, window: int, compile_steps: bool = False):
    """A zero-argument function that generates ``n`` tokens per row with ``method``."""
    if method == "linears-only":
        return _linears_only(base, ids.shape[0], n)
    if method.startswith("generate"):
        extra = {"cache_implementation": "static"} if method == "generate-static" else {}

        def run_hf():
            out = base.generate(
                ids, attention_mask=mask.long(), max_new_tokens=n, do_sample=True, temperature=1.0, top_k=0,
                top_p=1.0, **extra,
            )  # fmt: skip
            assert out.shape[1] == ids.shape[1] + n
            return out

        return run_hf
    model = pte_model if method == "pte" else base
    policy = CachePolicy(method, window=window, evict_ratio=0.25)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=n, stop_check_every=n, compile=compile_steps)
    return lambda: rollout(model, ids, mask, policy, sampling, [], 0, torch.Generator(ids.device).manual_seed(0))


def run(args: argparse.Namespace) -> dict:
    base, vocab = common.load(args.model, args.dtype)
    pte_model = copy.deepcopy(base)
    attach_thought(pte_model, ThoughtConfig())
    common.place(pte_model, args.dtype)
    rows = []
    result = {
        "benchmark": "decode",
        "model": args.model,
        "dtype": args.dtype,
        "window": args.window,
        "compile": args.compile,
        "rows": rows,
    }
    for b in args.batch:
        ids, mask = common.prompts(b, args.prompt_len, vocab)
        for n in args.lengths:
            fns = {m: _runner(m, base, pte_model, ids, mask, n, args.window, args.compile) for m in args.methods}
            for m in args.methods:
                # generate's static cache compiles per cache length on CUDA: warm it up at the timed length
                warm_n = n if m == "generate-static" or not args.warmup else min(args.warmup, n)
                _runner(m, base, pte_model, ids, mask, warm_n, args.window, args.compile)()
            times = common.interleaved(fns, args.repeats)
            ref = common.median(times["generate"]) if "generate" in times else None
            win = common.median(times["window"]) if "window" in times else None
            for m, secs in times.items():
                t = common.median(secs)
                rows.append(
                    {
                        "method": m,
                        "batch": b,
                        "tokens": n,
                        "seconds": t,
                        "tokens_per_s": b * n / t,
                        "ms_per_step": 1e3 * t / n,
                        "vs_generate": ref / t if ref else None,
                        "window_time_ratio": t / win if win else None,  # this method's time over the window's
                        "runs": secs,
                    }
                )
            columns = ["method", "batch", "tokens", "tokens_per_s", "ms_per_step", "vs_generate", "window_time_ratio"]
            print(common.table(rows[-len(times) :], columns))
            common.write(result, args.json)  # partial results survive a time limit
    return result
