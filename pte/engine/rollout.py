"""Batched sampling under a bounded cache (docs/method.md sections 2-4): the rollout of cache-aware GRPO.

Notation: B rows (prompts x samples), U distinct prompts, P padded prompt length, T generated tokens, V vocabulary.
Response token r_j is sampled from the logits of the forward of r_{j-1} (r_0 from the prompt). Evictions
happen right before a forward that would overflow the window; ``evict_before`` records the index i of
every forwarded token r_i that an eviction preceded, so replay can cut its chunks at the same points.
The prompt's forward runs once per distinct prompt (a GRPO group's samples share one) and its K/V are copied to
the group's rows. Each row draws its own uniforms (pte/engine/noise.py), so its tokens do not depend on its batch-mates.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

import torch
from torch import nn
from transformers import PreTrainedModel

from pte.engine.cache import BoundedKVCache, CachePolicy
from pte.engine.encoder import ThoughtEncoder, decoder_layers, get_thought, start_thought, unwrap
from pte.engine.forward import compiled, forward_tokens
from pte.engine.noise import RowNoise
from pte.engine.shapes import KVStore, compile_budget, kv_store
from pte.training.lockstep import is_sharded, running_anywhere


@dataclass(frozen=True)
class SamplingConfig:
    """Args:
    temperature: softmax temperature; 0 = greedy. Log-probs are taken at this temperature.
    top_p: nucleus sampling mass (1 = off).
    top_k: keep the k most likely tokens (0 = off).
    max_new_tokens: generation limit (paper 3072).
    stop_check_every: steps between checks that every row has finished (each check syncs the device); at each
        check, finished rows leave the batch (see :func:`rollout`).
    compile: run the one-token decode steps through ``torch.compile(mode="reduce-overhead")`` over a cache with
        fixed shapes (CUDA graphs on a GPU); the prompt's forward stays eager. Compiling costs minutes up front.
    max_compiles: with ``compile``, compiled versions of the decode step this process may build (one per cache
        shape, pte/engine/shapes.py); one more raises instead of silently decoding eagerly.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop_check_every: int = 8
    compile: bool = False
    max_compiles: int = 8


@dataclass
class Rollout:
    """Everything replay and the objective need from one batch of generations."""

    prompt_ids: torch.Tensor  # [B, P] left padded
    prompt_mask: torch.Tensor  # [B, P] bool, False on pads
    response_ids: torch.Tensor  # [B, T], pad after EOS
    response_mask: torch.Tensor  # [B, T] bool, True up to and including EOS
    logprobs: torch.Tensor  # [B, T] log-prob of each sampled token at the sampling temperature
    truncated: torch.Tensor  # [B] bool, no EOS within max_new_tokens
    policy: CachePolicy  # with the window resolved for this batch
    temperature: float
    evict_before: list[int] = field(default_factory=list)
    used_slots: list[int] = field(default_factory=list)  # occupied cache slots after each step
    held_rows: list[int] = field(default_factory=list)  # rows in the cache after each step (finished rows leave)
    slot_bytes: int = 0  # K/V bytes of one row in one occupied slot (all layers)
    attn_flops_per_key: int = 0  # attention FLOPs of one query against one cached key, all layers
    logits: torch.Tensor | None = None  # [B, T, V] raw logits, only with keep_logits (debugging, parity tests)

    def for_autograd(self) -> Rollout:
        """This rollout with every tensor made in inference mode copied out of it, so replay may save it for backward."""
        made = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(
            self, **{k: v.clone() for k, v in made.items() if isinstance(v, torch.Tensor) and v.is_inference()}
        )

    @property
    def kv_bytes(self) -> torch.Tensor:
        """K/V bytes held by the whole batch after each generated token, ``[T]``."""
        slots = torch.tensor(self.used_slots, dtype=torch.float64)
        return slots * torch.tensor(self.held_rows, dtype=torch.float64) * self.slot_bytes

    def stats(self) -> dict[str, float]:
        lengths = self.response_mask.sum(1).float()
        kv = self.kv_bytes
        return {
            "evictions": float(len(self.evict_before)),
            "evicted_tokens": float(len(self.evict_before) * self.policy.evict_tokens),
            # what each row's cache holds once generation ends (its size at the last step), summed over rows: divided
            # by the rows it is the K/V a sequence holds, however many rows were still generating at the end
            "kv_bytes_held": float(self.used_slots[-1] * self.slot_bytes * self.response_ids.shape[0])
            if self.used_slots
            else 0.0,
            "kv_bytes_peak": float(kv.max()) if len(kv) else 0.0,
            "response_length": float(lengths.mean()),
            "truncated_frac": float(self.truncated.float().mean()),
            "attn_tflops": self.attn_flops() / 1e12,
        }

    def attn_flops(self) -> float:
        """Attention FLOPs of the rollout counted from the cache sizes actually attended (paper, Table 1).

        QK^T and AV cost ``attn_flops_per_key`` per (query, cached key) pair. The prompt's prefill is causal
        over each row's real tokens; response token j's forward (j >= 1) attended ``used_slots[j]`` keys,
        counted for rows still generating.
        """
        lengths = self.prompt_mask.sum(1).double()
        prefill = float((lengths * (lengths + 1) / 2).sum())
        alive = self.response_mask[:, 1:].sum(0).double().cpu()  # rows that ran each decode forward
        decode = float((alive * torch.tensor(self.used_slots[1:], dtype=torch.float64)).sum())
        return (prefill + decode) * self.attn_flops_per_key


