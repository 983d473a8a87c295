"""Training callbacks: periodic fixed-budget evaluation and memory curves.

The periodic evaluation is the docs/method.md §5 protocol in miniature: greedy decoding of held-out prompts under the
run's own cache policy and window, graded like the benchmarks. The memory curves are the two views behind the
paper's memory claims: KV bytes held against generated position (flat once the window is full) and the peak memory
of each training phase (rollout, replay, optimizer) tracked by ``GRPOModule.memory`` (on CUDA; on CPU only the
process's resident-set peak, see pte/training/memory.py). The evaluation runs under the precision plugin's forward
context, so a ``bf16-mixed`` run evaluates under the autocast its rollouts ran in.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import lightning as L
import torch
from matplotlib.figure import Figure

from pte.config import Config
from pte.engine.rollout import SamplingConfig
from pte.evaluation.evaluate import Setting, batch_records, grade_groups, sample_batch
from pte.evaluation.plots import MIB, figure_array, kv_memory_curves, memory_phases, summarize
from pte.training.distributed import gather_object, rank_world
from pte.training.lockstep import is_sharded, most_over_ranks
from pte.training.rewards import Grader

log = logging.getLogger(__name__)

VAL_KEYS = ("response_length", "truncated_frac", "evictions", "tokens_per_s", "gold_errors")


def format_bytes(n: float) -> str:
    """``12.3 KiB``: bytes in the largest binary unit that keeps the number below 1024."""
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def eval_line(step: int, metrics: Mapping[str, float]) -> str:
    """``step 25: val/accuracy 0.640, kv held 12.3 KiB/seq``: the console's view of one evaluation."""
    line = f"step {step}: val/accuracy {metrics['val/accuracy']:.3f}"
    if "val/kv_bytes_held_per_seq" in metrics:
        line += f", kv held {format_bytes(metrics['val/kv_bytes_held_per_seq'])}/seq"
    return line


def log_scalars(trainer: L.Trainer, metrics: Mapping[str, float], step: int) -> None:
    """Send scalars to every logger at ``step`` (directly, so they do not wait for ``log_every_n_steps``)."""
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=step)


def log_figure(trainer: L.Trainer, tag: str, fig: Figure, step: int) -> None:
    """Log a figure as an image to every logger that takes images (TensorBoard's ``add_image``)."""
    image = figure_array(fig)
    for logger in trainer.loggers:
        add_image = getattr(getattr(logger, "experiment", None), "add_image", None)
        if add_image is not None:
            add_image(tag, image, step, dataformats="HWC")


def _due(step: int, last: int, every: int) -> bool:
    """True once ``step`` has crossed a multiple of ``every`` since ``last`` (several optimiser steps per batch)."""
    return step > 0 and step // every > last // every


