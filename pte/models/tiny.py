"""The tiny in-process models of the tests and benchmarks, their character tokenizer, and the weights cache directory.

Nothing here touches the hub or the toy base, so both pte/models/load.py and pte/models/toy.py import it.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_SPECIALS = ["<|pad|>", "<|im_end|>", "<|im_start|>", "<|unk|>"]


def cache_dir() -> Path:
    """Where converted weights live (``PTE_CACHE`` overrides ``~/.cache/pte``)."""
    return Path(os.environ.get("PTE_CACHE", Path.home() / ".cache" / "pte"))


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII (vocab ~100) with a ChatML template.

    Lets tests run real chat formatting, EOS handling and decoding without any download.
    """
    from tokenizers import Tokenizer, decoders, models

    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(TINY_SPECIALS + chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|unk|>"))
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<|pad|>", eos_token="<|im_end|>", unk_token="<|unk|>"
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tok.chat_template = CHATML_TEMPLATE
    tok.padding_side = "left"
    return tok


def tiny_model(family: str, vocab_size: int, seed: int = 0, **overrides) -> PreTrainedModel:
    """A 2-layer, hidden-64 Qwen2 or Llama with grouped-query attention (4 query / 2 kv heads)."""
    kwargs = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": False,
        "pad_token_id": 0,
        "eos_token_id": 1,
    }
    kwargs.update(overrides)
    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[family]
    config = config_cls(**kwargs)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return model_cls(config).eval()
