"""Training-pass memory: what autograd keeps for a replay forward, piece by piece (pte/engine/replay.py).

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
from pte.plan.phases import F32, kv_cache, thought_state
from pte.plan.setup import Setup

CPU_RNG_STATE = 5056  # bytes of torch.get_rng_state(), which every checkpointed call stashes (host memory)
ATTN_IN = ("q_proj", "k_proj", "v_proj")
MLP_IN = ("gate_proj", "up_proj")


@dataclass(frozen=True)
class Piece:
    """One replay forward: ``n`` new tokens per row attending ``keys`` keys, ``logits`` positions scored."""

    n: int
    keys: int
    logits: int


def chunks(s: Setup) -> list[tuple[Piece, ...]]:
    """The distinct replay chunks of a worst-case rollout (every row runs to ``max_new_tokens``), as their forwards.

    The first chunk is prompt + W tokens (prompt + T under the full cache), scored from the last prompt token on;
    each later chunk is the e tokens between two evictions and attends the stored P + W slots plus itself.
    ``replay.max_chunk_tokens`` runs a chunk as several forwards, each attending the ones before it live; all of a
    chunk's forwards keep their graphs until its loss is backpropagated.
    """
    p = s.prompt_len
    out = [_cut(p + (s.policy.window if s.policy.bounded else s.max_new), 0, p - 1, s.max_chunk_tokens)]
    if s.policy.bounded and s.max_new > s.policy.window:
        out.append(_cut(min(s.policy.evict_tokens, s.max_new - s.policy.window), s.cap, 0, s.max_chunk_tokens))
    return out


def _cut(length: int, stored: int, scored_from: int, cap: int) -> tuple[Piece, ...]:
    """Forwards of at most ``cap`` tokens (0 = one) of a ``length``-token chunk that follows ``stored`` slots."""
    step = cap or length
    out = []
    for start in range(0, length, step):
        n = min(step, length - start)
        out.append(Piece(n, stored + start + n, max(0, start + n - max(start, scored_from))))
    return tuple(out)


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


def common(s: Setup, rows: int, pc: Piece) -> int:
    """Per forward, what every layer's backward reads: the additive mask ``[rows, 1, n, k]`` and the rotary cos/sin."""
    return rows * pc.n * (pc.keys * s.w + 2 * s.arch.head_dim * s.a)


def head_inputs(s: Setup, rows: int, pc: Piece) -> int:
    """Per forward, the final norm's float32 input (kept for its backward) and its output (the head's input)."""
    return rows * pc.n * s.arch.hidden * (F32 + s.a)


def scored_copy(s: Setup, rows: int, chunk: tuple[Piece, ...], first: bool) -> int:
    """The scored positions' hidden states as one contiguous tensor: the concatenation of a chunk's forwards, or of
    the first chunk the copy that drops the prompt's positions; a later chunk of one forward needs none."""
    return rows * sum(pc.logits for pc in chunk) * s.arch.hidden * s.a if first or len(chunk) > 1 else 0


def layer_saved(s: Setup, rows: int, pc: Piece) -> int:
    return rows * (pc.n * per_token(s) + pc.keys * per_key(s))


def forward_saved(s: Setup, rows: int, chunk: tuple[Piece, ...], first: bool) -> int:
    """What a chunk's forwards keep until its backward: every layer's saved activations (with checkpointing only each
    layer's input), the shared tensors, the live K/V that later forwards of the chunk attend, the scored copy."""
    ar = s.arch
    total = 0
    for i, pc in enumerate(chunk):
        layer = rows * pc.n * ar.hidden * s.a if s.checkpointing else layer_saved(s, rows, pc)
        live = 2 * rows * pc.n * ar.kv_dim * s.a if i < len(chunk) - 1 else 0
        total += ar.layers * (layer + live) + common(s, rows, pc) + head_inputs(s, rows, pc)
    stashed = ar.layers * len(chunk) if s.checkpointing else 0
    return total + scored_copy(s, rows, chunk, first) + rng_states(s, stashed + head_pieces(s, rows, chunk))


