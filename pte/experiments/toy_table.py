"""The paper's budget sweep (its Figure 3) at toy scale, on a CPU: ``python -m pte.experiments.toy_table`` (``make repro``).

Every arm starts from the same toy base (``model.name: toy-carry``, pte/models/toy.py) on the long-horizon carry task
(pte/training/carry.py), with the same number of optimiser steps, the same seeds and the same training schedules (the
config's drawn windows and eviction ratios, ``cache.train_*``): one adapter per arm and seed, evaluated at every
window.

    base             the untrained base model (evaluation only)
    lora             peft LoRA trained by GRPO under the full cache
    lora_c           LoRA trained by GRPO under the window cache (the paper's LoRA_c)
    lora_c_sft_grpo  LoRA_c trained by cache-aware SFT, then GRPO (the same recipe as PTE's, for fairness)
    pte_grpo         PTE trained by cache-aware GRPO (the paper)
    pte_sft_grpo     PTE trained by cache-aware SFT (exact state-chain gradient), then GRPO

Each arm is evaluated greedily on held-out problems at every window of ``--windows`` under its bounded policy (PTE for
PTE arms, the plain window otherwise) and with nothing evicted (``full``: the full cache, or for PTE arms the PTE policy
with a window the response never fills). ``--ablations`` adds PTE variants (SFT only, without the GRPO stage; one fixed
training schedule instead of drawn ones; global tokens; Normalize; detach vs chain; the paper's mean state scale; the
write gate); PTE arms are also scored at the tightest window with 5 % evicted at once (one token) and at the middle
window with the paper's inference 15 %. ``--arms lora_c_mix pte_grpo_mix`` trains GRPO alone on a task mix whose marked
values are drawn from 2 to 10 letters per problem (``data.carry_letters=[2,10]``: a recall under the window is a 1-in-2
to 1-in-10 guess, so a group's samples disagree more often), evaluated on the task itself (10 letters); ``--arms
pte_grpo_write_gate`` trains GRPO alone with the write gate (``thought.write_gate``).
Writes ``results.json``, ``results.md`` (mean ± sd over seeds, one column per window) and ``accuracy_vs_budget.png``;
every stage keeps its own run directory with TensorBoard logs (``val/accuracy`` every ``--val-every`` steps). An
interrupted run resumes arm by arm: finished stages and evaluations are read back, not recomputed. ``--claim`` runs
every (arm, seed) job no other live process has claimed (a ``claimed`` file in the job's directory), the arms in reverse
order (the two-stage arms, listed last, take longest), so any number of processes share the sweep and end close
together; ``--shard I/N`` runs every N-th job only. A last call without either reads them back and writes the table.
``--summarise`` trains nothing: it writes the table and plot from the jobs already scored, whichever seeds each arm has
(a row names its seeds when they are fewer). Generation (training and evaluation) stops at the task's longest solution
plus a margin unless the overrides set it: an arm at chance under a window otherwise samples to the config's limit,
sized for the longest variant. An arm whose training stops on non-finite steps is recorded as diverged and left out of
the means (delete its ``scores.json`` to try it again); the sweep goes on.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from pte.config import CacheCfg, Config, load_config
from pte.engine.rollout import SamplingConfig
from pte.evaluation.evaluate import sample_batch
from pte.training.carry import carry_problems, solution_chars
from pte.training.methods import load_base, load_trained
from pte.training.module import NonFiniteError
from pte.training.prompts import config_prompt
from pte.training.rewards import Grader

log = logging.getLogger("toy_table")
FAILED = "failed"  # key of a job's scores.json when its training stopped on non-finite steps
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"


@dataclass(frozen=True)
class Arm:
    """A training recipe: its method, its stages (objectives, run in order within one step budget: see stage_steps) and
    config overrides."""

    method: str
    stages: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()


ARMS = {
    "base": Arm("base"),
    "lora": Arm("lora", ("grpo",)),
    "lora_c": Arm("lora_c", ("grpo",)),
    "lora_c_sft_grpo": Arm("lora_c", ("sft", "grpo")),
    "pte_grpo": Arm("pte", ("grpo",)),
    "pte_sft_grpo": Arm("pte", ("sft", "grpo")),
}
ABLATIONS = {
    "pte_sft": Arm("pte", ("sft",)),  # the recipe without its GRPO stage: every step SFT (the demo's, at --steps)
    "pte_fixed_schedule": Arm("pte", ("sft", "grpo"), ("cache.train_windows=[]", "cache.train_evict_ratios=[]")),
    **{f"pte_G{g}": Arm("pte", ("sft", "grpo"), (f"thought.global_tokens={g}",)) for g in (1, 32)},
    **{f"pte_norm_{n}": Arm("pte", ("sft", "grpo"), (f"thought.normalize={n}",)) for n in ("frobenius", "none")},
    "pte_detach": Arm("pte", ("sft", "grpo"), ("thought.state_grad=detach",)),
    "pte_scale_mean": Arm("pte", ("sft", "grpo"), ("thought.state_scale=mean",)),  # the paper's 1/m, not the sum
    "pte_write_gate": Arm("pte", ("sft", "grpo"), ("thought.write_gate=true",)),
}


TASK_MIX = ("data.carry_letters=[2,10]",)  # training only: every arm is evaluated on the problems of the sweep's config
GRPO_ALONE = {  # the paper's recipe (no SFT stage) where the reward under the window might carry more signal
    "lora_c_mix": Arm("lora_c", ("grpo",), TASK_MIX),
    "pte_grpo_mix": Arm("pte", ("grpo",), TASK_MIX),
    "pte_grpo_write_gate": Arm("pte", ("grpo",), ("thought.write_gate=true",)),
}


@dataclass(frozen=True)
class Budget:
    """What is held fixed across arms."""

    steps: int  # optimiser steps per trained arm (two-stage arms: sft_share of them SFT, the rest GRPO)
    windows: tuple[int, ...]  # thought windows evaluated; the tightest is also cache.window of fixed-schedule training
    problems: int  # held-out problems per evaluation
    seeds: tuple[int, ...]
    sft_share: float = 0.9  # SFT learns the trace and the carry; GRPO then polishes what sampling gets wrong
    lr: tuple[tuple[str, float], ...] = (("sft", 1.5e-3), ("grpo", 3e-4))  # per objective, the same for every arm


def stage_steps(arm: Arm, budget: Budget) -> list[int]:
    """Optimiser steps of each stage: all of them for one stage, ``sft_share`` for SFT before GRPO."""
    if len(arm.stages) < 2:
        return [budget.steps] * len(arm.stages)
    sft = round(budget.steps * budget.sft_share)
    return [sft, budget.steps - sft]


def job_dir(out: Path, name: str, seed: int) -> Path:
    """One (arm, seed) job's directory: its stages' runs and its ``scores.json`` (one per job, so jobs can run in
    parallel processes)."""
    return out / name / f"seed{seed}"


def run_stage(config: Path, overrides: list[str], out: Path) -> Path:
    """Train one stage unless its adapter export exists; return the adapter directory."""
    from train import train

    adapter = out / "adapter"
    if (adapter / "config.yaml").exists():
        return adapter
    resume = []  # an interrupted stage continues from its newest checkpoint, or restarts if it saved none
    if out.exists():
        resume = ["ckpt_path=last"] if any(out.glob("checkpoints/*.ckpt")) else ["trainer.overwrite=true"]
    cfg = load_config(config, [*overrides, *resume, f"trainer.out_dir={out.parent}", f"trainer.run_name={out.name}"])
    train(cfg)
    return adapter


def train_arm(
    name: str, arm: Arm, seed: int, budget: Budget, config: Path, out: Path, common: list[str]
) -> Path | None:
    """Run the arm's stages in order (each starts from the previous stage's adapter); None for ``base``."""
    adapter = None
    for stage, steps in zip(arm.stages, stage_steps(arm, budget)):
        overrides = [
            *common,
            f"method={arm.method}",
            f"objective={stage}",
            f"seed={seed}",
            f"trainer.max_steps={steps}",
            f"optim.lr={dict(budget.lr)[stage]}",
            f"cache.window={min(budget.windows)}",
            *arm.overrides,
        ]
        if adapter is not None:
            overrides.append(f"model.adapter={adapter}")
        adapter = run_stage(config, overrides, job_dir(out, name, seed) / stage)
    return adapter


def settings(arm: Arm, budget: Budget, max_new: int) -> list[tuple[str, str, int, float | None]]:
    """(column, policy, window, eval eviction ratio or None for the config's) for the arm's evaluations."""
    bounded = "pte" if arm.method == "pte" else "window"
    out = [(f"W{w}", bounded, w, None) for w in budget.windows]
    out.append(("full", "pte", max_new + 1, None) if arm.method == "pte" else ("full", "full", 0, None))
    if arm.method == "pte":
        out += [(f"W{w}@evict{r}", "pte", w, r) for w, r in eviction_schedules(budget.windows)]
    return out


def eviction_schedules(windows: tuple[int, ...]) -> list[tuple[int, float]]:
    """(window, eviction ratio) PTE arms are also scored at, beside the config's ratio: the tightest window at 5 %
    (one token per eviction, the most state updates per trace) and the middle window at the paper's inference 15 %."""
    ordered = sorted(windows)
    return [(ordered[0], 0.05), (ordered[len(ordered) // 2], 0.15)]


def evaluate_arm(model, tok, cfg: Config, arm: Arm, budget: Budget, problems, grader: Grader) -> dict[str, float]:
    """Greedy accuracy of one trained model under each of the arm's cache settings."""
    max_new = cfg.rollout.max_new_tokens
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=max_new)
    prompts = [config_prompt(tok, cfg.data, p.question) for p in problems]
    golds = [p.answer for p in problems]
    scores = {}
    for column, policy, window, ratio in settings(arm, budget, max_new):
        cache = cfg.cache if policy == "full" else _cache(cfg, window, ratio)
        answers: list[str | None] = []
        for i in range(0, len(prompts), cfg.eval.batch_size):
            answers += sample_batch(model, tok, prompts[i : i + cfg.eval.batch_size], cache, policy, sampling).answers
        scores[column] = sum(grader.grade(answers, golds)) / len(golds)
    return scores


def _cache(cfg: Config, window: int, ratio: float | None) -> CacheCfg:
    return replace(cfg.cache, window=window, evict_ratio=cfg.cache.evict_ratio if ratio is None else ratio)


def run_job(
    name: str,
    arm: Arm,
    seed: int,
    budget: Budget,
    config: Path,
    out: Path,
    common: list[str],
    problems,
    grader: Grader,
) -> None:
    """Train one (arm, seed) job of the sweep in ``out`` and write its scores to its ``scores.json``, or, if its
    training diverged, why it failed."""
    done = job_dir(out, name, seed) / "scores.json"
    try:
        adapter = train_arm(name, arm, seed, budget, config, out, common)
    except NonFiniteError as err:  # a diverging recipe is a result of the sweep, not the end of it
        done.write_text(json.dumps({FAILED: str(err)}, indent=2))
        log.warning("%s seed %d diverged: %s", name, seed, err)
        return
    model, tok, cfg = load_arm_model(config, adapter, common)
    scores = evaluate_arm(model, tok, cfg, arm, budget, problems, grader)
    done.write_text(json.dumps(scores, indent=2))
    log.info("%s seed %d: %s", name, seed, {k: round(100 * v, 1) for k, v in scores.items()})


def load_arm_model(config: Path, adapter: Path | None, common: list[str]):
    """The trained policy (adapter export) or, for ``base``, the base model with the run's config."""
    if adapter is not None:
        return load_trained(adapter)
    cfg = load_config(config, [*common, "method=base"])
    model, tok = load_base(cfg)
    return model, tok, cfg


def summarise(results: dict, arms: list[str], seeds: tuple[int, ...] | None = None) -> tuple[str, dict]:
    """Mean and spread (sample std over seeds) per arm and column; a Markdown table, then the jobs that diverged.
    An arm scored on other seeds than ``seeds`` is labelled with its own."""
    scored = {arm: [s for s in results[arm].values() if FAILED not in s] for arm in arms}
    columns = sorted({c for arm in arms for s in scored[arm] for c in s}, key=_column_order)
    table: dict[str, dict[str, list[float]]] = {}
    lines = ["| arm | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    failed = [f"- {arm} seed {seed}: {s[FAILED]}" for arm in arms for seed, s in results[arm].items() if FAILED in s]
    for arm in arms:
        row = {}
        for c in columns:
            vals = [100 * s[c] for s in scored[arm] if c in s]
            if vals:  # columns such as W12@evict0.05 exist only for some arms
                row[c] = [statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals)]
        table[arm] = row
        cells = [_cell(*row[c]) if c in row else "-" for c in columns]
        lines.append(f"| {_label(arm, results[arm], seeds)} | " + " | ".join(cells) + " |")
    if failed:
        lines += ["", "Diverged (no scores; they are left out of the means):", *failed]
    return "\n".join(lines) + "\n", table


def _label(arm: str, jobs: dict, seeds: tuple[int, ...] | None) -> str:
    """``pte_grpo (seeds 0, 2)`` where the arm's scored seeds are not the listed ones (none scored: the name alone, the
    diverged jobs are listed under the table)."""
    own = sorted(int(s) for s, scores in jobs.items() if FAILED not in scores)
    if seeds is None or not own or own == sorted(seeds):
        return arm
    return f"{arm} (seed{'s' if len(own) != 1 else ''} {', '.join(map(str, own))})"


def _cell(mean: float, sd: float, n: int) -> str:
    """``92.0 ± 2.1`` over several seeds; one seed has no spread to show."""
    return f"{mean:.1f}" if n == 1 else f"{mean:.1f} ± {sd:.1f}"


def _column_order(c: str) -> tuple[int, int, str]:
    """Windows in increasing order, then ``full``, then the eviction-ratio columns."""
    if c == "full":
        return (1, 0, c)
    window, _, rest = c[1:].partition("@")
    return (2 if rest else 0, int(window), c)


def plot(table: dict, labels: dict[str, str], budget: Budget, max_new: int, path: Path) -> None:
    """Accuracy against thought window per arm (nothing evicted drawn at the response limit), with spread bars; each
    arm's legend entry is its table label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    xs = {f"W{w}": w for w in budget.windows} | {"full": max(max_new, 2 * max(budget.windows))}
    for arm, row in table.items():
        cols = [c for c in xs if c in row]
        if not cols:  # every seed diverged
            continue
        ax.errorbar(
            [xs[c] for c in cols],
            [row[c][0] for c in cols],
            yerr=[row[c][1] for c in cols],
            marker="o",
            capsize=3,
            label=labels[arm],
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(xs.values()), [*(str(w) for w in budget.windows), "none\nevicted"])
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy % (greedy)")
    ax.set_xlabel("thought window")
    n = len(budget.seeds)
    spread = f"mean ± sd over {n} seeds" if n > 1 else "one seed"
    ax.set_title(f"carry task: {budget.problems} problems, {spread}", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def generation_limits(cfg: Config, overrides: list[str]) -> list[str]:
    """``rollout`` / ``eval.max_new_tokens`` at the task's longest solution plus a margin, unless ``overrides`` set them."""
    need = solution_chars(cfg.data.carry_steps, cfg.data.carry_values) + 8
    keys = ("rollout.max_new_tokens", "eval.max_new_tokens")
    return [f"{k}={need}" for k in keys if not any(o.startswith(f"{k}=") for o in overrides)]


@contextmanager
def claimed(done: Path) -> Iterator[bool]:
    """Whether this process holds the job whose scores go to ``done``, released on exit: a ``claimed`` file beside it,
    created atomically, holds the owner's pid. False while a live process holds it (or is still writing it); a dead
    owner's claim is taken over."""
    lock = done.with_name("claimed")
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            owner = lock.read_text().strip()
            if not owner.isdigit() or _alive(int(owner)):
                yield False
                return
            lock.unlink(missing_ok=True)
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    try:
        yield True
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _shard(text: str) -> tuple[int, int]:
    """``1/2`` -> (1, 2)."""
    i, _, n = text.partition("/")
    if not (i.isdigit() and n.isdigit() and int(i) < int(n)):
        raise argparse.ArgumentTypeError(f"--shard {text!r}: expected I/N with 0 <= I < N")
    return int(i), int(n)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="base config of every arm")
    parser.add_argument("--out", type=Path, default=Path("runs/toy_table"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1000, help="optimiser steps per trained arm")
    parser.add_argument("--sft-share", type=float, default=0.9, help="share of the steps spent on SFT before GRPO")
    parser.add_argument("--sft-lr", type=float, default=1.5e-3, help="learning rate of every SFT stage")
    parser.add_argument("--grpo-lr", type=float, default=3e-4, help="learning rate of every GRPO stage")
    parser.add_argument("--windows", type=int, nargs="+", default=[12, 16, 24, 32, 64], help="thought windows W")
    parser.add_argument("--problems", type=int, default=100, help="held-out problems per evaluation")
    parser.add_argument(
        "--val-every", type=int, default=100, help="steps between each stage's val/accuracy (TensorBoard only)"
    )
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=[*ARMS, *ABLATIONS, *GRPO_ALONE])
    parser.add_argument("--ablations", action="store_true", help="add every ablation arm")
    parser.add_argument("--shard", type=_shard, default=None, help="I/N: run every N-th job from the I-th (0-based)")
    parser.add_argument("--claim", action="store_true", help="run the jobs no other live process has claimed")
    parser.add_argument("--summarise", action="store_true", help="train nothing: table and plot of the scored jobs")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every arm (e.g. rollout.batch_size=16)")
    args = parser.parse_args(argv)
    if args.summarise and (args.shard is not None or args.claim):
        parser.error("--summarise writes the whole table: it takes no --shard or --claim")
    if args.claim and args.shard is not None:
        parser.error("--claim shares the jobs out as they finish: it takes no --shard")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    lr = (("sft", args.sft_lr), ("grpo", args.grpo_lr))
    budget = Budget(args.steps, tuple(sorted(args.windows)), args.problems, tuple(args.seeds), args.sft_share, lr)
    arms = {**ARMS, **ABLATIONS, **GRPO_ALONE}
    names = [*args.arms, *(n for n in ABLATIONS if args.ablations and n not in args.arms)]
    args.out.mkdir(parents=True, exist_ok=True)
    base_cfg = load_config(args.config, args.overrides)
    # held-out evaluations during training only feed TensorBoard and draw nothing the training draws (tested)
    common = [*generation_limits(base_cfg, args.overrides), f"trainer.val_every={args.val_every}", *args.overrides]
    d = base_cfg.data
    problems = carry_problems(budget.problems, 20_000, d.carry_steps, d.carry_values, letters=d.carry_letters)
    t0 = time.perf_counter()
    results: dict = {}
    with Grader(timeout_s=5.0, workers=1) as grader:
        jobs = [(n, s) for n in names for s in budget.seeds]
        mine = jobs[::-1] if args.claim else jobs if args.shard is None else jobs[args.shard[0] :: args.shard[1]]
        ran = 0
        for name, seed in tqdm(mine, desc="arms x seeds"):
            done = job_dir(args.out, name, seed) / "scores.json"
            if not done.exists():
                if args.summarise:
                    continue
                done.parent.mkdir(parents=True, exist_ok=True)
                with claimed(done) if args.claim else nullcontext(True) as ours:
                    if ours and not done.exists():  # another process may have finished it since the check above
                        run_job(name, arms[name], seed, budget, args.config, args.out, common, problems, grader)
                        ran += 1
                if not done.exists():  # another live process holds it
                    continue
            results.setdefault(name, {})[str(seed)] = json.loads(done.read_text())
    if args.shard is not None or args.claim:
        lane = "claimed jobs" if args.claim else f"shard {args.shard[0]}/{args.shard[1]}"
        log.info("%s: %d jobs run in %.0f s", lane, ran, time.perf_counter() - t0)
        return {}
    setup = vars(args) | {"out": str(args.out), "config": str(args.config)}
    (args.out / "results.json").write_text(json.dumps({"setup": setup, "results": results}, indent=2, default=str))
    markdown, table = summarise(results, [n for n in names if n in results], budget.seeds)
    (args.out / "results.md").write_text(markdown)
    labels = {arm: _label(arm, results[arm], budget.seeds) for arm in table}
    plot(table, labels, budget, base_cfg.rollout.max_new_tokens, args.out / "accuracy_vs_budget.png")
    print(markdown)
    log.info("wall time this call: %.0f s; results in %s", time.perf_counter() - t0, args.out)
    return table


if __name__ == "__main__":
    main()
