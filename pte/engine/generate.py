"""``pte.generate``: constant-memory generation for any Hugging Face Qwen2/Llama model, with or without PTE."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pte.engine.cache import CachePolicy
from pte.engine.rollout import Rollout, SamplingConfig, rollout


@dataclass
class Generation:
    """Decoded texts plus the raw rollout (token ids, masks, log-probs, eviction schedule, cache stats)."""

    texts: list[str]
    rollout: Rollout


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], chat: bool = True, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(ids [B, P], mask [B, P])``; ``chat`` wraps each prompt as a user turn of the chat template."""
    if chat:
        prompts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"].to(device), enc["attention_mask"].bool().to(device)


def decode_responses(tokenizer: PreTrainedTokenizerBase, ro: Rollout) -> list[str]:
    """Each row's response text, up to and including its EOS, without special tokens."""
    rows = zip(ro.response_ids.cpu(), ro.response_mask.cpu())
    return [tokenizer.decode(r[m], skip_special_tokens=True) for r, m in rows]


def eos_ids(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return sorted(i for i in ids if i is not None)


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    cache: CachePolicy | str = "window",
    chat: bool = True,
    seed: int | None = None,
    **sampling,
) -> Generation:
    """Generate for ``prompts`` under a bounded cache.

    Args:
        cache: a ``CachePolicy`` or a policy name (``full``, ``window``, ``sink``, ``pte``) with defaults.
        chat: apply the tokenizer's chat template to each prompt.
        seed: seeds the sampler for reproducible samples.
        **sampling: ``SamplingConfig`` fields (temperature, top_p, top_k, max_new_tokens).
    """
    policy = CachePolicy(name=cache) if isinstance(cache, str) else cache
    device = next(model.parameters()).device
    ids, mask = encode_prompts(tokenizer, prompts, chat, device)
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    ro = rollout(
        model, ids, mask, policy, SamplingConfig(**sampling), eos_ids(tokenizer, model), tokenizer.pad_token_id, gen
    )
    return Generation(texts=decode_responses(tokenizer, ro), rollout=ro)
