"""``train-memory``: peak memory of one GRPO update, pte's chunked replay against peft LoRA full backprop.

Both sides update the same random base model on the same synthetic rollout (random response ids, which cost
what sampled ones would) with the same clipped GRPO token loss and one AdamW step:
- ``pte``: thought encoder, ``replay`` cut at the rollout's eviction points, each chunk backpropagated at once;
- ``lora``: peft LoRA (rank 32 on q/k/v/o, the project's default), one forward of prompt + response with the
  standard causal mask and logits for the response only, one backward (what full-cache GRPO does).
Each (method, length) runs in its own process: CUDA max allocated, or the resident high-water mark on CPU.
"""

from __future__ import annotations

import argparse

import torch
from peft import LoraConfig, get_peft_model

from pte.bench import common
from pte.engine.cache import CachePolicy
from pte.engine.encoder import attach_thought
from pte.engine.replay import replay
from pte.engine.rollout import Rollout
from pte.engine.thought import ThoughtConfig
from pte.training.grpo import token_loss
from pte.training.sft import eviction_schedule


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="mid-llama", choices=common.MODELS)
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--methods", nargs="+", default=["pte", "lora"], choices=["pte", "lora"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--dtype", default="float32")


def synthetic_rollout(ids: torch.Tensor, mask: torch.Tensor, t: int, vocab: int, window: int) -> Rollout:
    b = ids.shape[0]
    policy = CachePolicy("pte", window=window, evict_ratio=0.25)
    gen = torch.Generator().manual_seed(1)
    resp = torch.randint(4, vocab, (b, t), generator=gen).to(ids.device)
    return Rollout(
        prompt_ids=ids,
        prompt_mask=mask,
        response_ids=resp,
        response_mask=torch.ones_like(resp, dtype=torch.bool),
        logprobs=torch.full((b, t), -3.0, device=ids.device),
        truncated=torch.zeros(b, dtype=torch.bool, device=ids.device),
        policy=policy,
        temperature=1.0,
        evict_before=eviction_schedule(policy, mask, t),
    )


def _loss(logp: torch.Tensor, ro: Rollout, sl: slice, adv: torch.Tensor) -> torch.Tensor:
    return token_loss(logp, ro.logprobs[:, sl], adv, 0.2, 0.28)[0].sum() / ro.response_ids.numel()


def child(s: dict) -> dict:
    """One update of ``s["method"]`` on a ``s["length"]``-token synthetic rollout in this (fresh) process."""
    model, vocab = common.load(s["model"], s["dtype"])
    if s["method"] == "pte":
        attach_thought(model, ThoughtConfig())
    else:
        lora = LoraConfig(
            r=32, lora_alpha=64, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
        )
        model = get_peft_model(model, lora)
    common.place(model, s["dtype"])  # frozen base in dtype; adapter and AdamW state in float32, as in training
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    ids, mask = common.prompts(s["batch"], s["prompt_len"], vocab)
    ro = synthetic_rollout(ids, mask, s["length"], vocab, s["window"])
    adv = torch.linspace(-1, 1, s["batch"], device=ids.device)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    before = common.current_bytes()

    def update() -> None:
        if s["method"] == "pte":
            for chunk in replay(model, ro):
                _loss(chunk.logprobs, ro, slice(chunk.start, chunk.stop), adv).backward()
        else:
            full = torch.cat([ro.prompt_ids, ro.response_ids], dim=1)
            t = ro.response_ids.shape[1]
            logits = model(input_ids=full, attention_mask=torch.ones_like(full), logits_to_keep=t + 1).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            chosen = logp.gather(-1, ro.response_ids[..., None]).squeeze(-1)
            _loss(chosen, ro, slice(0, t), adv).backward()
        opt.step()

    secs, _ = common.timed(update)
    return {
        **s,
        "peak_bytes": common.peak_bytes(),
        "before_bytes": before,
        "seconds": secs,
        "chunks": len(ro.evict_before) + 1 if s["method"] == "pte" else 1,
    }


def run(args: argparse.Namespace) -> dict:
    rows = []
    for n in sorted(args.lengths):
        for method in args.methods:
            setting = {"model": args.model, "dtype": args.dtype, "method": method, "length": n}
            setting |= {"batch": args.batch, "window": args.window, "prompt_len": args.prompt_len}
            r = common.in_child("train-memory", setting)
            r["peak_mib"] = r["peak_bytes"] / 2**20
            r["update_mib"] = (r["peak_bytes"] - r["before_bytes"]) / 2**20
            rows.append(r)
            common.write({"benchmark": "train-memory", "model": args.model, "rows": rows}, args.json)
    by = {(r["method"], r["length"]): r for r in rows}
    shortest = min(args.lengths)
    for r in rows:
        r["vs_shortest"] = r["peak_bytes"] / by[(r["method"], shortest)]["peak_bytes"]
        if ("lora", r["length"]) in by:
            r["vs_lora"] = r["peak_bytes"] / by[("lora", r["length"])]["peak_bytes"]
    print(common.table(rows, ["method", "length", "peak_mib", "update_mib", "vs_shortest", "vs_lora", "seconds"]))
    return {"benchmark": "train-memory", "model": args.model, "dtype": args.dtype, "rows": rows}
