"""Command line of the performance suite (see ``pte.bench``)."""

from __future__ import annotations

import argparse
import json

from pte.bench import common, decode, flops, rollout_memory, rollout_throughput, step_time, train_memory
from pte.bench.plot import plot_result

BENCHMARKS = {
    "decode": decode,
    "rollout-throughput": rollout_throughput,
    "rollout-memory": rollout_memory,
    "train-memory": train_memory,
    "step-time": step_time,
    "flops": flops,
}


def build_parser() -> argparse.ArgumentParser:
    """The suite's command line: one subcommand per benchmark, each with ``--json``, ``--plot``, ``--threads``."""
    parser = argparse.ArgumentParser(prog="python -m pte.bench", description=__doc__)
    sub = parser.add_subparsers(dest="name", required=True)
    for name, bench in BENCHMARKS.items():
        p = sub.add_parser(name, help=(bench.__doc__ or "").strip().splitlines()[0])
        bench.add_args(p)
        p.add_argument("--json", help="write the result here")
        p.add_argument("--plot", help="write a PNG of the result here")
        p.add_argument("--threads", type=int, help="torch CPU threads (1 avoids spin-waits on a busy machine)")
        p.add_argument("--child", help=argparse.SUPPRESS)  # internal: one setting, JSON on stdout
    return parser


def main(argv: list[str] | None = None) -> dict | None:
    args = build_parser().parse_args(argv)
    bench = BENCHMARKS[args.name]
    if args.threads:
        common.set_threads(args.threads)
    if args.child:
        print(json.dumps(bench.child(json.loads(args.child))))
        return None
    result = {**bench.run(args), "conditions": common.conditions()}
    common.write(result, args.json)
    if args.plot:
        plot_result(result, args.plot)
    return result


if __name__ == "__main__":
    main()
