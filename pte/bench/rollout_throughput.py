"""``rollout-throughput``: one rank's rollout phase decoded in update-sized micro-batches against all rows at once.

``micro-batches`` is the engine before ``rollout.decode_batch``: the rank's rows in blocks of ``--micro-batch``,
one block after another, every row forwarding its own prompt. ``decode-batch`` decodes all ``--rows`` rows at once
and forwards each group's prompt once (``--group`` samples share it). Both sample at temperature 1 from the same
per-row streams (pte/engine/noise.py) with no EOS, so every row generates exactly ``--tokens`` tokens and the two must
produce the same tokens: ``same_tokens`` and ``max_logprob_diff`` check it. Groups get prompts of different lengths
(left padded), as a GRPO batch does; each micro-batch is padded to its own longest prompt. ``speedup`` is the
micro-batches' time over the decode batch's. The ``pte`` policy runs the model with a thought encoder attached
(rank 32, 32 global tokens on q/k/v/o, the paper's), ``window`` the plain model.
"""

from __future__ import annotations

import argparse

import torch

from pte.bench import common
from pte.engine.cache import CachePolicy
from pte.engine.encoder import attach_thought
from pte.engine.noise import RowNoise
from pte.engine.rollout import Rollout, SamplingConfig, rollout
from pte.engine.thought import ThoughtConfig


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="mid-llama", choices=common.MODELS)
    p.add_argument("--rows", type=int, default=64, help="rows of one rank's rollout phase")
    p.add_argument("--micro-batch", type=int, default=16, help="rows per block of the micro-batches baseline")
    p.add_argument("--group", type=int, default=8, help="samples per prompt (rows sharing one prompt)")
    p.add_argument("--tokens", type=int, nargs="+", default=[256], help="new tokens per row (CPU-sized; GPU 1024+)")
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=128, help="longest prompt; groups get 1/2 to 1 of it")
    p.add_argument("--policy", default="pte", choices=["pte", "window"])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--warmup", type=int, default=8, help="tokens of the untimed warm-up run of each method")
    p.add_argument("--dtype", default="float32")


def group_prompts(rows: int, group: int, length: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts ``[rows, length]`` in groups of ``group`` identical rows, group lengths 1/2 to 1 of
    ``length``."""
    ids, _ = common.prompts(rows // group, length, vocab)
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(length // 2, length + 1, (rows // group,), generator=gen).to(ids.device)
    mask = torch.arange(length, device=ids.device) >= (length - lengths)[:, None]  # [prompts, length]
    return ids.masked_fill(~mask, 0).repeat_interleave(group, 0), mask.repeat_interleave(group, 0)


def micro_batches(model, ids, mask, policy, sampling, noise: RowNoise, size: int) -> list[Rollout]:
    """The rows in blocks of ``size``, one after another, each padded to its longest prompt, every prompt forwarded."""
    out = []
    for i in range(0, len(ids), size):
        block = mask[i : i + size]
        first = int(block.any(0).nonzero()[0])  # the block's longest prompt starts here
        args = (ids[i : i + size, first:], block[:, first:], policy, sampling, [], 0)
        out.append(rollout(model, *args, noise=noise[i : i + size], prefill_once=False))
    return out


def methods(model, ids, mask, policy, noise: RowNoise, micro: int, steps: int) -> dict:
    """Zero-argument runs of both methods, ``steps`` tokens per row, each returning its rollouts."""
    s = SamplingConfig(temperature=1.0, max_new_tokens=steps, stop_check_every=steps)
    return {
        "micro-batches": lambda: micro_batches(model, ids, mask, policy, s, noise, micro),
        "decode-batch": lambda: [rollout(model, ids, mask, policy, s, [], 0, noise=noise)],
    }


def measure(args: argparse.Namespace, model, ids, mask, policy, n: int) -> tuple[list[dict], dict]:
    """Result rows of both methods at ``n`` tokens per row, and the speedup and exactness figures."""
    noise = RowNoise.draw(torch.Generator().manual_seed(0), args.rows, n, ids.device)
    for fn in methods(model, ids, mask, policy, noise, args.micro_batch, min(args.warmup, n)).values():
        fn()
    times, outs = {}, {}
    for _ in range(args.repeats):
        for name, fn in methods(model, ids, mask, policy, noise, args.micro_batch, n).items():
            secs, outs[name] = common.timed(fn)
            times.setdefault(name, []).append(secs)
    base = common.median(times["micro-batches"])
    rows = []
    for name, secs in times.items():
        t = common.median(secs)
        row = {"method": name, "tokens": n, "seconds": t, "rows_per_s": args.rows / t}
        rows.append(row | {"tokens_per_s": args.rows * n / t, "speedup": base / t, "runs": secs})
    old, new = (torch.cat([ro.response_ids for ro in outs[k]]) for k in ("micro-batches", "decode-batch"))
    diff = torch.cat([ro.logprobs for ro in outs["micro-batches"]]) - outs["decode-batch"][0].logprobs
    extras = {f"speedup_{n}": rows[1]["speedup"], f"same_tokens_{n}": bool(torch.equal(old, new))}
    return rows, extras | {f"max_logprob_diff_{n}": float(diff.abs().max())}


def run(args: argparse.Namespace) -> dict:
    model, vocab = common.load(args.model, args.dtype)
    if args.policy == "pte":
        attach_thought(model, ThoughtConfig())
        common.place(model, args.dtype)
    policy = CachePolicy(args.policy, window=args.window, evict_ratio=0.25)
    ids, mask = group_prompts(args.rows, args.group, args.prompt_len, vocab)
    rows: list[dict] = []
    result = {"benchmark": "rollout-throughput", "model": args.model, "dtype": args.dtype, "policy": args.policy}
    result |= {"n_rows": args.rows, "micro_batch": args.micro_batch, "group": args.group, "window": args.window}
    result["rows"] = rows
    for n in args.tokens:
        new_rows, extras = measure(args, model, ids, mask, policy, n)
        rows += new_rows
        result |= extras
        print(common.table(new_rows, ["method", "tokens", "seconds", "rows_per_s", "tokens_per_s", "speedup"]))
        common.write(result, args.json)  # partial results survive a time limit
    return result
