"""Training-pass memory: what autograd keeps for a replay forward, piece by piece (pte/replay.py).

A replay forward over ``rows x n`` new tokens that attend ``k`` keys saves, in every decoder layer (Qwen2/Llama
under HF's sdpa path, frozen base, float32 adapters; listed from the autograd graph of the real forward):
    per token  the float32 input of both RMSNorms (2 d_model x 4 bytes); the query and the attention output
               (H_q D each); SiLU(gate), its input and up (3 I); the attention's log-sum-exp (H_q floats);
               the adapter's inputs and low-rank activations (:func:`adapter_per_token`)
    per key    the keys and values repeated to the query heads (2 H_q D): with an explicit mask, HF's sdpa path
               expands grouped K/V before the kernel, and the kernel keeps what it was given
Shared by all layers: the additive mask ``[rows, 1, n, k]``, the rotary cos/sin and the final norm's float32 input.
"""

from __future__ import annotations

from dataclasses import dataclass

from pte.plan.arch import MODULE_SHAPES
from pte.plan.phases import F32, cpu_head_copy, kv_cache, thought_state
from pte.plan.setup import Setup

ATTN_IN = ("q_proj", "k_proj", "v_proj")
MLP_IN = ("gate_proj", "up_proj")


@dataclass(frozen=True)
class Piece:
    """One replay forward: ``n`` new tokens per row attending ``keys`` keys, ``logits`` positions scored."""

    n: int
    keys: int
    logits: int


def pieces(s: Setup) -> list[Piece]:
    """The distinct replay forwards of a worst-case rollout (every row runs to ``max_new_tokens``).

    The first stretch is prompt + W tokens (prompt + T under the full cache), scored from the last prompt token on;
    each later chunk is the e tokens between two evictions and attends the stored P + W slots plus itself.
    ``replay.max_chunk_tokens`` cuts a stretch into pieces that attend the pieces before them.
    """
    p = s.prompt_len
    first = p + (s.policy.window if s.policy.bounded else s.max_new)
    out = _cut(first, 0, p - 1, s.max_chunk_tokens)
    if s.policy.bounded and s.max_new > s.policy.window:
        out += _cut(min(s.policy.evict_tokens, s.max_new - s.policy.window), s.cap, 0, s.max_chunk_tokens)
    return sorted(set(out), key=lambda x: (x.n, x.keys))


def _cut(length: int, stored: int, scored_from: int, cap: int) -> list[Piece]:
    """Pieces of at most ``cap`` tokens (0 = one piece) of a ``length``-token stretch after ``stored`` slots."""
    step = cap or length
    out = []
    for start in range(0, length, step):
        n = min(step, length - start)
        out.append(Piece(n, stored + start + n, max(0, start + n - max(start, scored_from))))
    return out


def adapter_per_token(s: Setup) -> int:
    """Bytes per token and layer that the adapters add to the saved activations.

    PTE (ThoughtLinear): the layer input each adapted projection reads (shared by q/k/v, and by gate/up), B x (r)
    and its product with the state (G), in the activation dtype. LoRA (peft, float32 adapters): lora_A's output
    (r floats) and its input, which peft casts to float32, one copy per adapted projection when the activations are
    16-bit (shared with the frozen path's input when they are float32).
    """
    ar, a = s.arch, s.a
    dims = {t: MODULE_SHAPES[t](ar) for t in s.targets}
    if s.method == "pte":
        inputs = ar.hidden * (any(t in dims for t in ATTN_IN) + any(t in dims for t in MLP_IN))
        inputs += ar.intermediate * ("down_proj" in dims)  # o_proj's input is the saved attention output
        return inputs * a + len(dims) * (s.rank + s.global_tokens) * a
    low_rank = len(dims) * s.rank * F32
    if a != F32:
        return low_rank + sum(d_in for d_in, _ in dims.values()) * F32
    inputs = ar.hidden * (any(t in dims for t in ATTN_IN) + any(t in dims for t in MLP_IN))
    return low_rank + (inputs + ar.intermediate * ("down_proj" in dims)) * a


def per_token(s: Setup) -> int:
    ar, a = s.arch, s.a
    return 2 * ar.hidden * F32 + 2 * ar.q_dim * a + 3 * ar.intermediate * a + ar.heads * F32 + adapter_per_token(s)


