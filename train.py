"""Train with cache-aware GRPO: ``python train.py [--config configs/X.yaml] [key=value ...]``.

Writes to ``trainer.out_dir/trainer.run_name``: the resolved ``config.yaml``, TensorBoard logs, Lightning
checkpoints (``ckpt_path=...`` resumes) and an adapter export under ``adapter/`` for eval.py.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from pte.callbacks import SaveOnInterrupt, build_callbacks
from pte.cli import config_groups, parse, setup_logging, user_errors
from pte.config import Config, to_yaml
from pte.distributed import build_strategy
from pte.methods import check_matches, export_adapter, saved_config
from pte.module import GRPOModule, build_datamodule

log = logging.getLogger("train")
# Expected with this design: the frozen base stays in eval mode (no dropout, exact replay), and manual
# optimisation checkpoints the post-step state.
warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
warnings.filterwarnings("ignore", message=".*ModelCheckpoint with manual optimization.*")
warnings.filterwarnings("ignore", message=".*val_dataloader.*but have no .validation_step.*")
warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def train(cfg: Config) -> dict[str, float]:
    """Run training for ``cfg``; return the last logged metrics."""
    t = cfg.trainer
    run_dir = Path(t.out_dir) / t.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    L.seed_everything(cfg.seed, workers=True)
    module = GRPOModule.from_config(cfg)
    datamodule = build_datamodule(cfg, module.tokenizer)
    ckpt_dir = run_dir / "checkpoints"
    callbacks = [SaveOnInterrupt(ckpt_dir / "interrupted.ckpt"), *build_callbacks(cfg, datamodule)]
    if t.ckpt_every:
        callbacks.append(
            ModelCheckpoint(ckpt_dir, every_n_train_steps=t.ckpt_every, save_last=True, enable_version_counter=False)
        )
    trainer = L.Trainer(
        max_steps=t.max_steps,
        accelerator=t.accelerator,
        strategy=build_strategy(t),
        devices=t.devices,
        num_nodes=t.num_nodes,
        precision=t.precision,
        logger=TensorBoardLogger(str(run_dir), name="tb", version=""),
        callbacks=callbacks,
        log_every_n_steps=t.log_every,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_model_summary=False,
        enable_checkpointing=bool(t.ckpt_every),
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    trainer.save_checkpoint(ckpt_dir / "last.ckpt")
    if not trainer.is_global_zero:  # every process holds the same adapter; one writes it
        return {k: float(v) for k, v in trainer.callback_metrics.items()}
    adapter = export_adapter(module.model, cfg, run_dir / "adapter")
    log.info("run directory %s (adapter %s, checkpoint %s)", run_dir, adapter, ckpt_dir / "last.ckpt")
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


EPILOG = f"""config groups and their keys (each documented in pte/config.py and in every configs/*.yaml):
{config_groups()}

outputs go to <trainer.out_dir>/<trainer.run_name>/ (default runs/default/): config.yaml, tb/ (TensorBoard),
checkpoints/last.ckpt (resume with ckpt_path=...) and adapter/ (for eval.py ckpt=...).
The method and every choice behind these keys: docs/method.md.

examples:
  python train.py --config configs/tiny.yaml trainer.max_steps=5        # random 2-layer model, seconds on a CPU
  python train.py --config configs/qwen2.5_3b.yaml method=lora_c cache.window=1024 trainer.run_name=q3b-lorac
  python train.py ckpt_path=runs/default/checkpoints/last.ckpt trainer.max_steps=20   # resume a run
"""


@user_errors
def main(argv: list[str] | None = None) -> dict[str, float]:
    """Parse the command line and train; a user error ends in one ``error:`` line and exit status 2."""
    setup_logging()
    cfg = parse(argv, "Train a reasoning model with cache-aware GRPO under a bounded KV cache.", EPILOG)
    if cfg.ckpt_path:
        check_matches(saved_config(cfg.ckpt_path), cfg, cfg.ckpt_path)
    return train(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
