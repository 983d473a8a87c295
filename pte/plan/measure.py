"""Measured against predicted: exact CPU tensor peaks of each phase on small random models (docs/scale.md).

Every phase runs the project's own code on a random Llama of the given size (grouped-query attention, 4/2 heads,
MLP 3 x hidden) and is measured with :class:`pte.memory.TensorPeak`, which counts bytes allocated above the level at
entry; the prediction compared is therefore the phase's transient part (what the plan adds on top of the persistent
weights, adapter, gradients and optimiser state). The replay is measured on the second update, so the adapter's
gradients already exist, as in training. Predictions use ``device="cpu"`` (pte.plan.phases.cpu_head_copy).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pte.config import METHOD_POLICY, Config, load_config
from pte.memory import TensorPeak
from pte.methods import add_adapter
from pte.models import tiny_model
from pte.plan import activations, phases
from pte.plan.arch import Arch
from pte.plan.setup import Setup, resolve
from pte.replay import reference_logprobs
from pte.rollout import Rollout, SamplingConfig, rollout
from pte.sft import eviction_schedule
from pte.update import Experience, policy_update

# Small enough for a unit test (seconds on one CPU thread), large enough that no fixed overhead dominates.
SIZES = {"h64": (64, 2, 2048), "h128": (128, 3, 4096), "h256": (256, 4, 8192)}  # hidden, layers, vocab
SMALL = ["thought.rank=8", "thought.global_tokens=8", "lora.rank=8", "rollout.group_size=2"]


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


def small_config(
    method: str, dtype: str, rows: int = 2, window: int = 24, new: int = 72, extra: tuple[str, ...] = ()
) -> Config:
    """A config whose rollout evicts several times and whose eval runs the method's own cache policy."""
    return load_config(None, [
        f"method={method}", f"model.dtype={dtype}", f"cache.window={window}", f"rollout.micro_batch={rows}",
        f"rollout.batch_size={rows}", f"rollout.max_new_tokens={new}", f"eval.max_new_tokens={new}",
        f"eval.max_rows={rows}", f"eval.windows=[{window}]", f"eval.policies=[{METHOD_POLICY[method]}]",
        *SMALL, *extra,
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


def check(
    size: str, cfg: Config, wanted: tuple[str, ...] = ("rollout", "replay"), prompt_len: int = 24
) -> list[Check]:
    """Measure the ``wanted`` phases (``rollout``, ``reference``, ``replay``, ``eval``) of ``cfg`` at ``size``."""
    model = small_model(size, cfg)
    s = resolve(cfg, Arch.from_hf(model.config), 1, prompt_len, device="cpu")
    gen = torch.Generator().manual_seed(0)
    ro = synthetic(cfg, s, gen)
    measured: dict[str, int] = {}
    predicted: dict[str, int] = {}

    def sample(rows: int, cap: int, new: int, temperature: float, top_p: float, policy) -> tuple[int, int]:
        sampling = SamplingConfig(temperature, top_p, 0, new)
        ids = ro.prompt_ids[:1].expand(rows, -1).clone()
        mask = torch.ones_like(ids, dtype=torch.bool)
        measured_peak = peak(lambda: rollout(model, ids, mask, policy, sampling, [], 0, gen))
        return measured_peak, sum(phases.rollout(s, rows, cap, new, temperature, top_p).values())

    r, e = cfg.rollout, cfg.eval
    if "rollout" in wanted:
        measured["rollout"], predicted["rollout"] = sample(s.rollout_rows, s.cap, s.max_new, r.temperature, r.top_p,
                                                           s.policy)
    if "eval" in wanted:
        policy = cfg.cache.policy_for(s.prompt_len, cfg.eval_policy)
        cap = max(s.eval_caps)
        measured["eval"], predicted["eval"] = sample(s.eval_rows, cap, e.max_new_tokens, e.temperature, e.top_p,
                                                     policy)
    if "reference" in wanted:
        measured["reference"] = peak(lambda: reference_logprobs(model, ro, cfg.replay))
        predicted["reference"] = sum(activations.reference(s).values())
    if "replay" in wanted:
        exp = Experience([ro], [torch.linspace(-1, 1, s.rollout_rows)], [torch.full(ro.logprobs.shape, 1e-2)], [None])
        policy_update(model, exp, cfg, lambda loss: loss.backward())  # the adapter's gradients now exist
        measured["replay"] = peak(lambda: policy_update(model, exp, cfg, lambda loss: loss.backward()))
        predicted["replay"] = sum(activations.replay(s).values())
    return [Check(size, cfg.model.dtype, cfg.method, k, predicted[k], measured[k]) for k in measured]
