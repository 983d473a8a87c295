"""Training callbacks: checkpoint on interrupt, periodic fixed-budget evaluation and memory curves."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from pte.config import Config


class SaveOnInterrupt(L.Callback):
    """Write a resumable checkpoint when training stops on an exception (Ctrl-C included)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        trainer.save_checkpoint(self.path)


def build_callbacks(cfg: Config, datamodule) -> list[L.Callback]:
    return []
