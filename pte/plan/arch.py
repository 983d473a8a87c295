"""Model dimensions for the memory plan: from a Hugging Face config, or the published facts of the paper's models.

The paper's three models need no hub access: their architecture facts are written down here (each model's
``config.json`` on the hub). Any other hub id is read with ``transformers.AutoConfig`` (needs the hub or its cache);
the offline names (``tiny-*``, ``smollm2``, ``toy-carry``) are built locally.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Linear layers of a Qwen2/Llama decoder block, by attribute name: (input size, output size) as a function of Arch.
MODULE_SHAPES = {
    "q_proj": lambda a: (a.hidden, a.q_dim),
    "k_proj": lambda a: (a.hidden, a.kv_dim),
    "v_proj": lambda a: (a.hidden, a.kv_dim),
    "o_proj": lambda a: (a.q_dim, a.hidden),
    "gate_proj": lambda a: (a.hidden, a.intermediate),
    "up_proj": lambda a: (a.hidden, a.intermediate),
    "down_proj": lambda a: (a.intermediate, a.hidden),
}


@dataclass(frozen=True)
class Arch:
    """What the memory of a Qwen2/Llama-style decoder depends on.

    Args:
        hidden: d_model.
        layers: decoder layers L.
        heads, kv_heads: query and key/value heads (grouped-query attention when kv_heads < heads).
        head_dim: D.
        intermediate: MLP inner size (gate/up/down, SwiGLU).
        vocab: vocabulary size V (rows of the embedding and of the LM head).
        tied: the LM head shares the embedding matrix.
        qkv_bias: q/k/v projections have a bias (Qwen2).
    """

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    qkv_bias: bool

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_params(self) -> int:
        """Parameters of one decoder layer: attention, SwiGLU MLP, two RMSNorm weights."""
        h = self.hidden
        attn = h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h
        bias = (self.q_dim + 2 * self.kv_dim) if self.qkv_bias else 0
        return attn + bias + 3 * h * self.intermediate + 2 * h

    def outer_params(self) -> int:
        """Parameters outside the decoder layers: embedding, final norm, LM head unless tied."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def params(self) -> int:
        return self.layers * self.layer_params() + self.outer_params()

    @classmethod
    def from_hf(cls, config: Any) -> Arch:
        """From a transformers ``PretrainedConfig`` of a Qwen2/Llama-style model."""
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        qkv_bias = getattr(config, "attention_bias", None)
        return cls(
            hidden=config.hidden_size,
            layers=config.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            intermediate=config.intermediate_size,
            vocab=config.vocab_size,
            tied=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=bool(qkv_bias) if qkv_bias is not None else config.model_type == "qwen2",
        )


# Published config.json facts of the paper's models (docs/method.md section 5), so planning needs no hub.
PAPER_ARCHS = {
    "Qwen/Qwen2.5-3B-Instruct": Arch(2048, 36, 16, 2, 128, 11008, 151936, tied=True, qkv_bias=True),
    "Qwen/Qwen2.5-7B-Instruct": Arch(3584, 28, 28, 4, 128, 18944, 152064, tied=False, qkv_bias=True),
    "deepseek-ai/DeepSeek-R1-Distill-Llama-8B": Arch(4096, 32, 32, 8, 128, 14336, 128256, tied=False, qkv_bias=False),
}


def arch_for(name: str, revision: str = "main") -> Arch:
    """The architecture of ``model.name``: the paper table, an offline name built locally, or ``AutoConfig``."""
    if name in PAPER_ARCHS:
        return PAPER_ARCHS[name]
    if name.startswith("tiny-"):
        from pte.models.tiny import tiny_model, tiny_tokenizer

        return Arch.from_hf(tiny_model(name.removeprefix("tiny-"), len(tiny_tokenizer())).config)
    from transformers import AutoConfig

    from pte.models.load import named_model_dir, resolve_source

    path = named_model_dir(name) or resolve_source(name, revision)
    return Arch.from_hf(AutoConfig.from_pretrained(path, revision=revision))
