"""Progressive Thought Encoding: reasoning under a fixed-size KV cache (Zhang et al., ICLR 2026)."""

from pte.engine.cache import BoundedKVCache, CachePolicy
from pte.engine.encoder import attach_thought, load_thought, save_thought
from pte.engine.generate import Generation, generate
from pte.engine.thought import ThoughtConfig
from pte.models.load import load_model_and_tokenizer

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
