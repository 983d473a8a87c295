"""Decode speed and KV memory: pte's bounded caches against Hugging Face ``generate()`` with a full cache.

    python benchmarks/decode.py [--model tiny-llama|smollm2|<hub id>] [--lengths 512 1024 2048] [--window 256]

Prints one row per (policy, generated length): tokens/s, the ratio to ``generate()`` measured in the same run,
and the K/V bytes held at the end. Greedy decoding of one prompt, batch 1, no EOS, on whatever device the model is.
"""

from __future__ import annotations

import argparse
import time

import torch

from pte.cache import CachePolicy
from pte.encoder import attach_thought
from pte.generate import encode_prompts
from pte.models import load_model_and_tokenizer
from pte.rollout import SamplingConfig, rollout
from pte.thought import ThoughtConfig

PROMPT = "Think step by step about the sum of the first one hundred odd numbers."


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    """Wall seconds of ``fn(*args, **kwargs)`` (device synchronised) and its result."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--window", type=int, default=256)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load_model_and_tokenizer(args.model)
    model.to(device)
    store = attach_thought(model, ThoughtConfig()).store
    ids, mask = encode_prompts(tok, [PROMPT], device=device)
    kv_slot = None
    warm = SamplingConfig(temperature=0.0, max_new_tokens=16)
    store.enabled = False
    model.generate(ids, attention_mask=mask.long(), max_new_tokens=16, do_sample=False)
    store.enabled = True
    rollout(model, ids, mask, CachePolicy("pte", window=args.window), warm, [], tok.pad_token_id)  # warm-up
    print(f"model {args.model}, device {device}, prompt {ids.shape[1]} tokens, window {args.window}")
    print("| policy | tokens | tokens/s | vs generate() | KV held (MiB) |\n|---|---|---|---|---|")
    for n in args.lengths:
        sampling = SamplingConfig(temperature=0.0, max_new_tokens=n, stop_check_every=n)
        store.enabled = False  # generate() runs the base model: adapters off
        hf_s, _ = timed(
            model.generate, ids, attention_mask=mask.long(), max_new_tokens=n, min_new_tokens=n, do_sample=False
        )
        store.enabled = True
        print(f"| HF generate (full) | {n} | {n / hf_s:.1f} | 1.00 | - |")
        for name in ("full", "window", "pte"):
            policy = CachePolicy(name, window=args.window, evict_ratio=0.25)
            secs, ro = timed(rollout, model, ids, mask, policy, sampling, [], tok.pad_token_id)
            kv_slot = ro.slot_bytes
            held = float(ro.kv_bytes[-1]) / 2**20
            print(f"| pte engine ({name}) | {n} | {n / secs:.1f} | {hf_s / secs:.2f} | {held:.2f} |")
    print(f"K/V bytes per cached token: {kv_slot}")


if __name__ == "__main__":
    main()
