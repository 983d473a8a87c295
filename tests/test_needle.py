"""Needle in an evicted thought: PTE, trained by cache-aware SFT, recalls a token that only its evicted response held.

Each response starts with a random digit, continues with random letters long after that digit left a 12-token
window, and must end by repeating the digit. A tiny Llama first learns the task with a full cache (ordinary
next-token training of the whole model, as a base model would know it); then it is frozen and only the thought
encoder (h_g, W^a, A, B) learns, under the window. Under the plain window the digit is gone, so recall is at chance
(1 in 10); PTE recalls it only if gradient reaches the state (``state_grad: chain``) and the state carries the digit
across evictions.
"""

from __future__ import annotations

import random

import pytest
import torch

from pte.config import load_config
from pte.encoder import attach_thought
from pte.models import tiny_model, tiny_tokenizer
from pte.replay import full_replay, replay
from pte.sft import teacher_forced

FILLER = 36  # letters between the digit and its recall: 8 evictions of a 12-token window after the digit left


def _batch(rng: random.Random, n: int) -> list[str]:
    """Responses ``<digit><FILLER random letters>=<digit>``."""
    digits = [rng.randrange(10) for _ in range(n)]
    return [f"{d}{''.join(rng.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(FILLER))}={d}" for d in digits]


def _recall_weights(ro) -> torch.Tensor:
    w = torch.zeros(ro.response_ids.shape)
    w[:, FILLER + 2] = 1.0  # the repeated digit: response = digit, filler, '=', digit, EOS
    return w


def _full_cache_pretrain(model, tok, prompt: str, rng: random.Random, steps: int = 60) -> None:
    """Teach the whole model the task under a full cache (loss on the recalled digit), then freeze it."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    head = tok(prompt, add_special_tokens=False)["input_ids"]
    for _ in range(steps):
        texts = _batch(rng, 32)
        ids = torch.tensor([head + tok(t, add_special_tokens=False)["input_ids"] for t in texts])
        labels = torch.full_like(ids, -100)
        labels[:, -1] = ids[:, -1]
        opt.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
    model.eval().requires_grad_(False)


@pytest.mark.slow
def test_pte_recalls_a_token_from_its_evicted_thoughts():
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    model = tiny_model("llama", len(tok), seed=0)
    cfg = load_config(
        "configs/tiny.yaml",
        [
            "cache.window=12",
            "cache.evict_ratio=0.25",
            "thought.rank=8",
            "thought.global_tokens=8",
            "thought.state_grad=chain",
        ],
    )
    rng = random.Random(0)
    prompt = "Repeat the first digit."
    _full_cache_pretrain(model, tok, prompt, rng)
    attach_thought(model, cfg.thought.build())
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    for _ in range(150):
        texts = _batch(rng, 32)
        ro = teacher_forced(tok, [prompt] * len(texts), texts, cfg, "pte", "cpu")
        w = _recall_weights(ro)
        opt.zero_grad()
        for chunk in replay(model, ro):
            (-(chunk.logprobs * w[:, chunk.start : chunk.stop]).sum() / len(texts)).backward()
        opt.step()

    texts = _batch(random.Random(1), 200)
    recall = {}
    for policy in ("full", "pte", "window"):
        ro = teacher_forced(tok, [prompt] * len(texts), texts, cfg, policy, "cpu")
        assert policy == "full" or ro.evict_before[0] < FILLER // 2, "the digit must be evicted long before recall"
        with torch.no_grad():
            logp = full_replay(model, ro)[:, FILLER + 2]
        recall[policy] = float((logp > -0.693).float().mean())  # p(digit) > 1/2: the argmax for sure
    assert recall["full"] >= 0.9, recall  # the base knows the task when nothing is evicted
    assert recall["pte"] >= 0.9, recall
    assert recall["window"] <= 0.3, recall