class EvalCallback(L.Callback):
    """Every ``every`` optimiser steps, greedy evaluation on the held-out prompts under the run's cache policy and
    window; logs ``val/accuracy``, ``val/response_length``, ``val/kv_bytes_{held,peak}_per_seq`` etc. and the KV
    bytes held per sequence against generated position (a ``memory/kv_curve`` image), and prints the accuracy and
    the K/V held per sequence on the console (``eval_line``).

    Args:
        cfg: the run config (cache window, micro-batch size, generation length ``rollout.max_new_tokens``).
        datamodule: gives ``val_examples`` and ``prompt(question)``, the training prompt format.
        every: optimiser steps between evaluations.
        limit: held-out prompts per evaluation (the first ``limit``, the same ones every time).
    """

    def __init__(self, cfg: Config, datamodule, every: int, limit: int) -> None:
        self.cfg, self.datamodule, self.every, self.limit = cfg, datamodule, every, limit
        self.last_step = 0
        self._grader: Grader | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not _due(step, self.last_step, self.every):
            return
        self.last_step = step
        with trainer.precision_plugin.forward_context():  # bf16-mixed: evaluate under the training step's autocast
            result = self.evaluate(pl_module)
        if result is None:
            return
        metrics, curve = result
        if trainer.is_global_zero:  # the step line shows training only; a run that learns nothing shows here
            log.info(eval_line(step, metrics))
        log_scalars(trainer, metrics, step)
        stop_at = self.cfg.trainer.stop_at
        if stop_at is not None and metrics["val/accuracy"] >= stop_at:  # gathered: every process decides alike
            log.info("step %d: val/accuracy reached trainer.stop_at=%g; stopping", step, stop_at)
            trainer.should_stop = True
        if curve:
            log_figure(trainer, "memory/kv_curve", kv_memory_curves({f"step {step}": curve}), step)

    def _grader_for(self, pl_module: L.LightningModule) -> Grader:
        """The module's grader pool (shared with the reward) or, without one, this callback's own."""
        grader = getattr(pl_module, "grader", None)
        if grader is None:
            if self._grader is None:
                self._grader = Grader(self.cfg.reward.timeout_s, self.cfg.reward.workers)
            grader = self._grader
        return grader

    @torch.no_grad()
    def evaluate(self, pl_module: L.LightningModule) -> tuple[dict[str, float], list] | None:
        """Generate and grade the held-out prompts in micro-batches (on a sharded model, as many on every rank).

        Returns:
            ``(scalars, KV curve of the longest batch)``, or None without held-out prompts.
        """
        examples = list(getattr(self.datamodule, "val_examples", []))[: self.limit]
        if not examples:
            log.warning("trainer.val_every is set but the data module has no held-out examples (data.val_size)")
            return None
        cfg = self.cfg
        policy = getattr(pl_module, "policy_name", None) or cfg.eval_policy
        setting = Setting(policy, cfg.cache.window)
        sampling = SamplingConfig(temperature=0.0, max_new_tokens=cfg.rollout.max_new_tokens)
        grader, records = self._grader_for(pl_module), []
        rank, world = rank_world()
        mine = examples[rank::world]  # each process evaluates its own share; the records are gathered below
        starts = range(0, len(mine), cfg.rollout.micro_batch)
        model = pl_module.model
        batches = most_over_ranks([len(starts)], is_sharded(model))[0]
        for i in starts:
            chunk = mine[i : i + cfg.rollout.micro_batch]
            prompts = [self.datamodule.prompt(e.question) for e in chunk]
            out = sample_batch(model, pl_module.tokenizer, prompts, cfg.cache, policy, sampling)
            grades = grade_groups(grader, [[a] for a in out.answers], [e.answer for e in chunk], [e.id for e in chunk])
            records += batch_records("val", setting, "val", chunk, out, grades)
        idle = [self.datamodule.prompt(examples[0].question)]  # sharded ranks with fewer batches run unrecorded ones
        for _ in range(batches - len(starts)):
            sample_batch(model, pl_module.tokenizer, idle, cfg.cache, policy, sampling)
        records = [r for part in gather_object(records) for r in part]
        summary = summarize(records, [1])
        metrics = {"val/accuracy": summary["pass@1"], **{f"val/{k}": summary[k] for k in VAL_KEYS}}
        metrics["val/kv_bytes_held_per_seq"] = summary["kv_bytes_held"]
        metrics["val/kv_bytes_peak_per_seq"] = summary["kv_bytes_peak"]
        curves = [r["kv_curve"] for r in records if r.get("kv_curve")]
        return {k: float(v) for k, v in metrics.items() if v is not None}, max(
            curves, key=lambda c: c[-1][0], default=[]
        )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._grader is not None:
            self._grader.close()
            self._grader = None


class MemoryCurveCallback(L.Callback):
    """Peak memory from ``pl_module.memory.peaks()``, in MiB: ``memory/peak_allocated_<phase>_mib`` and
    ``memory/peak_reserved_<phase>_mib`` (rollout, replay, optimizer, process) on CUDA, ``memory/peak_rss_process_mib``
    on CPU, every step, and a ``memory/phases`` plot of their history every ``plot_every`` steps.

    Args:
        plot_every: optimiser steps between plots (0 = never).
    """

    def __init__(self, plot_every: int) -> None:
        self.plot_every = plot_every
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.last_plot = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        tracker = getattr(pl_module, "memory", None)
        if tracker is None:
            return
        step = trainer.global_step
        peaks = tracker.peaks()
        for phase, value in peaks.items():
            self.history.setdefault(phase, []).append((step, float(value)))
        log_scalars(trainer, {f"memory/peak_{phase}_mib": value / MIB for phase, value in peaks.items()}, step)
        if self.plot_every > 0 and _due(step, self.last_plot, self.plot_every):
            self.last_plot = step
            log_figure(trainer, "memory/phases", memory_phases(self.history), step)


def build_callbacks(cfg: Config, datamodule) -> list[L.Callback]:
    """Peak-memory scalars always; the periodic evaluation and the plots when ``trainer.val_every`` > 0."""
    t = cfg.trainer
    if t.val_every <= 0:
        return [MemoryCurveCallback(0)]
    return [EvalCallback(cfg, datamodule, t.val_every, t.val_limit), MemoryCurveCallback(t.val_every)]
