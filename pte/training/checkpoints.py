"""Checkpoints that never lose training: atomic writes, failure checkpoints only past the newest one on disk,
SIGTERM / Ctrl-C turned into a clean save-and-exit, and resume checks.

Files under ``<run>/checkpoints/`` (docs/resume.md):

- ``step-<N>.ckpt``: every ``trainer.ckpt_every`` optimiser steps, the newest ``trainer.keep_last`` kept;
- ``last.ckpt``: a copy of the newest periodic one, and the final state when training ends;
- ``interrupted.ckpt``: written on SIGTERM, Ctrl-C or an error, only when training has progressed past every
  checkpoint on disk (a failure before the first step, or right after a periodic save, writes nothing).

Every file is written to a temporary name and renamed (``os.replace``), so a kill during a save leaves the previous
file intact. A checkpoint is the state between two batches: an interrupt in the middle of a batch rewinds the data
position and the sampler to the batch's start, so the resumed run repeats that batch and equals a straight run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from pte.config import Config, ConfigError

log = logging.getLogger(__name__)

INTERRUPTED = "interrupted.ckpt"
LAST = "last.ckpt"
# Config keys that fix the shape and meaning of the trained parameters: a checkpoint trained under other values
# cannot continue this run.
STRUCTURE_KEYS = (
    "method",
    "model.name",
    "model.revision",
    "thought.rank",
    "thought.global_tokens",
    "thought.alpha",
    "thought.target_modules",
    "thought.normalize",
    "thought.state_scale",
    "thought.evicted_keys",
    "thought.evicted_context",
    "thought.write_gate",
    "lora.rank",
    "lora.alpha",
    "lora.target_modules",
)
# The config group that shapes each method's trainable adapter.
ADAPTER_KEYS = {"pte": "thought.", "lora": "lora.", "lora_c": "lora."}


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, written to a temporary file, synced and renamed into place."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint's dict lazily (tensors memory-mapped); ConfigError naming ``ckpt_path`` if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"ckpt_path: no checkpoint file at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user-facing problem
        raise ConfigError(f"ckpt_path: {path} is not a readable checkpoint ({type(err).__name__}: {err})") from None


def checkpoint_step(path: Path) -> int | None:
    """The optimiser step a checkpoint was saved at, or None if it cannot be read (e.g. a truncated file)."""
    try:
        return int(read_checkpoint(path)["global_step"])
    except (ConfigError, KeyError):
        return None


def newest_checkpoint(directory: str | Path) -> tuple[Path, int] | None:
    """The readable checkpoint in ``directory`` with the highest step (``last.ckpt`` wins ties), or None."""
    found = []
    for path in sorted(Path(directory).glob("*.ckpt")):
        step = checkpoint_step(path)
        if step is not None:
            found.append((step, path.name == LAST, path))
    if not found:
        return None
    step, _, path = max(found)
    return path, step


def resolve_ckpt_path(ckpt_path: str, ckpt_dir: Path) -> Path:
    """``ckpt_path=last`` (or a directory) means the newest readable checkpoint there; a file is used as given."""
    where = ckpt_dir if ckpt_path == "last" else Path(ckpt_path)
    if where.is_dir():
        found = newest_checkpoint(where / "checkpoints" if (where / "checkpoints").is_dir() else where)
        if found is None:
            raise ConfigError(f"ckpt_path: no readable checkpoint in {where}")
        return found[0]
    return where


def _get(cfg: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = cfg.get(part) if isinstance(cfg, dict) else None
    return cfg


def check_resume(cfg: Config, path: Path, current: dict) -> int:
    """Refuse a checkpoint whose model-defining config differs from this run's; return its step.

    Args:
        cfg: this run's config (for the message only).
        path: the checkpoint file.
        current: this run's config as a plain dict.
    """
    ckpt = read_checkpoint(path)
    saved = ckpt.get("pte_config")
    if "global_step" not in ckpt or saved is None:
        raise ConfigError(f"ckpt_path: {path} is not a checkpoint written by train.py (no global_step / pte_config)")
    for key in STRUCTURE_KEYS:
        old, new = _get(saved, key), _get(current, key)
        if key.startswith(("thought.", "lora.")) and not key.startswith(ADAPTER_KEYS.get(current["method"], "-")):
            continue  # only the active method's adapter shape matters
        if old != new:
            raise ConfigError(f"{key}: checkpoint {path} was trained with {key}={old!r}, this run has {new!r}")
    changed = [k for k in _differences(saved, current) if not k.startswith(("trainer.", "eval.", "ckpt_path"))]
    if changed:
        log.warning("resuming with settings that differ from the checkpoint's run: %s", ", ".join(changed))
    return int(ckpt["global_step"])


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            d for k in sorted(old.keys() | new.keys()) for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")
        ]
    return [] if old == new else [prefix.rstrip(".")]


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived. A BaseException, like KeyboardInterrupt, so that library code catching
    ``Exception`` (e.g. Lightning's logger wrapping errors in ValueError) lets it through."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"received {signal.Signals(signum).name}")
        self.signum = signum


class _Signals:
    """Module-wide signal state: inside ``deferred()`` a signal waits until the block ends."""

    depth = 0
    pending: int | None = None
    stopping = False


def _handler(signum: int, frame: Any) -> None:
    if _Signals.stopping:
        log.warning("%s again: already stopping, the checkpoint is being written", signal.Signals(signum).name)
        return
    if _Signals.depth:
        _Signals.pending = signum
        return
    _Signals.stopping = True
    raise Interrupted(signum)


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold SIGTERM / SIGINT while the optimiser state is being committed (step, scheduler), then act on them."""
    _Signals.depth += 1
    try:
        yield
    finally:
        _Signals.depth -= 1
    if not _Signals.depth and _Signals.pending is not None and not _Signals.stopping:
        signum, _Signals.pending, _Signals.stopping = _Signals.pending, None, True
        raise Interrupted(signum)


