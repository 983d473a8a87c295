"""One carry-family adapter per seed, start to finish: ``python -m pte.experiments.family --seeds 0 1 2 --lanes 2``.

Runs configs/carry_family.yaml's stages for each seed: a demo stage (``--base-config``, one value, with the family
config's adapter-shape keys such as ``thought.evicted_context`` and ``thought.write_gate``, until ``val/accuracy``
reaches ``--demo-stop``), a stage on ``--first-values`` marked values (the family config's ``trainer.max_steps``), a
stage on every value (``--all-steps``), then evaluates the last adapter greedily on ``--problems`` family problems at
every window of ``--windows`` (eviction 25 % and 5 %) beside the base with a full cache. Each seed is one lane
(``--threads`` threads); ``--lanes`` seeds run at a time. A finished stage (its adapter export or its scores) is read
back, an interrupted one resumes from its newest checkpoint. Writes ``results.json`` and ``results.md`` under ``--out``:
per seed, accuracy by number of marked values at each setting, the weakest variant per setting, and every (variant,
setting) cell below ``--target``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pte.config import load_config
from pte.experiments.seed_sweep import write_results
from pte.training.methods import SHAPE_KEYS

ROOT = Path(__file__).resolve().parents[2]
TRAINED = "adapter/config.yaml"  # written last by an export: a stage that has it is finished
EVALUATED = "config.yaml"  # written last by eval.py, once every setting is scored


def thought_keys(config: Path) -> list[str]:
    """The family config's adapter-shape keys as overrides: the demo stage must share them (a warm start refuses
    other shapes)."""
    thought = load_config(config).thought

    def value(v: object) -> str:
        if isinstance(v, (list, tuple)):
            return "[" + ",".join(map(str, v)) + "]"
        return str(v).lower() if isinstance(v, bool) else str(v)

    return [f"thought.{key}={value(getattr(thought, key))}" for key in SHAPE_KEYS]


def train_stage(run: Path, config: Path, seed: int, stage: list[str], overrides: list[str]) -> list[str]:
    """``train.py`` for one stage in ``run``: resumed from its newest checkpoint when an earlier try was cut off."""
    resume = ["ckpt_path=last"] if any((run / "checkpoints").glob("*.ckpt")) else ["trainer.overwrite=true"]
    where = [f"trainer.out_dir={run.parent}", f"trainer.run_name={run.name}"]
    head = [sys.executable, str(ROOT / "train.py"), "--config", str(config), f"seed={seed}", *stage, *overrides]
    return [*head, *where, *resume]


def seed_jobs(args: argparse.Namespace, seed: int) -> list[tuple[Path, str, list[str]]]:
    """``(directory, file that marks it done, command)`` per stage of one seed, in order."""
    out = args.out / f"seed{seed}"
    demo, first, every = out / "demo", out / "first", out / "all"
    lo, hi = args.first_values
    stages = [
        (demo, args.base_config, [*thought_keys(args.config), f"trainer.stop_at={args.demo_stop}"]),
        (first, args.config, [f"model.adapter={demo / 'adapter'}", f"data.carry_values=[{lo},{hi}]"]),
        (every, args.config, [f"model.adapter={first / 'adapter'}", f"trainer.max_steps={args.all_steps}"]),
    ]
    jobs = [(run, TRAINED, train_stage(run, config, seed, keys, args.overrides)) for run, config, keys in stages]
    evaluate = [sys.executable, str(ROOT / "eval.py"), f"ckpt={every / 'adapter'}", f"limit={args.problems}"]
    windows = ",".join(str(w) for w in args.windows)
    for name, keys in (
        ("eval", [f"windows=[{windows},{args.free_window}]", "policies=[pte,full]"]),
        ("eval_r05", [f"windows=[{windows}]", "policies=[pte]", "cache.evict_ratio=0.05"]),
    ):
        jobs.append((out / name, EVALUATED, [*evaluate, *keys, *args.eval_overrides, f"eval.out_dir={out / name}"]))
    return jobs


def run_seed(args: argparse.Namespace, seed: int) -> None:
    """Every unfinished stage of one seed, in order, each in its own process; a failed stage stops the seed."""
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    log_path = args.out / f"seed{seed}.log"
    for run, marker, cmd in seed_jobs(args, seed):
        if (run / marker).exists():
            continue
        run.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("a") as log:
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            code = subprocess.run(cmd, check=False, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        if code:
            raise RuntimeError(f"seed {seed}: {run.name} failed (exit {code}); see {log_path}")


def scores(path: Path, prefix: str = "") -> dict[str, dict[str, tuple[float, int]]]:
    """``{prefix + setting: {variant: (pass@1 %, problems)}}`` of an eval.py ``results.json`` (carry)."""
    return {
        prefix + setting["name"]: {
            v: (100 * d["pass@1"], d["problems"]) for v, d in setting["benchmarks"]["carry"]["by_variant"].items()
        }
        for setting in json.loads(path.read_text())["settings"]
    }


def by_values(cells: dict[str, tuple[float, int]]) -> dict[str, float]:
    """Problem-weighted pass@1 % per number of marked values (variant ``14x2``: ``2``) and over ``all``."""
    hits, count = defaultdict(float), defaultdict(int)
    for variant, (acc, n) in cells.items():
        for group in (variant.split("x")[1], "all"):
            hits[group] += acc * n
            count[group] += n
    return {g: hits[g] / count[g] for g in sorted(count, key=lambda g: (g == "all", g))}


def summarise(per_seed: dict[int, dict[str, dict[str, tuple[float, int]]]], target: float) -> tuple[dict, str]:
    """Accuracy by values per setting (mean ± sd over seeds), each setting's weakest variant per seed, and every
    (seed, setting, variant) cell of a bounded policy below ``target``."""
    settings = list(next(iter(per_seed.values())))
    values = {s: {st: by_values(cells) for st, cells in per_seed[s].items()} for s in per_seed}
    groups = list(next(iter(values.values()))[settings[0]])
    table = {st: {g: [values[s][st][g] for s in per_seed] for g in groups} for st in settings}
    weakest = {st: {s: min(per_seed[s][st].items(), key=lambda kv: kv[1][0]) for s in per_seed} for st in settings}
    below = [
        (s, st, v, round(acc, 1), n)
        for s in per_seed
        for st in settings
        if not st.startswith("full")
        for v, (acc, n) in per_seed[s][st].items()
        if acc < 100 * target
    ]

    def mean_sd(xs: list[float]) -> str:
        return f"{statistics.mean(xs):.1f}" + (f" ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else "")

    head = [
        "setting",
        *(f"{g} value{'' if g == '1' else 's'}" if g != "all" else "all" for g in groups),
        "weakest variant per seed",
    ]
    lines = [f"Seeds {', '.join(map(str, per_seed))}: pass@1 % by number of marked values, mean ± sd over seeds.", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for st in settings:
        worst = ", ".join(f"{v} {acc:.0f}" for v, (acc, _) in weakest[st].values())
        lines.append(f"| {st} | " + " | ".join(mean_sd(table[st][g]) for g in groups) + f" | {worst} |")
    lines += [
        "",
        f"Variant cells below {100 * target:g} % under a bounded cache (seed, setting, variant): {len(below)}",
    ]
    lines += [f"- seed {s}, {st}, {v}: {acc} % of {n}" for s, st, v, acc, n in below]
    summary = {"by_values": table, "below_target": below, "scores": per_seed}
    return summary, "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "carry_family.yaml")
    parser.add_argument("--base-config", type=Path, default=ROOT / "configs" / "default.yaml", help="the demo stage")
    parser.add_argument("--out", type=Path, default=Path("runs/family"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per seed")
    parser.add_argument("--lanes", type=int, default=1, help="seeds at a time")
    parser.add_argument("--demo-stop", type=float, default=0.95, help="the demo stage ends at this val/accuracy")
    parser.add_argument("--first-values", type=int, nargs=2, default=[2, 3], help="marked values of the second stage")
    parser.add_argument("--all-steps", type=int, default=2500, help="steps of the stage on every value")
    parser.add_argument("--problems", type=int, default=900, help="family problems scored per setting")
    parser.add_argument(
        "--windows", type=int, nargs="+", default=[12, 16, 24, 32, 64], help="scored at 25 and 5 %% evicted"
    )
    parser.add_argument("--free-window", type=int, default=200, help="a window no response fills: nothing evicted")
    parser.add_argument("--target", type=float, default=0.85, help="pass@1 every variant should reach")
    parser.add_argument("--eval-overrides", nargs="*", default=[], help="key=value for every evaluation")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every training stage")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.lanes) as pool:
        for job in [pool.submit(run_seed, args, s) for s in args.seeds]:
            job.result()
    per_seed = {
        s: scores(args.out / f"seed{s}" / "eval" / "results.json")
        | scores(args.out / f"seed{s}" / "eval_r05" / "results.json", "evict0.05 ")
        for s in args.seeds
    }
    summary, markdown = summarise(per_seed, args.target)
    return write_results(args, summary, markdown, t0)


if __name__ == "__main__":
    main()
