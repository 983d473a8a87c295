"""Bytes of every memory component, per rank, from the sizes of a :class:`pte.plan.setup.Setup`.

Each formula counts the tensors the code path allocates (validated against exact CPU tensor peaks, docs/scale.md):
the K/V buffers of pte.engine.cache, the decode step and sampling of pte.engine.rollout, the autograd saved tensors of a
Qwen2/Llama decoder layer under the replay, and the LM-head pieces. Notation as in pte/plan/setup.py; ``a`` bytes per
activation element, f = 4 (float32).
"""

from __future__ import annotations

from pte.engine.rollout import DRAW_BLOCK  # the sampler pads the vocabulary to a multiple of it
from pte.plan.setup import Setup

F32 = 4


def kv_cache(s: Setup, rows: int, cap: int) -> int:
    """K and V buffers ``[rows, H_kv, cap, D]`` per layer, plus the per-slot positions, validity and additive mask."""
    return 2 * s.arch.layers * rows * cap * s.arch.kv_dim * s.a + rows * cap * (8 + 1 + s.w)


def thought_state(s: Setup, rows: int) -> int:
    """S_e ``[rows, G, r]`` float32 per layer (PTE only)."""
    return s.arch.layers * rows * s.global_tokens * s.rank * F32 if s.method == "pte" else 0


def sampling(s: Setup, rows: int, temperature: float, top_p: float, top_k: int) -> int:
    """Peak of one decode step's vocabulary-sized tensors ``[rows, V]`` (pte.engine.rollout.sample and draw).

    The previous step's float32 logits live until the next step's return. During a forward the LM head writes its
    own (in the activation dtype, then cast to float32); during the draw come the log-softmax, the probabilities,
    the sampler's copy padded to whole blocks and the float64 copy its block sums read, plus top-k's masked copy or
    top-p's sort (values, int64 order, softmax, drop mask, masked copy). Greedy decoding needs the log-softmax only.
    """
    forward = (s.a if s.a != F32 else 0) + F32
    if temperature <= 0:
        draw = F32
    else:
        draw = F32 + F32 + (F32 if s.arch.vocab % DRAW_BLOCK else 0) + 8
        draw += F32 if top_k > 0 else 0
        draw += (F32 + 8 + F32 + 1 + F32) if top_p < 1.0 else 0
    return rows * s.arch.vocab * (F32 + max(forward, draw))


def prefill(s: Setup, rows: int, tokens: int) -> int:
    """Peak of a no-grad forward over ``rows x tokens`` (the prompt), reached in the last layer's MLP.

    Held throughout: the additive mask ``[rows, 1, q, q]`` in the weights' dtype and the rotary cos/sin. In the last
    layer: four hidden-sized tensors (the embedding output, the residual stream before and after attention, the
    normed MLP input) and the SwiGLU's three ``[q, I]`` tensors (SiLU(gate), up, their product); attention's working
    set (query, keys and values repeated to the query heads, output) is smaller whenever 3 I > 5 H_q D. At the LM
    head: two hidden-sized tensors and, on a CPU, :func:`cpu_head_copy`.
    """
    a, ar = s.a, s.arch
    n = rows * tokens
    shared = rows * tokens * tokens * s.w + 2 * n * ar.head_dim * a
    layer = 4 * n * ar.hidden * a + max(3 * n * ar.intermediate * a, n * (5 * ar.q_dim + 2 * ar.kv_dim) * a)
    head = 2 * n * ar.hidden * a + cpu_head_copy(s, rows)
    return shared + max(layer, head)


def cpu_head_copy(s: Setup, rows: int) -> int:
    """CPU only: a 16-bit LM head over the last positions of a longer forward (a strided slice of the hidden
    states) runs as a batched matmul whose kernel copies the weight once per row, ``[rows, d_model, V]``."""
    return rows * s.arch.hidden * s.arch.vocab * s.a if s.device == "cpu" and s.a == 2 else 0


def eviction(s: Setup, rows: int) -> int:
    """One eviction: the evicted K/V of every layer copied out (``[rows, H_kv, e, D]`` each) and, under PTE, the keys
    un-rotated layer by layer into float32: the finished layers' results, the last layer's working copies (the
    product with cos, the half-rotated copy and its negated half, the product with sin: 3.5 key-sized) and the
    rotary angles, cos and sin ``[rows, e, D]``."""
    if not s.policy.bounded:
        return 0
    ar, e = s.arch, s.policy.evict_tokens
    layer = rows * e * ar.kv_dim  # elements of one layer's evicted keys
    copies = 2 * ar.layers * layer * s.a
    if s.method != "pte":
        return copies
    return copies + (2 * (ar.layers - 1) + 7) * layer * F32 // 2 + 7 * rows * e * ar.head_dim * F32 // 2


def rollout(
    s: Setup, rows: int, distinct: int, cap: int, max_new: int, temperature: float, top_p: float, top_k: int = 0
) -> dict[str, int]:
    """A rollout (or an evaluation batch) of ``rows`` sequences over ``distinct`` prompts with ``cap`` K/V slots each.

    What it holds throughout (the rows' K/V, responses, sampling streams, thought state) plus the largest of its
    moments: the prompt's forward, run once per distinct prompt into a ``distinct``-row cache (before the rows' K/V
    exist); the copy of that cache to every row (both caches at once); a decode step; an eviction.
    """
    kv = kv_cache(s, rows, cap)
    parts = {
        f"K/V cache {rows} rows x {cap} slots": kv,
        "responses (ids, log-probs, mask)": rows * max_new * (8 + F32 + 1),
        "thought state": thought_state(s, rows),
    }
    first = kv_cache(s, distinct, cap) if distinct < rows else 0
    step = {
        f"prompt forward ({distinct} prompts x {s.prompt_len} tokens)": first + prefill(s, distinct, s.prompt_len) - kv,
        f"prompts' K/V copied to the rows ({distinct} -> {rows})": first,
        "decode step (logits + sampling)": sampling(s, rows, temperature, top_p, top_k),
        "eviction copies": eviction(s, rows),
    }
    worst = max(step, key=step.get)
    return {**parts, worst: step[worst]}


def experience(s: Setup) -> int:
    """A step's rollouts on this rank: prompt ids and mask, response ids, mask, log-probs, loss weights (and the
    reference log-probs when beta > 0), kept from sampling to the end of the update."""
    per_token = 8 + 1 + F32 + F32 + (F32 if s.beta > 0 else 0)
    return s.seqs * (s.prompt_len * 9 + s.max_new * per_token)


def optimizer(s: Setup) -> int:
    """The step after the replay: AdamW (foreach on a GPU) builds one float32 temporary the size of the adapter (the
    square root of the second moment); across ranks the gradient all-reduce first holds the flattened gradients and
    their reduced copy (pte.training.distributed.reduce_gradients)."""
    n = s.adapter_params() * F32
    return max(n, 2 * n if s.world > 1 else 0)


def graph_pools(s: Setup) -> int:
    """rollout.compile (estimate, not measured): each prompt bucket's captured decode step keeps its outputs in a
    private pool, at least its logits in the activation dtype and in float32."""
    return s.compiled_buckets * s.rollout_rows * s.arch.vocab * (s.a + F32)


def fsdp_units(s: Setup) -> int:
    """FSDP2 all-gathers a unit before its forward: the root (embedding, final norm, LM head) stays gathered while
    the model runs, and a decoder layer is gathered while the next one is prefetched."""
    return (s.arch.outer_params() + 2 * s.arch.layer_params()) * s.w if s.fsdp else 0
