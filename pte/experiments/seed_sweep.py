"""How reliably a recipe learns: ``python -m pte.experiments.seed_sweep --seeds 0 1 2 --threads 1``.

Trains ``train.py`` on one config (the embedded default unless ``--config``) once per seed, each run in its own process
with ``--threads`` CPU threads (``OMP_NUM_THREADS`` and torch's thread count), ``--lanes`` runs at a time, and reads
every run's ``val/accuracy`` curve back from TensorBoard. Reports, per seed, the first evaluated step at or above
``--target`` and the last accuracy, and how many seeds reached the target within the run's ``trainer.max_steps``.
Writes ``results.json`` and ``results.md`` under ``--out``; a finished seed's run is read back, not retrained.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[2]


def val_curve(run_dir: Path) -> list[tuple[int, float]]:
    """``(step, val/accuracy)`` pairs of a finished run, in step order."""
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    if "val/accuracy" not in acc.Tags()["scalars"]:
        return []
    return sorted((e.step, e.value) for e in acc.Scalars("val/accuracy"))


def command(config: Path, seed: int, out: Path, overrides: list[str]) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "train.py"),
        "--config",
        str(config),
        f"seed={seed}",
        f"trainer.out_dir={out}",
        f"trainer.run_name=seed{seed}",
        "trainer.overwrite=true",
        *overrides,
    ]


def run_seeds(config: Path, seeds: list[int], out: Path, threads: int, lanes: int, overrides: list[str]) -> None:
    """Train every seed without a finished run (an ``adapter`` export), ``lanes`` processes at a time."""
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    todo = [s for s in seeds if not (out / f"seed{s}" / "adapter" / "config.yaml").exists()]
    running: list[tuple[int, subprocess.Popen]] = []
    while todo or running:
        while todo and len(running) < lanes:
            seed = todo.pop(0)
            log = (out / f"seed{seed}.log").open("w")
            proc = subprocess.Popen(
                command(config, seed, out, overrides), env=env, stdout=log, stderr=subprocess.STDOUT
            )
            running.append((seed, proc))
        time.sleep(2)
        for seed, proc in list(running):
            if proc.poll() is not None:
                running.remove((seed, proc))
                if proc.returncode:
                    raise RuntimeError(f"seed {seed} failed (exit {proc.returncode}); see {out / f'seed{seed}.log'}")


def summarise(curves: dict[int, list[tuple[int, float]]], target: float) -> tuple[dict, str]:
    """Per seed: first step at or above ``target`` (None if never) and the last accuracy; a Markdown table."""
    rows = {}
    for seed, curve in curves.items():
        first = next((step for step, acc in curve if acc >= target), None)
        rows[seed] = {"first_step_at_target": first, "last_accuracy": curve[-1][1] if curve else None}
    reached = sum(r["first_step_at_target"] is not None for r in rows.values())
    lines = ["| seed | first step >= target | last val/accuracy |", "|---|---|---|"]
    for seed, r in rows.items():
        last = "-" if r["last_accuracy"] is None else f"{100 * r['last_accuracy']:.1f} %"
        lines.append(f"| {seed} | {r['first_step_at_target'] or 'never'} | {last} |")
    lines.append(f"\n{reached} of {len(rows)} seeds reached val/accuracy >= {target:g}.")
    return {"seeds": rows, "reached": reached, "total": len(rows)}, "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "default.yaml")
    parser.add_argument("--out", type=Path, default=Path("runs/seed_sweep"))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    parser.add_argument("--lanes", type=int, default=1, help="runs at a time")
    parser.add_argument("--target", type=float, default=0.9, help="val/accuracy a run should reach")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    run_seeds(args.config, args.seeds, args.out, args.threads, args.lanes, args.overrides)
    curves = {s: val_curve(args.out / f"seed{s}") for s in args.seeds}
    summary, markdown = summarise(curves, args.target)
    return write_results(args, summary | {"curves": curves}, markdown, t0)


def write_results(args: argparse.Namespace, summary: dict, markdown: str, started: float) -> dict:
    """Save ``results.json`` (the summary, the command's arguments and its seconds) and ``results.md`` under
    ``args.out``; print the Markdown."""
    setup = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    summary |= {"setup": setup, "seconds": round(time.perf_counter() - started)}
    (args.out / "results.json").write_text(json.dumps(summary, indent=2))
    (args.out / "results.md").write_text(markdown)
    print(markdown)
    return summary


if __name__ == "__main__":
    main()