@contextlib.contextmanager
def interrupts_raise() -> Iterator[None]:
    """Within the block SIGTERM and SIGINT raise ``Interrupted`` (Lightning adds its own SIGTERM notifier on top)."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    _Signals.depth, _Signals.pending, _Signals.stopping = 0, None, False
    for s in previous:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@dataclass
class _BatchStart:
    step: int
    offset: int
    sampler: torch.Tensor | None


class SaveOnInterrupt(L.Callback):
    """On any exception during fit (signals included), write ``interrupted.ckpt`` if training progressed past the
    newest checkpoint on disk, with the data position and sampler rewound to the start of an unfinished batch.

    ``saved`` is the file written, or None; ``newest`` is the newest checkpoint on disk after the failure.
    """

    def __init__(self, ckpt_dir: str | Path) -> None:
        self.ckpt_dir = Path(ckpt_dir)
        self.start_step = 0
        self.batch: _BatchStart | None = None
        self.saved: Path | None = None
        self.newest: tuple[Path, int] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_step = trainer.global_step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        dm = trainer.datamodule
        offset = dm._offset - len(batch["ids"]) if dm is not None and hasattr(dm, "_offset") else 0
        self.batch = _BatchStart(trainer.global_step, offset, pl_module.sampler_state())

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        self.batch = None  # finished: a checkpoint from here on is the state after this batch

    def _rewind(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Undo what an unfinished batch consumed (its prompts and random draws) if its weights were not stepped."""
        if self.batch is None or trainer.global_step != self.batch.step:
            return
        if trainer.datamodule is not None and hasattr(trainer.datamodule, "_offset"):
            trainer.datamodule._offset = self.batch.offset
        pl_module.restore_sampler(self.batch.sampler)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        newest = newest_checkpoint(self.ckpt_dir) if self.ckpt_dir.is_dir() else None
        step = trainer.global_step
        if step <= max(self.start_step, newest[1] if newest else 0):
            log.info("not writing %s: step %d is not past the newest checkpoint", INTERRUPTED, step)
            self.newest = newest
            return
        self._rewind(trainer, pl_module)
        path = self.ckpt_dir / INTERRUPTED
        trainer.save_checkpoint(path)
        self.saved, self.newest = path, (path, step)
