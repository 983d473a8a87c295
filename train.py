"""Train with cache-aware GRPO: ``python train.py [--config configs/X.yaml] [key=value ...]``.

Writes to ``trainer.out_dir/trainer.run_name``: the resolved ``config.yaml``, TensorBoard logs, atomic Lightning
checkpoints every ``trainer.ckpt_every`` steps (``ckpt_path=<file>`` or ``ckpt_path=last`` resumes) and an adapter
export under ``adapter/`` for eval.py. SIGTERM and Ctrl-C save a checkpoint, print the resume command and exit 143 /
130. A run directory that already holds a run is refused unless resumed or ``trainer.overwrite=true``.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import sys
import warnings
from pathlib import Path

import lightning as L
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import OmegaConf

from pte.cli import config_groups, parse, setup_logging, user_errors
from pte.config import Config, ConfigError, as_dict, to_yaml
from pte.training.callbacks import build_callbacks
from pte.training.checkpoints import (
    AtomicCheckpointIO,
    Interrupted,
    SaveOnInterrupt,
    check_resume,
    interrupts_raise,
    resolve_ckpt_path,
)
from pte.training.distributed import build_strategy
from pte.training.methods import check_matches, export_adapter, saved_config
from pte.training.module import GRPOModule, build_datamodule
from pte.training.precision import trainer_precision
from pte.training.progress import StepLog, StepProgressBar

log = logging.getLogger("train")
# Expected with this design: the frozen base stays in eval mode (no dropout, exact replay), and manual
# optimisation checkpoints the post-step state.
warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
warnings.filterwarnings("ignore", message=".*ModelCheckpoint with manual optimization.*")
warnings.filterwarnings("ignore", message=".*val_dataloader.*but have no .validation_step.*")
warnings.filterwarnings("ignore", message=".*LeafSpec.*")
warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")  # a resume, or refused

# What a run leaves in its directory (removed by trainer.overwrite=true).
RUN_ENTRIES = ("checkpoints", "tb", "adapter", "config.yaml", "config.resume-*.yaml")


class RunRecord(L.Callback):
    """Write the resolved config once training really starts: ``config.yaml`` for a new run, and beside an existing
    one ``config.resume-<step>.yaml``, so a resume never rewrites the record of the run it continues."""

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, run_dir

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self.run_dir / "config.yaml"
        if path.exists() and self.cfg.ckpt_path:
            path = self.run_dir / f"config.resume-{trainer.global_step}.yaml"
        path.write_text(to_yaml(self.cfg))


def prepare_run_dir(cfg: Config, run_dir: Path) -> Path | None:
    """Check the run directory and the checkpoint to resume before anything is written; return that checkpoint.

    Raises:
        ConfigError: the directory holds a run and this is neither a resume nor ``trainer.overwrite=true``; or the
            checkpoint is missing, unreadable or was trained with another model / method / adapter shape.
    """
    ckpt_dir = run_dir / "checkpoints"
    if cfg.ckpt_path:
        ckpt = resolve_ckpt_path(cfg.ckpt_path, ckpt_dir)
        check_matches(saved_config(ckpt), cfg, ckpt)
        step = check_resume(cfg, ckpt, OmegaConf.to_container(as_dict(cfg), resolve=True))
        log.info("resuming from %s at step %d", ckpt, step)
        return ckpt
    held = sorted(p.name for p in ckpt_dir.glob("*.ckpt")) + (["adapter/"] if (run_dir / "adapter").exists() else [])
    if held:
        if not cfg.trainer.overwrite:
            raise ConfigError(
                f"trainer.run_name: {run_dir} already holds a run ({', '.join(held)}); resume it with ckpt_path=last, "
                "choose another trainer.run_name, or pass trainer.overwrite=true to replace it"
            )
        if rank_zero_only.rank != 0:  # one process deletes
            return None
        log.warning("trainer.overwrite=true: deleting the earlier run in %s", run_dir)
        for pattern in RUN_ENTRIES:
            for entry in run_dir.glob(pattern):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    return None


def resume_command(argv: list[str], ckpt: Path) -> str:
    """The command line that continues this run from ``ckpt``: the same arguments with ``ckpt_path`` replaced."""
    kept = [a for a in argv if not a.startswith("ckpt_path=")]
    return shlex.join(["python", "train.py", *kept, f"ckpt_path={ckpt}"])


def train(cfg: Config, argv: list[str] | None = None) -> dict[str, float]:
    """Run training for ``cfg`` (``argv``: the command-line arguments, for the printed resume command); return the
    last logged metrics. An interrupt exits with 128 + the signal number after saving."""
    t = cfg.trainer
    run_dir = Path(t.out_dir) / t.run_name
    ckpt = prepare_run_dir(cfg, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    module = GRPOModule.from_config(cfg)
    datamodule = build_datamodule(cfg, module.tokenizer)
    ckpt_dir = run_dir / "checkpoints"
    saver = SaveOnInterrupt(ckpt_dir)
    bar = [StepProgressBar()] if sys.stdout.isatty() else []  # Lightning draws its bars on stdout
    callbacks = [saver, RunRecord(cfg, run_dir), StepLog(t.log_every), *bar, *build_callbacks(cfg, datamodule)]
    if t.ckpt_every:
        callbacks.append(
            ModelCheckpoint(
                ckpt_dir,
                filename="step-{step}",
                auto_insert_metric_name=False,
                every_n_train_steps=t.ckpt_every,
                save_last=True,
                save_top_k=t.keep_last,
                monitor="step",
                mode="max",
                enable_version_counter=False,
            )
        )
    precision, precision_plugins = trainer_precision(t.precision)  # bf16-true: the base only (training/precision.py)
    trainer = L.Trainer(
        max_steps=t.max_steps,
        accelerator=t.accelerator,
        strategy=build_strategy(t),
        devices=t.devices,
        num_nodes=t.num_nodes,
        precision=precision,
        logger=TensorBoardLogger(str(run_dir), name="tb", version=""),
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO(), *precision_plugins],
        log_every_n_steps=t.log_every,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_model_summary=False,
        enable_checkpointing=bool(t.ckpt_every),
        enable_progress_bar=bool(bar),
    )
    try:
        with interrupts_raise():
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
    except BaseException as err:
        _report_stop(err, saver, trainer.global_step, argv or [])
        if isinstance(err, Interrupted):
            raise SystemExit(128 + err.signum) from None
        raise
    trainer.save_checkpoint(ckpt_dir / "last.ckpt")
    metrics = {**{k: float(v) for k, v in trainer.callback_metrics.items()}, **module.step_metrics}
    if trainer.is_global_zero:  # every process holds the same adapter; one writes it
        adapter = export_adapter(module.model, cfg, run_dir / "adapter")
        log.info("run directory %s (adapter %s, checkpoint %s)", run_dir, adapter, ckpt_dir / "last.ckpt")
    return metrics


def _report_stop(err: BaseException, saver: SaveOnInterrupt, step: int, argv: list[str]) -> None:
    """Say why training stopped, where its newest checkpoint is and how to resume from it (stderr)."""
    reason = str(err) if isinstance(err, Interrupted) else f"{type(err).__name__}: {err}".splitlines()[0]
    lines = [f"training stopped at step {step} ({reason})"]
    if saver.saved is not None:
        lines.append(f"checkpoint written: {saver.saved} (step {step})")
    elif saver.newest is not None:
        lines.append(f"no new checkpoint needed: {saver.newest[0]} (step {saver.newest[1]}) holds all training so far")
    else:
        lines.append("no checkpoint written: no training step had finished")
    if saver.newest is not None:
        lines.append(f"resume with: {resume_command(argv, saver.newest[0])}")
    print("\n".join(lines), file=sys.stderr, flush=True)


EPILOG = f"""config groups and their keys (each documented in pte/config.py and in every configs/*.yaml):
{config_groups()}

outputs go to <trainer.out_dir>/<trainer.run_name>/ (default runs/default/): config.yaml, tb/ (TensorBoard),
checkpoints/ (step-N.ckpt every trainer.ckpt_every steps, last.ckpt, interrupted.ckpt; resume with
ckpt_path=last or ckpt_path=FILE) and adapter/ (for eval.py ckpt=...). A run name that already holds a run is
refused unless resumed or trainer.overwrite=true. SIGTERM / Ctrl-C save, print the resume command, exit 143 / 130.
The method and every choice behind these keys: docs/method.md.

examples:
  python train.py --config configs/tiny.yaml trainer.max_steps=5        # random 2-layer model, seconds on a CPU
  python train.py --config configs/qwen2.5_3b.yaml method=lora_c cache.window=1024 trainer.run_name=q3b-lorac
  python train.py ckpt_path=last trainer.max_steps=20        # resume runs/default from its newest checkpoint
"""


@user_errors
def main(argv: list[str] | None = None) -> dict[str, float]:
    """Parse the command line and train; a user error ends in one ``error:`` line and exit status 2."""
    setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse(argv, "Train a reasoning model with cache-aware GRPO under a bounded KV cache.", EPILOG)
    return train(cfg, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
