"""Measured against predicted: exact CPU tensor peaks of each phase on small random models (docs/scale.md).

Every phase runs the project's own code on a random Llama of the given size (grouped-query attention, 4/2 heads,
MLP 3 x hidden) and is measured with :class:`pte.training.memory.TensorPeak`, which counts bytes allocated above the
level at entry; the prediction compared is therefore the phase's transient part (what the plan adds on top of the
persistent weights, adapter, gradients and optimiser state). The replay is measured on the second update, so the
adapter's gradients already exist, as in training. Predictions use ``device="cpu"`` (pte.plan.phases.cpu_head_copy).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pte.config import METHOD_POLICY, Config, load_config
from pte.engine.encoder import start_thought
from pte.engine.forward import forward_tokens
from pte.engine.replay import reference_logprobs
from pte.engine.rollout import Rollout, SamplingConfig, new_cache, prompt_positions, rollout
from pte.engine.update import Experience, policy_update, replay_limits
from pte.models.tiny import tiny_model
from pte.plan import activations, phases
from pte.plan.arch import Arch
from pte.plan.setup import Setup, resolve
from pte.training.memory import TensorPeak
from pte.training.methods import add_adapter
from pte.training.sft import eviction_schedule

# Small enough for a unit test (seconds on one CPU thread), large enough that no fixed overhead dominates.
SIZES = {"h64": (64, 2, 2048), "h128": (128, 2, 4096), "h256": (256, 3, 8192)}  # hidden, layers, vocab
SMALL = ["thought.rank=8", "thought.global_tokens=8", "lora.rank=8"]


@dataclass(frozen=True)
class Check:
    """One phase of one setting: predicted and measured transient bytes."""

    size: str
    dtype: str
    method: str
    phase: str
    predicted: int
    measured: int

    @property
    def ratio(self) -> float:
        return self.predicted / self.measured


def small_config(method: str, dtype: str, window: int = 16, new: int = 24, extra: tuple[str, ...] = ()) -> Config:
    """Four rows (two GRPO groups, or two problems x two samples) decoded at once, replayed two at a time; the
    rollout evicts several times and eval runs the method's own cache policy."""
    return load_config(None, [
        f"method={method}", f"model.dtype={dtype}", f"cache.window={window}", "rollout.batch_size=4",
        "rollout.group_size=2", "rollout.micro_batch=2", f"rollout.max_new_tokens={new}", f"eval.max_new_tokens={new}",
        "eval.batch_size=2", "eval.n_samples=2", "eval.k=[1]", "eval.max_rows=4", f"eval.windows=[{window}]",
        f"eval.policies=[{METHOD_POLICY[method]}]", "eval.temperature=0.6", "eval.top_p=0.95", *SMALL, *extra,
    ])  # fmt: skip


def small_model(size: str, cfg: Config) -> torch.nn.Module:
    hidden, layers, vocab = SIZES[size]
    dims = {"hidden_size": hidden, "intermediate_size": 3 * hidden, "num_hidden_layers": layers}
    model = tiny_model("llama", vocab, num_attention_heads=4, num_key_value_heads=2, **dims)
    return add_adapter(model.to(getattr(torch, cfg.model.dtype)), cfg)


def peak(fn) -> int:
    with TensorPeak() as tp:
        fn()
    return tp.peak


def synthetic(cfg: Config, s: Setup, gen: torch.Generator) -> Rollout:
    """A rollout of random tokens that runs to ``max_new_tokens`` (the plan's worst case) with its eviction steps."""
    rows, p, t, v = s.rollout_rows, s.prompt_len, s.max_new, s.arch.vocab
    ids = torch.randint(4, v, (rows, p), generator=gen)
    mask = torch.ones_like(ids, dtype=torch.bool)
    resp = torch.randint(4, v, (rows, t), generator=gen)
    return Rollout(
        ids, mask, resp, torch.ones_like(resp, dtype=torch.bool), torch.full((rows, t), -3.0),
        torch.zeros(rows, dtype=torch.bool), s.policy, cfg.rollout.temperature,
        evict_before=eviction_schedule(s.policy, mask, t),
    )  # fmt: skip