def per_key(s: Setup) -> int:
    return 2 * s.arch.q_dim * s.a


def shared(s: Setup, rows: int, pc: Piece) -> int:
    """Tensors every layer's backward reads: the additive mask, the rotary cos/sin, the final norm's input."""
    ar = s.arch
    return rows * pc.n * (pc.keys * s.w + 2 * ar.head_dim * s.a + ar.hidden * F32)


def saved(s: Setup, rows: int, pc: Piece) -> int:
    """Activations kept for the backward: every layer's, or with checkpointing every layer's input plus the one
    layer being recomputed."""
    layer = rows * (pc.n * per_token(s) + pc.keys * per_key(s))
    if s.checkpointing:
        return s.arch.layers * rows * pc.n * s.arch.hidden * s.a + layer + shared(s, rows, pc)
    return s.arch.layers * layer + shared(s, rows, pc)


def head(s: Setup, rows: int, pc: Piece) -> int:
    """The LM head of one piece: at most ``replay.logits_chunk`` positions of ``[positions, V]`` float32 at once.

    Held at the worst moment: the float32 logits, their log-softmax (kept for the backward) and two entropy
    temporaries, plus the 16-bit logits while they are cast.
    """
    positions = rows * pc.logits
    if s.logits_chunk:
        positions = min(positions, s.logits_chunk)
    return positions * s.arch.vocab * 4 * F32


def backward_layer(s: Setup, rows: int, pc: Piece) -> int:
    """Gradients alive in one layer's backward: the MLP's three ``[n, I]`` gradients, or attention's gradients of
    the query and of the repeated keys and values."""
    ar, a = s.arch, s.a
    mlp = 3 * rows * pc.n * ar.intermediate * a
    attn = rows * (pc.n * ar.q_dim + 2 * pc.keys * ar.q_dim) * a
    return max(mlp, attn) + 2 * rows * pc.n * ar.hidden * a


def replay(s: Setup) -> dict[str, int]:
    """The replay phase's transient for its worst piece: the replay's own cache and state, the saved activations,
    and the larger of the LM-head peak (end of the forward) and one layer's backward working set."""
    rows = s.replay_rows

    def total(pc: Piece) -> int:
        return saved(s, rows, pc) + max(head(s, rows, pc), backward_layer(s, rows, pc))

    pc = max(pieces(s), key=total)
    mode = "layer inputs + one layer" if s.checkpointing else "all layers"
    tops = {
        f"LM head ({min(rows * pc.logits, s.logits_chunk or rows * pc.logits)} positions x V)": head(s, rows, pc),
        "backward working set (one layer)": backward_layer(s, rows, pc),
    }
    top = max(tops, key=tops.get)
    return {
        f"replay K/V cache {rows} rows x {s.cap} slots": kv_cache(s, rows, s.cap),
        "thought state": thought_state(s, rows),
        f"saved activations ({mode}), {pc.n} tokens x {pc.keys} keys": saved(s, rows, pc),
        top: tops[top],
    }


def reference(s: Setup) -> dict[str, int]:
    """pi_ref's log-probs (grpo.beta > 0): a no-grad full-cache replay of P + T tokens, adapters off."""
    rows = s.replay_rows
    cap = s.prompt_len + s.max_new
    full = _cut(cap, 0, s.prompt_len - 1, s.max_chunk_tokens)
    ar, a = s.arch, s.a

    def moment(pc: Piece) -> int:
        n = rows * pc.n
        layer = 4 * n * ar.hidden * a + max(
            3 * n * ar.intermediate * a, (3 * n * ar.q_dim + 2 * rows * pc.keys * ar.q_dim) * a
        )
        logits = min(rows * pc.logits, s.logits_chunk or rows * pc.logits) * ar.vocab * 2 * F32
        return rows * pc.n * (pc.keys * s.w + 2 * ar.head_dim * a) + max(layer, logits + cpu_head_copy(s, rows))

    worst = max(full, key=moment)
    return {
        f"reference K/V cache {rows} rows x {cap} slots": kv_cache(s, rows, cap),
        f"no-grad forward, {worst.n} tokens x {worst.keys} keys": moment(worst),
    }
