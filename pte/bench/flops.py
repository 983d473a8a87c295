"""``flops``: attention FLOPs per rollout under ``full``, ``window`` and ``pte``, from the caches actually attended.

Each policy runs a real rollout and sums, over forwards, (live rows) x (occupied cache slots) x the model's
FLOPs per query-key pair (``Rollout.attn_flops``, as the paper's Table 1 counts). The key counts do not depend
on the weights, so a small model gives them quickly; ``keys_attended`` times any model's ``4 * heads *
head_dim * layers`` gives that model's figure. Training logs the same count as ``train/attn_tflops``.
"""

from __future__ import annotations

import argparse

import torch

from pte.bench import common
from pte.engine.cache import CachePolicy
from pte.engine.encoder import attach_thought
from pte.engine.rollout import SamplingConfig, rollout
from pte.engine.thought import ThoughtConfig


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny-llama", choices=common.MODELS)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--dtype", default="float32", help="weights' dtype (the key counts do not depend on it)")


def run(args: argparse.Namespace) -> dict:
    model, vocab = common.load(args.model, args.dtype)
    attach_thought(model, ThoughtConfig())  # A = 0 at init: the thought path costs a little, changes nothing
    common.place(model, args.dtype)
    ids, mask = common.prompts(args.batch, args.prompt_len, vocab)
    rows = []
    for n in args.lengths:
        sampling = SamplingConfig(temperature=1.0, max_new_tokens=n, stop_check_every=n)
        full = None
        for name in ("full", "window", "pte"):
            policy = CachePolicy(name, window=args.window, evict_ratio=0.25)
            ro = rollout(model, ids, mask, policy, sampling, [], 0, torch.Generator(ids.device).manual_seed(0))
            flops = ro.attn_flops()
            full = full or flops
            rows.append(
                {
                    "policy": name,
                    "tokens": n,
                    "keys_attended": flops / ro.attn_flops_per_key,
                    "attn_tflops": flops / 1e12,
                    "vs_full": flops / full,
                }
            )
    print(common.table(rows, ["policy", "tokens", "keys_attended", "attn_tflops", "vs_full"]))
    return {"benchmark": "flops", "model": args.model, "dtype": args.dtype, "window": args.window, "rows": rows}