DRAW_BLOCK = 256  # vocabulary entries per block of the two-level inverse CDF in draw()


def prompt_positions(prompt_mask: torch.Tensor) -> torch.Tensor:
    """Absolute positions of left-padded prompts: 0..L_b-1 on real tokens, 0 on pads. ``[B, P]``."""
    return (prompt_mask.long().cumsum(1) - 1).clamp(min=0)


def sample(logits: torch.Tensor, cfg: SamplingConfig, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row from ``logits [B, V]`` with temperature / top-k / top-p, row b with uniform ``u[b]``.

    One log-softmax feeds both the draw and the returned log-prob ``[B]`` of the drawn token, which is
    taken under the temperature alone (top-k/top-p only restrict the draw). Greedy (temperature 0)
    scores at temperature 1. The draw inverts the CDF with one uniform per row (``torch.multinomial`` draws an
    exponential per vocabulary entry, ten times the cost on a CPU, and from a generator shared by the batch).
    """
    if cfg.temperature <= 0:
        logp = torch.log_softmax(logits, dim=-1)
        tok = logits.argmax(-1)
    else:
        logp = torch.log_softmax(logits if cfg.temperature == 1.0 else logits / cfg.temperature, dim=-1)
        allowed = logp
        if cfg.top_k > 0:
            kth = allowed.topk(min(cfg.top_k, allowed.shape[-1]), dim=-1).values[:, -1:]
            allowed = allowed.masked_fill(allowed < kth, float("-inf"))
        if cfg.top_p < 1.0:
            sorted_logp, order = allowed.sort(dim=-1, descending=True)
            probs = sorted_logp.softmax(-1)
            drop = probs.cumsum(-1) - probs > cfg.top_p  # keep the smallest prefix with mass >= top_p
            allowed = allowed.scatter(-1, order, sorted_logp.masked_fill(drop, float("-inf")))
        tok = draw(allowed.exp(), u)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One index per row of ``probs [B, V]`` (unnormalised, >= 0) with probability proportional to its entry.

    Inverse CDF with the row's uniform ``u [B]`` (float64 in (0, 1]), in two levels so no cumulative sum runs over
    the whole vocabulary: the first block of ``DRAW_BLOCK`` entries whose cumulative mass (float64) reaches
    ``u * total``, then the first entry inside it that reaches the rest. The rest is clamped to the block's own
    float64 sum, so rounding never selects an entry of zero mass.
    """
    b, v = probs.shape
    pad = -v % DRAW_BLOCK
    blocks = (nn.functional.pad(probs, (0, pad)) if pad else probs).view(b, -1, DRAW_BLOCK)  # [B, nb, block]
    coarse = blocks.sum(-1, dtype=torch.float64).cumsum(-1)  # [B, nb] mass up to the end of each block
    target = u[:, None] * coarse[:, -1:]  # [B, 1] in (0, total]
    k = torch.searchsorted(coarse, target).clamp_(max=coarse.shape[1] - 1)  # [B, 1] the block that reaches it
    before = torch.where(k > 0, coarse.gather(1, (k - 1).clamp(min=0)), 0.0)  # mass of the blocks before k
    fine = blocks.gather(1, k[:, :, None].expand(b, 1, DRAW_BLOCK))[:, 0].double().cumsum(-1)  # [B, block]
    j = torch.searchsorted(fine, torch.minimum(target - before, fine[:, -1:]))  # [B, 1]
    return (k * DRAW_BLOCK + j).squeeze(-1)


def new_cache(
    model: PreTrainedModel,
    policy: CachePolicy,
    prompt_len: int,
    max_new: int,
    static: bool = False,
    capacity: int = 0,
    store: KVStore | None = None,
) -> BoundedKVCache:
    """A cache for a batch padded to ``prompt_len``, with at least ``capacity`` slots (pte/engine/shapes.py buckets)."""
    slots = max(capacity, policy.capacity(prompt_len, max_new))
    return BoundedKVCache(len(decoder_layers(model)), policy, prompt_len, slots, static, store)


def attn_flops_per_key(model: PreTrainedModel) -> int:
    """FLOPs of QK^T plus AV for one query and one key over all layers: 2 matmuls x 2 x heads x head dim."""
    c = unwrap(model).config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 4 * c.num_attention_heads * head_dim * c.num_hidden_layers


def prefill(
    model: PreTrainedModel,
    cache: BoundedKVCache,
    thought: bool,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    once: bool = True,
) -> torch.Tensor:
    """The prompt's forward into ``cache``; the last position's logits ``[B, V]``.

    With ``once``, only the U distinct rows are forwarded, then the cache (and, with ``thought``, the encoder's states)
    copies each one to the rows that share it: a GRPO group's G samples pay one prompt forward, not G.
    """
    key = prompt_ids * 2 + prompt_mask  # [B, P] ids and pads together: a row is its prompt and its padding
    distinct, inverse = torch.unique(key, dim=0, return_inverse=True)  # [U, P], [B]
    last = prompt_ids.shape[1] - 1
    if not once or len(distinct) == len(key):
        return forward_tokens(model, cache, prompt_ids, prompt_positions(prompt_mask), prompt_mask, last)[:, -1]
    encoder = get_thought(model) if thought else None
    if encoder is not None:
        encoder.select_rows(torch.zeros(len(distinct), dtype=torch.long, device=key.device))  # S_g for U rows
    ids, mask = distinct // 2, (distinct % 2).bool()
    logits = forward_tokens(model, cache, ids, prompt_positions(mask), mask, last)[:, -1]  # [U, V]
    cache.select_rows(inverse.tolist())
    if encoder is not None:
        encoder.select_rows(inverse)
    return logits.index_select(0, inverse)


def decoding(fn: Callable[..., Rollout]) -> Callable[..., Rollout]:
    """Run a rollout ``fn(model, ...)`` without autograd and hand back tensors autograd can use.

    Inference mode skips autograd's bookkeeping on every op (11-13 % of a toy model's rollout on a CPU); the tensors it
    makes are copied out (:meth:`Rollout.for_autograd`) so replay may save them for backward. FSDP's gathered weights
    must stay normal tensors for its own backward, so a sharded model decodes under no_grad.
    """

    @functools.wraps(fn)
    def run(model: nn.Module, *args, **kwargs) -> Rollout:
        with torch.no_grad() if is_sharded(model) else torch.inference_mode():
            out = fn(model, *args, **kwargs)
        return out.for_autograd()

    return run


@dataclass
class _Decode:
    """The rows in the cache, indexed like its batch (finished rows leave at stop checks, see :func:`rollout`), and
    the rollout's outputs ``[B, T]``, indexed by rollout row."""

    rows: torch.Tensor  # [B'] each one's row in the rollout
    alive: torch.Tensor  # [B'] bool, not finished
    pos: torch.Tensor  # [B', 1] position of the last forwarded token, bumped in place
    last: torch.Tensor  # [B', 1] the token fed to the next decode step
    ones: torch.Tensor  # [B', 1] bool, the decode step's validity
    uniforms: torch.Tensor  # [B', T] float64, each row's draw at each step (pte/engine/noise.py)
    tokens: torch.Tensor  # [B, T] pad after EOS
    logprobs: torch.Tensor  # [B, T]
    mask: torch.Tensor  # [B, T] bool

    @classmethod
    def start(cls, prompt_mask: torch.Tensor, steps: int, pad_id: int, noise: RowNoise) -> _Decode:
        b, device = prompt_mask.shape[0], prompt_mask.device
        return cls(
            rows=torch.arange(b, device=device),
            alive=torch.ones(b, dtype=torch.bool, device=device),
            pos=prompt_mask.sum(1, keepdim=True) - 1,
            last=torch.empty(b, 1, dtype=torch.long, device=device),
            ones=torch.ones(b, 1, dtype=torch.bool, device=device),
            uniforms=noise.uniforms(),
            tokens=torch.full((b, steps), pad_id, dtype=torch.long, device=device),
            logprobs=torch.zeros(b, steps, device=device),
            mask=torch.zeros(b, steps, dtype=torch.bool, device=device),
        )

    def take(self, j: int, tok: torch.Tensor, logp: torch.Tensor, pad_id: int, eos: torch.Tensor) -> None:
        """Record step ``j``'s sampled tokens and log-probs ``[B']`` (pads for finished rows) and feed them next."""
        tok = tok.masked_fill_(~self.alive, pad_id)
        self.last.copy_(tok[:, None])
        self.tokens[self.rows, j] = tok
        self.logprobs[self.rows, j] = logp.masked_fill_(~self.alive, 0.0)
        self.mask[self.rows, j] = self.alive
        self.alive &= ~torch.isin(tok, eos)

    def keep(self, stay: torch.Tensor) -> None:
        """Keep the rows at positions ``stay [B'']`` of the current batch."""
        self.rows, self.alive, self.pos = self.rows[stay], self.alive[stay], self.pos[stay]
        self.last, self.ones, self.uniforms = self.last[stay], self.ones[stay], self.uniforms[stay]


@decoding
def rollout(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    policy: CachePolicy,
    sampling: SamplingConfig,
    eos_ids: list[int],
    pad_id: int,
    generator: torch.Generator | None = None,
    keep_logits: bool = False,
    noise: RowNoise | None = None,
    capacity: int = 0,
    prefill_once: bool = True,
) -> Rollout:
    """Generate up to ``max_new_tokens`` for each row under ``policy``; finished rows stop counting.

    Every row generates one token per step; each row evicts by its own positions (synchronously across the
    batch when the prompt is retained), and ``evict_before`` lists every step at which some row evicted. At each
    stop check, rows that have finished leave the batch (cache, thought state and all), so they stop costing
    attention and evictions; this is skipped where the batch shape must stay: compiled steps, a sharded model
    (FSDP; its loop stops only once every process is done, pte.training.lockstep) and per-row eviction, whose steps
    ``evict_before`` must keep for every row.

    Args:
        generator: seeds the rows' uniform streams (one draw) when ``noise`` is not given.
        noise: the rows' streams (pte/engine/noise.py), e.g. this block's share of a whole step's rows.
        capacity: at least this many cache slots (a prompt bucket's, pte/engine/shapes.py).
        prefill_once: forward each distinct prompt once (:func:`prefill`); False forwards every row's (a baseline).
    """
    prompt_mask = prompt_mask.bool()
    b, p = prompt_ids.shape
    t_max = sampling.max_new_tokens
    store = kv_store(model) if sampling.compile else None  # compiled steps keep their buffers' addresses
    cache = new_cache(model, policy, p, t_max, sampling.compile, capacity, store)
    encoder = start_thought(model, policy.uses_thought, b)
    lockstep = is_sharded(model)
    shrinks = not (sampling.compile or lockstep or (policy.bounded and not policy.retain_prompt))
    eos = torch.tensor(eos_ids, device=prompt_ids.device)
    noise = noise if noise is not None else RowNoise.draw(generator, b, t_max, prompt_ids.device)
    d = _Decode.start(prompt_mask, t_max, pad_id, noise)
    step_model = compiled(model) if sampling.compile else model
    evict_before, used, held, kept = [], [], [], []

    logits = prefill(model, cache, policy.uses_thought, prompt_ids, prompt_mask, prefill_once)
    steps = 0
    with compile_budget(sampling.max_compiles) if sampling.compile else contextlib.nullcontext():
        for j in range(t_max):
            if j > 0:
                if _evict(cache, encoder, policy):
                    evict_before.append(j - 1)
                d.pos.add_(1)
                if sampling.compile:  # a new step: the previous step's graph outputs are dead (CUDA graphs reuse them)
                    torch.compiler.cudagraph_mark_step_begin()
                logits = forward_tokens(step_model, cache, d.last, d.pos, d.ones)[:, -1]
            if keep_logits:
                kept.append(logits.new_zeros(b, logits.shape[-1]).index_copy_(0, d.rows, logits))
            d.take(j, *sample(logits, sampling, d.uniforms[:, j]), pad_id, eos)
            used.append(cache.used)
            held.append(len(d.rows))
            steps = j + 1
            if steps % sampling.stop_check_every == 0:
                if not running_anywhere(d.alive, lockstep):
                    break
                if shrinks and not bool(d.alive.all()):
                    stay = d.alive.nonzero().squeeze(1)  # [B''] positions in the current batch
                    cache.select_rows(stay.tolist())
                    if policy.uses_thought:
                        encoder.select_rows(stay)
                    d.keep(stay)

    t = int(d.mask.sum(1).max()) if steps else 0
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=d.tokens[:, :t],
        response_mask=d.mask[:, :t],
        logprobs=d.logprobs[:, :t],
        truncated=torch.zeros(b, dtype=torch.bool, device=d.alive.device).index_copy_(0, d.rows, d.alive),
        policy=policy,
        temperature=sampling.temperature,
        evict_before=[i for i in evict_before if i < t - 1],
        used_slots=used[:t],
        held_rows=held[:t],
        logits=torch.stack(kept, dim=1)[:, :t] if keep_logits else None,
        slot_bytes=cache.slot_bytes,
        attn_flops_per_key=attn_flops_per_key(model),
    )


def _evict(cache: BoundedKVCache, encoder: ThoughtEncoder | None, policy: CachePolicy) -> bool:
    """Evict what is due before the next decode step, folding it into the thought state under ``pte``."""
    evictions = cache.evict_due()
    if policy.encodes_evicted:
        for evicted in evictions:
            encoder.absorb(*evicted)
    return bool(evictions)
