"""Evaluate a checkpoint or a base model on math benchmarks under bounded KV caches (method.md §5).

    python eval.py ckpt=<Lightning .ckpt or adapter dir> [benchmarks=[math500,aime24]] [windows=[512,1024]]
                   [policies=[pte]] [n_samples=5] [k=[1,4]] [limit=50] [key=value ...]
    python eval.py model=<hub id or path> [--config FILE] [...]     # a base model (method base)

``ckpt_path=`` is an alias of ``ckpt=``. Short keys ``benchmarks``, ``n_samples``, ``windows``, ``policies``, ``limit``
and ``k`` set ``eval.*``, ``model`` sets ``model.name``; every other ``key=value`` is a config override
(``cache.window=64``, ``eval.paths.math500=file.jsonl``, ...). A checkpoint brings its own config (model, method,
prompt format); the command line overrides it. Writes into ``eval.out_dir`` (default ``<checkpoint dir>/eval``, or
``<trainer.out_dir>/eval-<model>`` for a base model): the resolved ``config.yaml`` (its ``ckpt_path`` is the evaluated
checkpoint), ``records.jsonl`` (one line per setting, benchmark and problem; a rerun skips what is there),
``results.json``, ``results.md`` and PNG plots.
"""

from __future__ import annotations

import argparse
import logging
import sys
from functools import partial
from pathlib import Path

import torch
from omegaconf import OmegaConf

from pte.cli import setup_logging
from pte.config import Config, ConfigError, load_config
from pte.evaluate import Loader, evaluate, sweep
from pte.methods import load_base, load_trained
from pte.plots import markdown_table

log = logging.getLogger("eval")

SHORT_KEYS = {
    "benchmarks": "eval.benchmarks",
    "n_samples": "eval.n_samples",
    "windows": "eval.windows",
    "policies": "eval.policies",
    "limit": "eval.limit",
    "k": "eval.k",
    "model": "model.name",
}
CKPT_KEYS = ("ckpt", "ckpt_path")


def split_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    """Pull the checkpoint out of the ``key=value`` list and expand short keys into config keys.

    Returns:
        ``(checkpoint path or None, config overrides)``.
    """
    ckpt, overrides = None, []
    for item in items:
        key, value = item.split("=", 1)
        if key in CKPT_KEYS:
            ckpt = value or None
        else:
            overrides.append(f"{SHORT_KEYS.get(key, key)}={value}")
    return ckpt, overrides


def saved_config(path: Path) -> dict:
    """The run config stored with a checkpoint: ``config.yaml`` of an adapter export, or a .ckpt's hyperparameters."""
    if path.is_dir():
        if not (path / "config.yaml").is_file():
            raise ConfigError(f"ckpt: {path} has no config.yaml (not an adapter export of train.py)")
        return OmegaConf.to_container(OmegaConf.load(path / "config.yaml"))
    try:
        return torch.load(path, map_location="cpu", weights_only=False)["hyper_parameters"]["run_config"]
    except (KeyError, TypeError) as err:
        raise ConfigError(f"ckpt: {path} holds no run config (not a checkpoint of train.py)") from err


def resolve(config_path: str | None, items: list[str]) -> tuple[Config, Loader]:
    """Build the evaluation config and a model loader; the sweep is validated before any weights load.

    Raises:
        ConfigError: naming the key at fault.
    """
    ckpt, overrides = split_overrides(items)
    if ckpt is not None:
        path = Path(ckpt)
        if config_path is not None:
            raise ConfigError("--config: a checkpoint brings its own config; pass key=value overrides instead")
        if not path.exists():
            raise ConfigError(f"ckpt: {path} does not exist")
        cfg = load_config(None, overrides, base=saved_config(path))
        load: Loader = partial(load_trained, path, overrides)
    else:
        if config_path is None and not any(o.startswith("model.name=") for o in overrides):
            raise ConfigError("ckpt: give ckpt=<checkpoint>, or model=<id or path> to evaluate a base model")
        cfg = load_config(config_path, ["method=base", *overrides])
        if cfg.method != "base":
            raise ConfigError(f"method: evaluating method={cfg.method} needs its checkpoint (ckpt=...)")
        load = partial(load_base, cfg)
    cfg.ckpt_path = str(ckpt) if ckpt is not None else None
    sweep(cfg)
    return cfg, load


def main(argv: list[str] | None = None) -> dict:
    """Parse the command line, run the sweep, print the results table; return results.json's content."""
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML config for a base model (a checkpoint has its own)")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. ckpt=runs/x/adapter windows=[256,512]")
    args = parser.parse_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        parser.error(f"overrides must look like key=value, got {bad}")
    try:
        cfg, load = resolve(args.config, args.overrides)
    except ConfigError as err:
        parser.error(f"config error: {err}")
    results = evaluate(cfg, load)
    print(markdown_table(results))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
