"""Attaching the thought encoder to a Hugging Face model and feeding it evicted K/V (docs/method.md section 3).

``attach_thought`` swaps the target linears of every decoder layer for ``ThoughtLinear`` (as peft does
for LoRA: module replacement, no source patch), freezes the base model, and registers a
``ThoughtEncoder`` on the model as ``model.pte_thought``, so ``model.parameters()`` holds everything and
the trainable ones are exactly h_g, W^a_Q/K/V, A and B.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from pte.engine.thought import LayerThought, StateStore, ThoughtConfig, ThoughtLinear

ATTR = "pte_thought"


def unwrap(model: nn.Module) -> PreTrainedModel:
    """The Hugging Face model under a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Qwen2/Llama-style causal LM (peft-wrapped or not)."""
    return unwrap(model).model.layers


def _base(module: nn.Module) -> nn.Module:
    return module.base if isinstance(module, ThoughtLinear) else module


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class ThoughtEncoder(nn.Module):
    """All layers' global tokens and latent projections, plus the live per-sequence states."""

    def __init__(self, model: PreTrainedModel, cfg: ThoughtConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        q_dim, kv_dim = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
        self.layers = nn.ModuleList(LayerThought(cfg, c.hidden_size, q_dim, kv_dim) for _ in decoder_layers(model))
        self.store = StateStore(len(self.layers))
        # Plain list, not submodules: the frozen projections belong to the base model's state dict.
        self._proj = [
            tuple(_base(getattr(layer.self_attn, n)) for n in ("q_proj", "k_proj", "v_proj"))
            for layer in decoder_layers(model)
        ]
        self._rotary = [model.model.rotary_emb]

    @property
    def projections(self) -> list[tuple[nn.Module, nn.Module, nn.Module]]:
        """Per layer, the frozen q, k and v projections (the base linears under any adapter)."""
        return self._proj

    def begin(self, batch: int) -> None:
        """Reset the states of a new batch of sequences to S_g."""
        self.store.begin([lt.initial_state(p, batch) for lt, p in zip(self.layers, self._proj)])
        self._links: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        self._last: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.layers)  # pair: K, V [B, 1, kv]

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep the states of batch ``rows`` (long ``[B']``) only, as the cache does when finished rows leave."""
        self.store.states = [s.index_select(0, rows) for s in self.store.states]
        self._last = [None if kv is None else tuple(x.index_select(0, rows) for x in kv) for kv in self._last]

    def detach_states(self) -> None:
        """Cut the graph between replay chunks: the carried state is a constant for the next chunk."""
        self.store.states = [s.detach() for s in self.store.states]

    # -- exact gradient through the state chain (thought.state_grad = chain, docs/method.md section 4) -----------------
    def link(self) -> None:
        """Let the next chunk read leaf copies of the states, and keep the chain's own graph beside them.

        The chunk's backward then leaves dL/dS in each leaf's ``.grad``; :meth:`backward_chain` hands those to the
        chain (S_g -> S_1 -> ... built from constant evicted K/V) in one backward per micro-batch.
        """
        chain = self.store.states
        leaves = [s.detach().requires_grad_(s.requires_grad) for s in chain]
        self._links.append((chain, leaves))
        self.store.states = leaves

    def unlink(self) -> None:
        """Put the chain's graph states back, so the next eviction extends the chain rather than a leaf."""
        self.store.states = list(self._links[-1][0])  # absorb rewrites the list in place

    def backward_chain(self) -> None:
        """Backpropagate every chunk's dL/dS through the state chain (all chunks' backwards must have run)."""
        outputs, grads = [], []
        for chain, leaves in self._links:
            for s, leaf in zip(chain, leaves):
                if not s.requires_grad:
                    continue
                if leaf.grad is None:
                    raise RuntimeError(
                        "thought.state_grad=chain: a replay chunk's loss was not backpropagated before the next chunk"
                    )
                outputs.append(s)
                grads.append(leaf.grad)
        self._links = []
        if outputs:
            torch.autograd.backward(outputs, grads)

    def pre_rope_keys(self, keys: list[torch.Tensor], positions: torch.Tensor) -> list[torch.Tensor]:
        """Undo the rotary embedding of cached keys ``[B, H_kv, m, D]`` at ``positions [B, m]`` (float32 out).

        Cached keys are ``a R(theta) k``: Hugging Face folds the rotary ``attention_scaling`` a (YaRN,
        longrope) into cos/sin, so the inverse is ``R(-theta) / a``. theta comes from the rotary module's
        current frequencies, computed here rather than through its forward, whose dynamic-NTK update would
        otherwise change the model's frequencies as a side effect. Exact for every rope type whose
        frequencies are fixed (default, linear, yarn, llama3), and for dynamic and longrope while positions
        stay within the model's original context; past it Hugging Face switches frequencies per forward
        and keys cached before the switch keep the old rotation.
        """
        rotary = self._rotary[0]
        freqs = positions[..., None].float() * rotary.inv_freq.float().to(positions.device)  # [B, m, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, m, D]
        cos, sin, scale = emb.cos(), emb.sin(), float(rotary.attention_scaling)
        return [(k.float() * cos - _rotate_half(k.float()) * sin) / scale for k in keys]

    def absorb(
        self,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        positions: torch.Tensor,
        rows: torch.Tensor | None = None,
    ) -> None:
        """Fold one eviction into every layer's state.

        Args:
            keys, values: per-layer evicted ``[B, H_kv, m, D]`` (keys as cached, i.e. rotated).
            positions: ``[B, m]`` absolute positions of the evicted tokens.
            rows: ``[B]`` bool, the rows that evicted (None = all); the other rows keep their state.
        """
        if self.cfg.evicted_keys == "pre_rope":
            keys = self.pre_rope_keys(keys, positions)
        for i, (lt, k, v) in enumerate(zip(self.layers, keys, values)):
            flat_k = k.transpose(1, 2).flatten(2)  # [B, m, H_kv*D]
            flat_v = v.transpose(1, 2).flatten(2)
            if self.cfg.evicted_context == "pair":
                flat_k, flat_v = self._pair(i, flat_k, flat_v, rows)  # [B, m, 2*H_kv*D]
            new = lt.update(self.store.states[i], self._proj[i][0], flat_k, flat_v)
            self.store.states[i] = new if rows is None else torch.where(rows[:, None, None], new, self.store.states[i])

    def _pair(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each evicted row beside its predecessor's: ``[B, m, kv]`` -> ``[B, m, 2 kv]``. Evictions leave in order, so
        the first token's predecessor is the last token of the row's previous eviction (zeros before any)."""
        last = self._last[layer] or (k.new_zeros(k[:, :1].shape), v.new_zeros(v[:, :1].shape))
        out = [torch.cat([x, torch.cat([prev, x[:, :-1]], dim=1)], dim=-1) for x, prev in zip((k, v), last)]
        ends = (k[:, -1:], v[:, -1:])
        if rows is not None:  # rows that did not evict keep their predecessor
            ends = tuple(torch.where(rows[:, None, None], end, prev) for end, prev in zip(ends, last))
        self._last[layer] = ends
        return out[0], out[1]


def attach_thought(model: PreTrainedModel, cfg: ThoughtConfig) -> ThoughtEncoder:
    """Freeze ``model``, add the dynamic low-rank update to ``cfg.target_modules`` and return the encoder."""
    model.requires_grad_(False)
    encoder = ThoughtEncoder(model, cfg)
    found = set()
    for idx, layer in enumerate(decoder_layers(model)):
        for block in (layer.self_attn, layer.mlp):
            for name in cfg.target_modules:
                child = getattr(block, name, None)
                if isinstance(child, nn.Linear):
                    setattr(block, name, ThoughtLinear(child, cfg, idx, encoder.store))
                    found.add(name)
    missing = set(cfg.target_modules) - found
    if missing:
        raise ValueError(f"thought.target_modules: no linear layer named {sorted(missing)} in the decoder layers")
    setattr(model, ATTR, encoder)
    return encoder


def get_thought(model: nn.Module) -> ThoughtEncoder | None:
    return getattr(model, ATTR, None)


def start_thought(model: nn.Module, uses_thought: bool, batch: int) -> ThoughtEncoder | None:
    """Prepare the encoder (if any) for a new batch: states reset to S_g, or the update switched off.

    A cache policy that does not use the thought state (``full``, ``window``, ``sink``) then runs exactly the
    base model, and a PTE policy on a model without an encoder is refused with a message.
    """
    encoder = get_thought(model)
    if encoder is None:
        if uses_thought:
            raise ValueError(
                "cache.policy pte/global_only needs a thought encoder (method: pte); this model has no thought encoder"
            )
        return None
    encoder.store.enabled = uses_thought
    if uses_thought:
        encoder.begin(batch)
    return encoder


def thought_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable PTE parameters only (what an adapter export holds)."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_thought(model: nn.Module, out_dir: str | Path) -> None:
    """Write ``pte_adapter.safetensors`` and ``pte_config.json`` (the ThoughtConfig)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(thought_state_dict(model), str(out / "pte_adapter.safetensors"))
    (out / "pte_config.json").write_text(json.dumps(asdict(get_thought(model).cfg), indent=2))


def load_thought(model: PreTrainedModel, adapter_dir: str | Path) -> ThoughtEncoder:
    """Attach an encoder with the saved config to a fresh base model and load its weights."""
    adapter_dir = Path(adapter_dir)
    raw = json.loads((adapter_dir / "pte_config.json").read_text())
    raw["target_modules"] = tuple(raw["target_modules"])
    encoder = attach_thought(model, ThoughtConfig(**raw))
    bad = load_thought_weights(model, load_file(str(adapter_dir / "pte_adapter.safetensors")))
    if bad:
        raise ValueError(f"{adapter_dir}: adapter does not match the model ({bad[:3]})")
    return encoder


def load_thought_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> list[str]:
    """Load PTE parameters into the attached encoder; return the keys that do not match (unexpected, then missing)."""
    unexpected = model.load_state_dict(weights, strict=False).unexpected_keys
    return [*unexpected, *sorted(set(thought_state_dict(model)) - set(weights))]
