"""``python -m pte.plan --config FILE [--gpu-mem 40] [--gpus 8] [--prompt-len 512] [key=value ...]``: print the
per-rank memory plan of a training config (docs/scale.md). ``--paper`` prints the paper's three configs next to
its Table 1 instead; ``--validate`` measures the plan against exact CPU tensor peaks of small models."""

from __future__ import annotations

import argparse
import sys

from pte.cli import check_config_file, check_overrides, user_errors
from pte.config import ConfigError, load_config
from pte.plan import DEFAULT_PROMPT_LEN, plan


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ConfigError(f"command line: {message} (see --help)")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m pte.plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="training config (YAML)")
    p.add_argument("--gpu-mem", type=float, default=40.0, help="memory per device, GiB (default 40)")
    p.add_argument("--gpus", type=int, default=None, help="ranks (default trainer.devices x trainer.num_nodes)")
    p.add_argument("--prompt-len", type=int, default=DEFAULT_PROMPT_LEN, help="assumed padded prompt length P")
    p.add_argument("--reserve", type=float, default=0.1, help="fraction of the device left unplanned (default 0.1)")
    p.add_argument("--paper", action="store_true", help="the paper's three configs against its Table 1")
    p.add_argument("--validate", action="store_true", help="predicted against measured CPU peaks (a minute)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. replay.micro_batch=2")
    return p


@user_errors
def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    check_overrides(args.overrides)
    if args.validate:
        from pte.plan.measure import validation_table

        print(validation_table())
        return
    if args.paper:
        from pte.plan.paper import paper_table

        print(paper_table(args.gpu_mem, args.gpus or 8, args.prompt_len, args.overrides))
        return
    if not args.config:
        raise ConfigError("--config: a training config is needed (or --paper)")
    check_config_file(args.config)
    cfg = load_config(args.config, args.overrides)
    p = plan(cfg, args.gpu_mem, args.gpus, args.prompt_len, reserve=args.reserve)
    p.source = args.config
    print(p)


if __name__ == "__main__":
    sys.exit(main())
