"""``rollout-memory``: K/V bytes held and peak memory of one rollout at growing lengths, a child process each.

Each (policy, length) runs in a fresh process, so the peak (CUDA max allocated, or the resident high-water
mark on CPU) belongs to that setting alone. Ratios are against the shortest length of the same policy.
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
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--policies", nargs="+", default=["full", "window", "pte"], choices=["full", "window", "pte"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--dtype", default="float32")


def child(s: dict) -> dict:
    """One rollout of ``s["length"]`` tokens under ``s["policy"]`` in this (fresh) process."""
    model, vocab = common.load(s["model"], s["dtype"])
    if s["policy"] == "pte":
        attach_thought(model, ThoughtConfig())
        common.place(model, s["dtype"])
    ids, mask = common.prompts(s["batch"], s["prompt_len"], vocab)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    before = common.current_bytes()
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=s["length"], stop_check_every=s["length"])
    policy = CachePolicy(s["policy"], window=s["window"], evict_ratio=0.25)
    secs, ro = common.timed(lambda: rollout(model, ids, mask, policy, sampling, [], 0, torch.Generator(ids.device)))
    kv = ro.kv_bytes
    return {
        **s,
        "kv_bytes_held": float(kv[-1]),
        "kv_bytes_peak": float(kv.max()),
        "peak_bytes": common.peak_bytes(),
        "before_bytes": before,
        "seconds": secs,
    }


def run(args: argparse.Namespace) -> dict:
    rows = []
    result = {"benchmark": "rollout-memory", "model": args.model, "dtype": args.dtype, "rows": rows}
    for policy in args.policies:
        first = None
        for n in sorted(args.lengths):
            setting = {"model": args.model, "dtype": args.dtype, "policy": policy, "length": n}
            setting |= {"batch": args.batch, "window": args.window, "prompt_len": args.prompt_len}
            r = common.in_child("rollout-memory", setting)
            first = first or r
            r["kv_ratio"] = r["kv_bytes_held"] / first["kv_bytes_held"]
            r["peak_ratio"] = r["peak_bytes"] / first["peak_bytes"]
            r["kv_mib"], r["peak_mib"] = r["kv_bytes_held"] / 2**20, r["peak_bytes"] / 2**20
            rows.append(r)
            print(common.table([r], ["policy", "length", "kv_mib", "kv_ratio", "peak_mib", "peak_ratio", "seconds"]))
            common.write(result, args.json)
    return result