def head_pieces(s: Setup, rows: int, chunk: tuple[Piece, ...]) -> int:
    positions = rows * sum(pc.logits for pc in chunk)
    return -(-positions // (s.logits_chunk or positions or 1))


def rng_states(s: Setup, calls: int) -> int:
    """CPU only: each checkpointed call (a decoder layer under ``replay.checkpointing``, every LM-head piece) keeps
    the CPU generator's state until its backward; on a GPU that is host memory."""
    return calls * CPU_RNG_STATE if s.device == "cpu" else 0


def state_graph(s: Setup, rows: int, later: bool) -> int:
    """PTE: what the backward through the thought state keeps per layer: the frozen projections of the global tokens
    ``G x (H_q D + 2 H_kv D)`` and, after an eviction, the float32 evicted keys and values the latent projections
    read; ``thought.state_grad: chain`` keeps every eviction's until the micro-batch ends."""
    if s.method != "pte":
        return 0
    ar = s.arch
    per_update = ar.layers * F32 * s.global_tokens * (ar.q_dim + 2 * ar.kv_dim)
    evicted = ar.layers * F32 * rows * s.policy.evict_tokens * 2 * ar.kv_dim
    if s.state_grad == "chain":
        evictions = max(0, (s.max_new - s.policy.window) // s.policy.evict_tokens)
        return per_update + evictions * (per_update + evicted)
    return per_update + (evicted if later else 0)


def head(s: Setup, rows: int, chunk: tuple[Piece, ...]) -> int:
    """The LM head's worst piece: ``replay.logits_chunk`` positions (0 = all the chunk's) of ``[positions, V]``
    float32 tensors, four at once: the logits, their log-softmax and the entropy's two temporaries, in the forward
    and again when the backward recomputes the piece."""
    positions = rows * sum(pc.logits for pc in chunk)
    if s.logits_chunk:
        positions = min(positions, s.logits_chunk)
    return positions * s.arch.vocab * 4 * F32


def backward_layer(s: Setup, rows: int, chunk: tuple[Piece, ...], first: bool) -> int:
    """The top layer's backward of the chunk's last forward, over what the forwards kept.

    Added: with checkpointing the layer's recomputed activations (its input is already kept); the gradients alive in
    it (the MLP's three ``[n, I]`` or attention's of the query and the repeated keys and values, plus the incoming
    hidden-sized one); the layer's adapter gradients before they are accumulated; for a chunk run as several
    forwards, every layer's key/value gradient held for the earlier forwards (each a view of the whole
    ``[rows, H_kv, k, D]`` gradient) and the scored positions' hidden gradient. Freed by then: the last forward's
    final-norm input, and the scored copy of a one-forward chunk (the head's backward has run).
    """
    ar, a, pc = s.arch, s.a, chunk[-1]
    mlp = 3 * rows * pc.n * ar.intermediate * a
    attn = rows * (pc.n * ar.q_dim + 2 * pc.keys * ar.q_dim) * a
    recompute = 0
    if s.checkpointing:
        recompute = layer_saved(s, rows, pc) - (rows * pc.n * ar.hidden * F32 if a == F32 else 0)
    live_grads = 2 * ar.layers * rows * pc.keys * ar.kv_dim * a if len(chunk) > 1 else 0
    if len(chunk) == 1:
        freed = rows * pc.n * ar.hidden * F32 + scored_copy(s, rows, chunk, first)
    else:
        freed = head_inputs(s, rows, pc) - rows * sum(p.logits for p in chunk) * ar.hidden * a
    freed += rng_states(s, head_pieces(s, rows, chunk))
    adapter_grads = s.adapter_params() // ar.layers * F32
    return recompute + max(mlp, attn) + rows * pc.n * ar.hidden * a + live_grads + adapter_grads - freed


def replay(s: Setup) -> dict[str, int]:
    """The replay phase's transient for its worst chunk: the replay's own cache and state, what the chunk's forwards
    keep, and the larger of the LM-head peak and the top layer's backward."""
    rows = s.replay_rows

    def tops(i: int, chunk: tuple[Piece, ...]) -> dict[str, int]:
        positions = rows * sum(pc.logits for pc in chunk)
        return {
            f"LM head ({min(positions, s.logits_chunk or positions)} positions x V)": head(s, rows, chunk),
            f"top layer's backward{' (recomputed)' if s.checkpointing else ''}": backward_layer(s, rows, chunk, i == 0),
        }

    def kept(i: int, chunk: tuple[Piece, ...]) -> int:
        return forward_saved(s, rows, chunk, i == 0) + state_graph(s, rows, i > 0)

    i, chunk = max(enumerate(chunks(s)), key=lambda c: kept(*c) + max(tops(*c).values()))
    top = max(tops(i, chunk).items(), key=lambda kv: kv[1])
    tokens = sum(pc.n for pc in chunk)
    what = "layer inputs" if s.checkpointing else "activations"
    return {
        f"replay K/V cache {rows} rows x {s.cap} slots": kv_cache(s, rows, s.cap),
        "thought state": thought_state(s, rows),
        f"saved {what}: {tokens}-token chunk in {len(chunk)} forward(s)": forward_saved(s, rows, chunk, i == 0),
        "thought-state graph": state_graph(s, rows, i > 0),
        top[0]: top[1],
    }


def reference(s: Setup) -> dict[str, int]:
    """pi_ref's log-probs (grpo.beta > 0): a no-grad full-cache replay of P + T tokens, adapters off, in blocks of
    ``replay.micro_batch`` rows and forwards of at most ``replay.max_chunk_tokens`` tokens.

    Its peak is the larger of a forward's last layer (mask, cos/sin and a prompt-forward-like working set) and the
    LM head: the hidden states kept for it and four ``[positions, V]`` float32 tensors (logits, log-softmax and the
    entropy's two temporaries) per ``replay.logits_chunk`` piece.
    """
    rows, ar, a = s.replay_rows, s.arch, s.a
    cap = s.prompt_len + s.max_new
    chunk = _cut(cap, 0, s.prompt_len - 1, s.max_chunk_tokens)

    def layer(pc: Piece) -> int:
        n = rows * pc.n
        work = max(3 * n * ar.intermediate * a, (3 * n * ar.q_dim + 2 * rows * pc.keys * ar.q_dim) * a)
        return common(s, rows, pc) + 4 * n * ar.hidden * a + work

    scored = rows * sum(pc.logits for pc in chunk)
    hidden = rows * sum(pc.n for pc in chunk) * ar.hidden * a + scored_copy(s, rows, chunk, True)
    logits = min(scored, s.logits_chunk or scored) * ar.vocab * 4 * F32
    moments = {
        f"no-grad forward, {max(pc.n for pc in chunk)} tokens x {cap} keys": max(layer(pc) for pc in chunk),
        f"LM head ({min(scored, s.logits_chunk or scored)} positions x V)": hidden + logits,
    }
    top = max(moments, key=moments.get)
    return {f"reference K/V cache {rows} rows x {cap} slots": kv_cache(s, rows, cap), top: moments[top]}
