"""Bytes of every memory component, per rank, from the sizes of a :class:`pte.plan.setup.Setup`.

Each formula counts the tensors the code path allocates (validated against exact CPU tensor peaks, docs/scale.md):
the K/V buffers of pte.cache, the decode step and sampling of pte.rollout, the autograd saved tensors of a
Qwen2/Llama decoder layer under the replay, and the LM-head pieces. Notation as in pte/plan/setup.py; ``a`` bytes per
activation element, f = 4 (float32).
"""

from __future__ import annotations

from pte.plan.setup import Setup

F32 = 4
DRAW_BLOCK = 256  # pte.rollout.DRAW_BLOCK: the sampler pads the vocabulary to a multiple of it


def kv_cache(s: Setup, rows: int, cap: int) -> int:
    """K and V buffers ``[rows, H_kv, cap, D]`` per layer, plus the per-slot positions, validity and additive mask."""
    return 2 * s.arch.layers * rows * cap * s.arch.kv_dim * s.a + rows * cap * (8 + 1 + s.w)


def thought_state(s: Setup, rows: int) -> int:
    """S_e ``[rows, G, r]`` float32 per layer (PTE only)."""
    return s.arch.layers * rows * s.global_tokens * s.rank * F32 if s.method == "pte" else 0


def sampling(s: Setup, rows: int, temperature: float, top_p: float, top_k: int) -> int:
    """Peak of one decode step's vocabulary-sized tensors ``[rows, V]``.

    The previous step's float32 logits live until the new ones return; the LM head writes ``a``-byte logits and
    casts them to float32; sampling adds the log-softmax, a temperature-scaled copy, the probabilities and the
    sampler's block-padded copy; top-k / top-p add a masked copy, and top-p a sort (values, int64 order, softmax,
    cumulative sum, mask).
    """
    v = s.arch.vocab
    forward = F32 + (s.a if s.a != F32 else 0) + F32
    draw = F32 + F32 + (F32 if temperature not in (0.0, 1.0) else 0)
    if temperature > 0:
        draw += F32 + (F32 if v % DRAW_BLOCK else 0)
        if top_k > 0:
            draw += F32
        if top_p < 1.0:
            draw += F32 + 8 + F32 + F32 + 1 + F32
    return rows * v * max(forward, draw)


def prefill(s: Setup, rows: int, tokens: int) -> int:
    """Peak of a no-grad forward over ``rows x tokens`` (the prompt), reached in the last layer's MLP.

    Held then: the additive mask ``[rows, 1, q, q]`` in the weights' dtype, the rotary cos/sin, four hidden-sized
    tensors (the embedding output, the residual stream before and after attention, the normed MLP input) and the
    SwiGLU's three ``[q, I]`` tensors (SiLU(gate), up, their product). Attention's working set (query, keys and
    values repeated to the query heads, output) is smaller whenever 3 I > 5 H_q D.
    """
    a, ar = s.a, s.arch
    n = rows * tokens
    shared = rows * tokens * tokens * s.w + 2 * n * ar.head_dim * a + 4 * n * ar.hidden * a
    mlp = 3 * n * ar.intermediate * a
    attn = n * (5 * ar.q_dim + 2 * ar.kv_dim) * a
    return shared + max(mlp, attn) + cpu_head_copy(s, rows)


def cpu_head_copy(s: Setup, rows: int) -> int:
    """CPU only: a 16-bit LM head over the last positions of a longer forward (a strided slice of the hidden
    states) runs as a batched matmul whose kernel copies the weight once per row, ``[rows, d_model, V]``."""
    return rows * s.arch.hidden * s.arch.vocab * s.a if s.device == "cpu" and s.a == 2 else 0


def eviction(s: Setup, rows: int) -> int:
    """One eviction: the evicted K/V of every layer copied out, and (PTE) the un-rotated float32 keys."""
    if not s.policy.bounded:
        return 0
    piece = s.arch.layers * rows * s.policy.evict_tokens * s.arch.kv_dim
    return 2 * piece * s.a + (piece * F32 if s.method == "pte" else 0)


def rollout(s: Setup, rows: int, cap: int, temperature: float, top_p: float, top_k: int) -> dict[str, int]:
    """A rollout (or an evaluation batch) of ``rows`` sequences with ``cap`` K/V slots each."""
    parts = {
        f"K/V cache {rows} rows x {cap} slots": kv_cache(s, rows, cap),
        "responses (ids, log-probs, mask)": rows * s.max_new * (8 + F32 + 1),
        "thought state": thought_state(s, rows),
    }
    step = {
        "decode step (logits + sampling)": sampling(s, rows, temperature, top_p, top_k),
        f"prompt forward ({s.prompt_len} tokens)": prefill(s, rows, s.prompt_len),
        "eviction copies": eviction(s, rows),
    }
    worst = max(step, key=step.get)
    return {**parts, worst: step[worst]}
