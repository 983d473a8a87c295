"""What a run prints and logs per step: one plain line on stdout (readable in a pipe, a CI log or a batch job)
and, on a terminal, a progress bar counted in optimiser steps out of ``trainer.max_steps``.

``StepLog`` also writes ``GRPOModule.step_metrics`` (the ``train/*`` scalars) to the loggers at
``trainer.global_step``, the step the batch produced, which is the axis ``val/*`` and ``memory/*`` use too.
"""

from __future__ import annotations

import sys
import time

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

from pte.training.callbacks import format_bytes, log_scalars

# (label, train/ scalar, format) of the stdout step line; a quantity the objective does not log (e.g. the
# reward under objective=sft) is left out.
LINE_FIELDS = (
    ("reward", "train/reward_mean", "{:.3f}"),
    ("accuracy", "train/accuracy", "{:.3f}"),
    ("loss", "train/loss", "{:.4g}"),
    ("response_len", "train/response_length", "{:.1f}"),
)


def step_line(step: int, max_steps: int, m: dict[str, float], seconds: float) -> str:
    """``step 3/8 reward 0.250 accuracy 0.250 loss 0.0123 response_len 23.5 kv_held 1.2 KiB/seq 4.12 s``."""
    parts = [f"step {step}/{max_steps}"]
    parts += [f"{label} {fmt.format(m[key])}" for label, key, fmt in LINE_FIELDS if key in m]
    if "train/kv_bytes_held_per_seq" in m:
        parts.append(f"kv_held {format_bytes(m['train/kv_bytes_held_per_seq'])}/seq")
    return " ".join([*parts, f"{seconds:.2f} s"])


class StepLog(L.Callback):
    """Print one line per optimiser step to stdout and send the step's ``train/*`` scalars to the loggers.

    Args:
        log_every: steps between logger writes (``trainer.log_every``); the stdout line is printed every step.
    """

    def __init__(self, log_every: int = 1) -> None:
        self.log_every = max(log_every, 1)
        self._t0 = time.perf_counter()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if not trainer.is_global_zero:  # the metrics are already averaged over processes; one process writes them
            return
        metrics = dict(getattr(pl_module, "step_metrics", {}))
        step = trainer.global_step
        if metrics and step % self.log_every == 0:
            log_scalars(trainer, metrics, step)
            for logger in trainer.loggers:  # so that a SIGKILL loses no logged step
                flush = getattr(getattr(logger, "experiment", None), "flush", None)
                if flush is not None:
                    flush()
        line = step_line(step, trainer.max_steps, metrics, time.perf_counter() - self._t0)
        if getattr(pl_module, "step_skipped", False):
            line += " (non-finite loss or gradient: step skipped)"
        Tqdm.write(line, file=sys.stdout)
        sys.stdout.flush()


class StepProgressBar(TQDMProgressBar):
    """A bar over optimiser steps: ``train step 5/8``, starting where a resumed run starts, with the step's
    reward in its postfix (Lightning's default counts batches per epoch, meaningless with an endless stream)."""

    def on_train_epoch_start(self, trainer: L.Trainer, *_) -> None:
        super().on_train_epoch_start(trainer)
        bar = self.train_progress_bar
        bar.total = trainer.max_steps
        bar.initial = bar.n = trainer.global_step
        bar.unit = "step"
        # Steps take seconds: show seconds per step (tqdm's default it/s reads 0.00it/s).
        bar.bar_format = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_inv_fmt}{postfix}]"
        bar.set_description("train step")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        if bar is not None and not bar.disable:
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
