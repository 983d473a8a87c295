"""Evaluate a checkpoint or a base model on math benchmarks under bounded KV caches (docs/method.md section 5).

    python eval.py ckpt=<Lightning .ckpt or adapter dir> [benchmarks=[math500,aime24]] [windows=[512,1024]]
                   [policies=[pte,window,full]] [n_samples=5] [k=[1,4]] [limit=50] [key=value ...]
    python eval.py model=<hub id or path> [--config FILE] [...]     # a base model (method base)

Writes into ``eval.out_dir`` (default ``<checkpoint dir>/eval``, or ``<trainer.out_dir>/eval-<model>`` for a base
model): ``records.jsonl`` (one line per setting, benchmark and problem; a rerun skips what is there),
``results.json``, ``results.md``, PNG plots and, last, the resolved ``config.yaml`` (its ``ckpt_path`` is the
evaluated checkpoint), so a failed run never leaves a config that does not describe the results beside it.

Generation runs with the base in ``model.dtype`` and the adapter in float32 (pte/training/precision.py);
``trainer.precision`` is a training setting, so evaluate a bf16-trained run in bf16 with ``model.dtype=bfloat16``.
"""

from __future__ import annotations

import logging
import sys
from functools import partial
from pathlib import Path

from pte.cli import check_config_file, check_overrides, config_groups, make_parser, setup_logging, user_errors
from pte.config import Config, ConfigError, load_config
from pte.engine.cache import POLICIES
from pte.evaluation.evaluate import Loader, evaluate, sweep
from pte.evaluation.math_sets import BENCHMARKS, OFFLINE
from pte.evaluation.plots import markdown_table
from pte.models.load import check_source
from pte.training.methods import check_matches, load_base, load_trained, saved_config

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


def _short_keys() -> str:
    rows = ["ckpt=PATH (alias ckpt_path=)".ljust(30) + "Lightning .ckpt or adapter export; brings its own config"]
    rows += [f"{short}=...".ljust(30) + f"sets {key}" for short, key in SHORT_KEYS.items()]
    rows.append("any other key=value is a config override, e.g. cache.window=64 eval.paths.math500=file.jsonl")
    return "\n".join("  " + row for row in rows)


EPILOG = f"""short keys:
{_short_keys()}

config groups and their keys (each documented in pte/config.py and in every configs/*.yaml):
{config_groups()}

policies: {", ".join(POLICIES)}. An empty eval.policies sweeps the model's own policy, the plain window and
the full cache (a PTE checkpoint: pte, window, full).
benchmarks: {", ".join(BENCHMARKS)} (hub, or a local copy via eval.paths); {", ".join(OFFLINE)} (offline).

outputs go to eval.out_dir, by default <checkpoint dir>/eval (the demo: runs/default/adapter/eval/), or
<trainer.out_dir>/eval-<model> for a base model: results.md, results.json, accuracy_<benchmark>.png,
kv_memory.png, records.jsonl and config.yaml. The protocol: docs/method.md.

examples:
  python eval.py ckpt=runs/default/adapter limit=16                      # the demo run, offline
  python eval.py ckpt=runs/q3b/adapter benchmarks=[math500,aime24] windows=[768,1024,2048] n_samples=5
"""


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


def resolve(config_path: str | None, items: list[str]) -> tuple[Config, Loader]:
    """Build the evaluation config and a model loader; the sweep and the model source are checked before any
    weights load.

    Raises:
        UserError: a ConfigError naming the key at fault, a CheckpointError or a ModelLoadError.
    """
    ckpt, overrides = split_overrides(items)
    if ckpt is not None:
        if config_path is not None:
            raise ConfigError("--config: a checkpoint brings its own config; pass key=value overrides instead")
        saved = saved_config(ckpt)
        cfg = load_config(None, overrides, base=saved)
        check_matches(saved, cfg, ckpt)
        load: Loader = partial(load_trained, Path(ckpt), overrides)
    else:
        if config_path is None and not any(o.startswith("model.name=") for o in overrides):
            raise ConfigError("ckpt: give ckpt=<checkpoint>, or model=<id or path> to evaluate a base model")
        check_config_file(config_path)
        cfg = load_config(config_path, ["method=base", *overrides])
        if cfg.method != "base":
            raise ConfigError(f"method: evaluating method={cfg.method} needs its checkpoint (ckpt=...)")
        load = partial(load_base, cfg)
    cfg.ckpt_path = str(ckpt) if ckpt is not None else None
    sweep(cfg)
    check_source(cfg.model.name, cfg.model.revision)
    return cfg, load


@user_errors
def main(argv: list[str] | None = None) -> dict:
    """Parse the command line, run the sweep, print the results table; return results.json's content."""
    setup_logging()
    parser = make_parser(
        "Evaluate a checkpoint or a base model on math benchmarks under bounded KV caches.",
        EPILOG,
        "YAML config for a base model (a checkpoint brings its own)",
    )
    args = parser.parse_args(argv)
    check_overrides(args.overrides)
    cfg, load = resolve(args.config, args.overrides)
    results = evaluate(cfg, load)
    print(markdown_table(results))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
