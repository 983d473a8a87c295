"""Per-rank peak memory of a training config, by phase and component, before anything runs (docs/scale.md).

``plan(cfg, gpu_mem_gb)`` resolves the config's sizes (pte/plan/setup.py), counts the bytes of every component
(pte/plan/phases.py, pte/plan/activations.py) and says which phase sets the peak and whether it fits. A phase's
total is the persistent part (weights, adapter, its gradients and AdamW moments, the step's experience) plus what
only that phase allocates; the peak is the largest phase total. Counts are tensor bytes: the CUDA context, NCCL
buffers and the caching allocator's slack are not modelled, which is what ``reserve`` leaves room for.
"""

from __future__ import annotations

from dataclasses import dataclass

from pte.config import Config
from pte.plan import activations, phases
from pte.plan.arch import Arch, arch_for
from pte.plan.setup import DEFAULT_PROMPT_LEN, Setup, resolve

GIB = 2**30
NAMES = {2: "16-bit", 4: "fp32"}

__all__ = ["DEFAULT_PROMPT_LEN", "Arch", "Phase", "Plan", "arch_for", "plan"]


@dataclass
class Phase:
    """One phase: what persists through it (by component) and what it adds (by component), in bytes."""

    name: str
    persistent: dict[str, int]
    transient: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.persistent.values()) + sum(self.transient.values())


@dataclass
class Plan:
    """A config's predicted per-rank memory. ``fits``: every phase's total within ``gpu_mem`` minus ``reserve``."""

    setup: Setup
    phases: list[Phase]
    gpu_mem: int
    reserve: float
    source: str = ""

    @property
    def peak_phase(self) -> Phase:
        return max(self.phases, key=lambda p: p.total)

    @property
    def peak(self) -> int:
        return self.peak_phase.total

    @property
    def train_peak(self) -> int:
        """The largest training phase (eval.py runs in its own process)."""
        return max(p.total for p in self.phases if p.name != "eval")

    @property
    def usable(self) -> int:
        return int(self.gpu_mem * (1 - self.reserve))

    @property
    def fits(self) -> bool:
        return self.peak <= self.usable

    def __str__(self) -> str:
        return render(self)


def plan(
    cfg: Config,
    gpu_mem_gb: float = 40.0,
    world: int | None = None,
    prompt_len: int = DEFAULT_PROMPT_LEN,
    arch: Arch | None = None,
    reserve: float = 0.1,
    device: str = "cuda",
) -> Plan:
    """Predict ``cfg``'s per-rank peak memory on ``world`` devices of ``gpu_mem_gb`` GiB each.

    Args:
        cfg: a loaded config (``pte.config.load_config``); method ``pte``, ``lora_c`` or ``lora``.
        world: ranks (default ``trainer.devices x trainer.num_nodes``); rollout.batch_size is split over them.
        prompt_len: the assumed padded prompt length P of a micro-batch (W = P when ``cache.window`` is 0).
        arch: model dimensions (default: from ``model.name``, see pte/plan/arch.py).
        reserve: fraction of the device kept free for what tensor counts miss (context, allocator slack).
        device: ``cuda``, or ``cpu`` to add the CPU kernels' own copies (validation, docs/scale.md).
    """
    s = resolve(cfg, arch or arch_for(cfg.model.name, cfg.model.revision), world, prompt_len, device)
    n = s.adapter_params()
    gathered = {"FSDP all-gathered units (root + 2 layers)": phases.fsdp_units(s)} if s.fsdp else {}
    share = f"1/{s.world} shard" if s.fsdp else "whole"
    train = {
        f"base weights ({NAMES[s.w]}, {share})": s.arch.params() * s.w // (s.world if s.fsdp else 1),
        "adapter (fp32)": n * phases.F32,
        "adapter grads (fp32)": n * phases.F32,
        "AdamW moments (2 x fp32)": 2 * n * phases.F32,
        f"experience ({s.seqs} sequences)": phases.experience(s),
    }
    r = cfg.rollout
    roll = phases.rollout(
        s, s.rollout_rows, s.rollout_prompts, s.rollout_slots, s.max_new, r.temperature, r.top_p, r.top_k
    )
    if s.compiled_buckets:  # the compiled decode's K/V store and graph pools outlive the rollout
        kept = {k: roll.pop(k) for k in list(roll) if k.startswith("K/V cache")}
        train = {
            **train,
            **{f"{k} (compiled: kept)": v for k, v in kept.items()},
            "CUDA-graph pools (estimate)": phases.graph_pools(s),
        }
    out = [Phase("rollout", train, {**gathered, **roll})]
    if s.beta > 0:
        out.append(Phase("reference", train, {**gathered, **activations.reference(s)}))
    out.append(Phase("replay", train, {**gathered, **activations.replay(s)}))
    out.append(Phase("optimizer", train, {"gradient all-reduce / AdamW temporaries": phases.optimizer(s)}))
    e = cfg.eval
    evaluation = {f"base weights ({NAMES[s.w]}, whole)": s.arch.params() * s.w, "adapter (fp32)": n * phases.F32}
    cap = max(s.eval_caps)
    evaluate = phases.rollout(s, s.eval_rows, s.eval_prompts, cap, e.max_new_tokens, e.temperature, e.top_p)
    out.append(Phase("eval", evaluation, evaluate))
    return Plan(s, out, int(gpu_mem_gb * GIB), reserve)


def gib(x: int) -> str:
    return f"{x / GIB:8.2f}"


def render(p: Plan) -> str:
    """The plan as a table: persistent components, each phase's own components and total, the verdict."""
    s, ar = p.setup, p.setup.arch
    window = f"W = {s.policy.window}" if s.policy.bounded else "full cache"
    source = f" for {p.source}" if p.source else ""
    lines = [
        f"memory plan{source}: method={s.method}, {s.world} rank(s), {NAMES[s.w]} base, {NAMES[s.a]} activations",
        (
            f"model: hidden {ar.hidden}, {ar.layers} layers, {ar.heads}/{ar.kv_heads} heads, MLP {ar.intermediate}, "
            f"vocab {ar.vocab}, {ar.params() / 1e9:.2f}B parameters; adapter {s.adapter_params() / 1e6:.1f}M"
        ),
        (
            f"assumed prompt length P = {s.prompt_len} tokens (--prompt-len); {window}, T = {s.max_new}; per rank: "
            f"{s.seqs} sequences, decoded {s.rollout_rows} rows at once, replayed {s.replay_rows} at once"
        ),
        f"{'component':<62}{'GiB':>8}",
    ]
    shown: set[str] = set()
    for ph in p.phases:
        persistent = tuple(ph.persistent.items())
        if persistent not in shown:
            shown.add(persistent)
            lines.append(f"persistent ({'eval.py' if ph.name == 'eval' else 'training'})")
            lines += [f"  {k:<60}{gib(v)}" for k, v in persistent]
        lines.append(f"{ph.name}")
        lines += [f"  {k:<60}{gib(v)}" for k, v in ph.transient.items() if v]
        lines.append(f"  {'= ' + ph.name + ' total':<60}{gib(ph.total)}")
    peak = p.peak_phase
    verdict = "fits" if p.fits else "does NOT fit"
    lines.append(
        f"peak {peak.total / GIB:.2f} GiB in {peak.name} ({100 * peak.total / p.gpu_mem:.1f} % of "
        f"{p.gpu_mem / GIB:g} GiB); training peak {100 * p.train_peak / p.gpu_mem:.1f} %: {verdict} "
        f"(usable {p.usable / GIB:.1f} GiB after a {100 * p.reserve:g} % reserve)"
    )
    return "\n".join(lines)
