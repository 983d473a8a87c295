"""The command line shared by train.py and eval.py: ``[--config FILE] [key=value ...]``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pte.config import Config, ConfigError, load_config

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


def parse(argv: list[str] | None, description: str, base: dict | None = None) -> Config:
    """Parse ``--config`` plus OmegaConf dot-list overrides into a validated Config; exit with the key on error."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=None, help=f"YAML config (default: {DEFAULT_CONFIG.name})")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. cache.window=128")
    args = parser.parse_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        parser.error(f"overrides must look like key=value, got {bad}")
    path = args.config or (DEFAULT_CONFIG if base is None else None)
    try:
        return load_config(path, args.overrides, base=base)
    except ConfigError as err:
        parser.error(f"config error: {err}")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