def check(size: str, cfg: Config, wanted: tuple[str, ...] = ("rollout", "replay"), prompt_len: int = 24) -> list[Check]:
    """Measure the ``wanted`` phases (``rollout``, ``reference``, ``replay``, ``eval``) of ``cfg`` at ``size``, or the
    ``eviction`` moment alone (a rollout's peak is usually its prompt forward or a decode step)."""
    model = small_model(size, cfg)
    s = resolve(cfg, Arch.from_hf(model.config), 1, prompt_len, device="cpu")
    gen = torch.Generator().manual_seed(0)
    ro = synthetic(cfg, s, gen)
    measured: dict[str, int] = {}
    predicted: dict[str, int] = {}

    def sample(rows: int, distinct: int, cap: int, new: int, temperature: float, top_p: float, policy) -> tuple:
        """A rollout of ``distinct`` prompts, each repeated for consecutive rows (a GRPO group, a problem's samples)."""
        sampling = SamplingConfig(temperature, top_p, 0, new)
        ids = ro.prompt_ids[:distinct].repeat_interleave(rows // distinct, 0)
        mask = torch.ones_like(ids, dtype=torch.bool)
        measured_peak = peak(lambda: rollout(model, ids, mask, policy, sampling, [], 0, gen))
        return measured_peak, sum(phases.rollout(s, rows, distinct, cap, new, temperature, top_p).values())

    r, e = cfg.rollout, cfg.eval
    if "rollout" in wanted:
        args = (s.rollout_rows, s.rollout_prompts, s.cap, s.max_new, r.temperature, r.top_p, s.policy)
        measured["rollout"], predicted["rollout"] = sample(*args)
    if "eval" in wanted:
        policy = cfg.cache.policy_for(s.prompt_len, cfg.eval_policy)
        args = (s.eval_rows, s.eval_prompts, max(s.eval_caps), e.max_new_tokens, e.temperature, e.top_p, policy)
        measured["eval"], predicted["eval"] = sample(*args)
    if "reference" in wanted:
        measured["reference"] = peak(lambda: reference_logprobs(model, ro, replay_limits(cfg)))
        predicted["reference"] = sum(activations.reference(s).values())
    if "eviction" in wanted and s.policy.bounded:
        measured["eviction"] = eviction_peak(model, s, ro)
        predicted["eviction"] = phases.eviction(s, s.rollout_rows)
    if "replay" in wanted:
        adv = torch.linspace(-1, 1, s.rollout_rows)
        exp = Experience([ro], [adv], [torch.full(ro.logprobs.shape, 1e-2)], [None])
        policy_update(model, exp, cfg, lambda loss: loss.backward())  # the adapter's gradients now exist
        measured["replay"] = peak(lambda: policy_update(model, exp, cfg, lambda loss: loss.backward()))
        predicted["replay"] = sum(activations.replay(s).values())
    return [Check(size, cfg.model.dtype, cfg.method, k, predicted[k], measured[k]) for k in measured]


@torch.no_grad()
def eviction_peak(model: torch.nn.Module, s: Setup, ro: Rollout) -> int:
    """The largest eviction (with the thought encoder's absorption) of a decode loop over ``ro``'s tokens, alone."""
    rows = ro.prompt_ids.shape[0]
    cache = new_cache(model, s.policy, s.prompt_len, s.max_new)
    encoder = start_thought(model, s.policy.uses_thought, rows)
    forward_tokens(model, cache, ro.prompt_ids, prompt_positions(ro.prompt_mask), ro.prompt_mask, s.prompt_len - 1)
    pos, ones = ro.prompt_mask.sum(1, keepdim=True) - 1, torch.ones(rows, 1, dtype=torch.bool)

    def evict() -> None:
        for evicted in cache.evict_due():
            if s.policy.encodes_evicted:
                encoder.absorb(*evicted)

    worst = 0
    for j in range(s.max_new - 1):
        worst = max(worst, peak(evict))
        pos.add_(1)
        forward_tokens(model, cache, ro.response_ids[:, j : j + 1], pos, ones)
    return worst


BOUNDS = ("replay.checkpointing=true", "replay.max_chunk_tokens=12", "replay.logits_chunk=8")


def validation_table() -> str:
    """Markdown: every size x precision x method x phase, then the replay under every bound (docs/scale.md)."""
    lines = ["| size | dtype | method | replay bounds | phase | predicted KiB | measured KiB | ratio |"]
    lines.append("|---|---|---|---|---|---|---|---|")
    for bounds in ((), BOUNDS):
        for size in SIZES:
            for dtype in ("float32", "bfloat16"):
                for method in ("pte", "lora_c", "lora"):
                    wanted = ("replay",) if bounds else ("rollout", "eviction", "eval", "reference", "replay")
                    for c in check(size, small_config(method, dtype, extra=bounds), wanted, prompt_len=16):
                        lines.append(
                            f"| {size} | {dtype} | {method} | {'all' if bounds else 'none'} | {c.phase} | "
                            f"{c.predicted / 1024:.0f} | {c.measured / 1024:.0f} | {c.ratio:.3f} |"
                        )
    return "\n".join(lines)
