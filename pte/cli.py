"""The command line shared by train.py and eval.py: ``[--config FILE] [key=value ...]``, help and user errors.

A mistake the user can fix (a ``UserError``: config, data, model path, checkpoint) ends the program with one
``error: <message>`` line on stderr and exit status 2, never a traceback; ``PTE_DEBUG=1`` re-raises it to show
where it came from. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pte.config import Config, ConfigError, load_config
from pte.errors import UserError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
DEBUG_ENV = "PTE_DEBUG"
T = TypeVar("T")


def config_groups() -> str:
    """One help line per config group listing its keys, read from the schema so it cannot drift from it."""
    scalars = [f.name for f in dataclasses.fields(Config) if not dataclasses.is_dataclass(f.default_factory)]
    lines = [f"  {'(top)':<9} {', '.join(scalars)}"]
    for f in dataclasses.fields(Config):
        if dataclasses.is_dataclass(f.default_factory):
            keys = ", ".join(g.name for g in dataclasses.fields(f.default_factory))
            lines.append(textwrap.fill(keys, 110, initial_indent=f"  {f.name:<9} ", subsequent_indent=" " * 12))
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is a ConfigError (one ``error:`` line) instead of usage plus a message."""

    def error(self, message: str):
        raise ConfigError(f"command line: {message} (see --help)")


def make_parser(description: str, epilog: str, config_help: str) -> argparse.ArgumentParser:
    """``--config FILE`` plus positional ``key=value`` overrides, with ``epilog`` shown verbatim after them."""
    parser = _Parser(description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, metavar="FILE", help=config_help)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. cache.window=128")
    return parser


def check_overrides(overrides: list[str]) -> None:
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got {bad}")


def check_config_file(path: str | Path | None) -> None:
    """Refuse a ``--config`` that is not a readable file before OmegaConf reports it as an OS error."""
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"--config: {path} is not a file")


def parse(argv: list[str] | None, description: str, epilog: str = "", base: dict | None = None) -> Config:
    """Parse ``--config`` plus OmegaConf dot-list overrides into a validated Config.

    Raises:
        ConfigError: naming the key (or the file) at fault.
    """
    parser = make_parser(description, epilog, f"YAML config (default: configs/{DEFAULT_CONFIG.name})")
    args = parser.parse_args(argv)
    check_overrides(args.overrides)
    check_config_file(args.config)
    path = args.config or (DEFAULT_CONFIG if base is None else None)
    return load_config(path, args.overrides, base=base)


def _user_error_types() -> tuple[type[BaseException], ...]:
    from pte.evaluation.math_sets import BenchmarkFormatError  # a malformed benchmark file is the user's to fix

    return (UserError, BenchmarkFormatError)


def one_line(err: BaseException) -> str:
    """The message on one line (whitespace runs collapsed), so it reads as a single log line."""
    return " ".join(str(err).split()) or type(err).__name__


def user_errors(main: Callable[..., T]) -> Callable[..., T]:
    """Decorate a ``main(argv)``: user errors become ``error: <message>`` on stderr and ``SystemExit(2)``."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> T:
        try:
            return main(*args, **kwargs)
        except Exception as err:
            if not isinstance(err, _user_error_types()) or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                raise
            print(f"error: {one_line(err)}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
