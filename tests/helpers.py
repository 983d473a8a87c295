"""Shared tiny fixtures: randomly initialised 2-layer models and a character tokenizer (no downloads)."""

from __future__ import annotations

import torch

from pte.engine.cache import CachePolicy
from pte.engine.encoder import attach_thought
from pte.engine.generate import encode_prompts
from pte.engine.rollout import Rollout, SamplingConfig, rollout
from pte.engine.thought import ThoughtConfig
from pte.models.tiny import tiny_model, tiny_tokenizer

PROMPTS = ["Hi", "What is 12 + 30? Think.", "Count: 1 2 3"]
THOUGHT = ThoughtConfig(rank=4, global_tokens=3, alpha=8.0)


def tiny(family: str = "qwen2", **overrides):
    tok = tiny_tokenizer()
    return tiny_model(family, len(tok), **overrides), tok


def tiny_pte(family: str = "qwen2", random_a: bool = True, seed: int = 1, thought: ThoughtConfig = THOUGHT):
    """A tiny model with a thought encoder; ``random_a`` makes A non-zero so the state changes outputs."""
    model, tok = tiny(family)
    attach_thought(model, thought)
    if random_a:
        gen = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if name.endswith("lr_a"):
                p.data = torch.randn(p.shape, generator=gen) * 0.5
    return model, tok


def run(model, tok, prompts, policy: CachePolicy, steps: int, eos: list[int] | None = None, **kw) -> Rollout:
    ids, mask = encode_prompts(tok, prompts)
    sampling = SamplingConfig(temperature=kw.pop("temperature", 0.0), max_new_tokens=steps)
    gen = torch.Generator().manual_seed(kw.pop("seed", 0))
    return rollout(model, ids, mask, policy, sampling, eos if eos is not None else [], tok.pad_token_id, gen, **kw)
