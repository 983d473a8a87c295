"""Progressive Thought Encoding: reasoning under a fixed-size KV cache (Zhang et al., ICLR 2026)."""

from pte.cache import BoundedKVCache, CachePolicy
from pte.encoder import attach_thought, load_thought, save_thought
from pte.generate import Generation, generate
from pte.models import load_model_and_tokenizer
from pte.thought import ThoughtConfig

__all__ = [
    "BoundedKVCache",
    "CachePolicy",
    "Generation",
    "ThoughtConfig",
    "attach_thought",
    "generate",
    "load_model_and_tokenizer",
    "load_thought",
    "save_thought",
]
