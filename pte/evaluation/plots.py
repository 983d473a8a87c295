"""Aggregates, figures and the written report of the evaluation protocol (docs/method.md §5).

Per (setting, benchmark) aggregates of the per-problem records (pass@1 over the samples, unbiased pass@k, maj@k
with the torchmetrics classes of ``pte.evaluation.metrics``), figures of accuracy against the cache budget, of KV memory
against generated tokens and of the per-phase training memory behind the paper's Table 1 memory column, and the
results.json / results.md files of an eval run.

Figures use matplotlib's object API on an Agg canvas: no pyplot global state, no display, safe inside a
training loop. ``figure_array`` renders a figure to an ``[H, W, 3]`` uint8 array for TensorBoard images.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pte.evaluation.metrics import MajorityAtK, PassAtK

MIB = 2.0**20


def new_figure(width: float = 6.0, height: float = 4.0) -> Figure:
    """A figure attached to its own Agg canvas (no pyplot)."""
    fig = Figure(figsize=(width, height), dpi=100, layout="tight")
    FigureCanvasAgg(fig)
    return fig


def figure_array(fig: Figure) -> np.ndarray:
    """Render ``fig`` to an RGB ``uint8`` array ``[H, W, 3]`` (TensorBoard ``dataformats="HWC"``)."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG and return the path."""
    path = Path(path)
    fig.savefig(path, format="png")
    return path


@dataclass(frozen=True)
class Point:
    """One accuracy measurement: window (None for the full cache), accuracy and standard error in [0, 1]."""

    window: float | None
    accuracy: float
    se: float
    never_evicts: bool = False


def accuracy_vs_budget(curves: Mapping[str, Sequence[Point]], title: str, metric: str = "pass@1") -> Figure:
    """Accuracy of each setting against its thought window, with +-1 standard error bars.

    Settings without a window (the full cache) are horizontal lines with a shaded +-1 SE band. A point whose
    setting never evicted within its generation budget is drawn hollow: it is the full cache under another name.

    Args:
        curves: label -> Points; bounded points are sorted by window here.
        title: axes title (the benchmark, n and samples).
        metric: y-axis label.
    """
    fig = new_figure()
    ax = fig.add_subplot()
    for color, (label, points) in enumerate(curves.items()):
        if points and points[0].window is None:
            p = points[0]
            ax.axhline(100 * p.accuracy, linestyle="--", color=f"C{color}", label=label)
            ax.axhspan(100 * (p.accuracy - p.se), 100 * (p.accuracy + p.se), color=f"C{color}", alpha=0.15)
        elif points:
            pts = sorted(points, key=lambda q: q.window)
            xs, ys, es = [q.window for q in pts], [100 * q.accuracy for q in pts], [100 * q.se for q in pts]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, color=f"C{color}", label=label)
            hollow = [q for q in pts if q.never_evicts]
            if hollow:
                ax.plot(
                    [q.window for q in hollow],
                    [100 * q.accuracy for q in hollow],
                    "o",
                    color="white",
                    markeredgecolor=f"C{color}",
                    markersize=7,
                    label=f"{label}: never evicted (= full cache)",
                )
    top = max((100 * (q.accuracy + q.se) for points in curves.values() for q in points), default=0.0)
    ax.set_ylim(0, min(100.0, max(10.0, 1.2 * top)))  # from zero; at least 0-10 % so a flat 0 reads as 0
    ax.set_xlabel("thought window W (tokens)")
    ax.set_ylabel(f"{metric} (%), +-1 standard error")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8)
    return fig


def full_cache_line(curves: Mapping[str, Sequence[Sequence[float]]]) -> list[list[float]]:
    """The full cache's KV curve extrapolated from a bounded one: it keeps growing at the pre-eviction slope.

    Every curve starts by filling its window at one token's K/V per step, so its first segment gives the bytes
    per token; the full cache continues that line to the longest generation plotted. Empty if no curve grows.
    """
    for points in curves.values():
        if len(points) >= 2 and points[1][1] > points[0][1]:
            (t0, y0), (t1, y1) = points[0][:2], points[1][:2]
            end = max(p[-1][0] for p in curves.values() if p)
            return [[t0, y0], [end, y0 + (end - t0) * (y1 - y0) / (t1 - t0)]]
    return []


def kv_memory_curves(curves: Mapping[str, Sequence[Sequence[float]]], title: str = "KV cache per sequence") -> Figure:
    """KV bytes held per sequence against generated tokens, one line per cache setting, y axis from zero.

    Without a ``full`` curve, the full cache is drawn extrapolated (dotted) for contrast.

    Args:
        curves: label -> ``[(generated tokens, bytes held), ...]`` breakpoints of a piecewise-linear curve.
        title: axes title.
    """
    fig = new_figure()
    ax = fig.add_subplot()
    for label, points in curves.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, [y / MIB for y in ys], label=label, linestyle="--" if label == "full" else "-")
    full = [] if "full" in curves else full_cache_line(curves)
    if full:
        xs, ys = zip(*full)
        ax.plot(xs, [y / MIB for y in ys], linestyle=":", color="gray", label="full cache (extrapolated)")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("generated tokens")
    ax.set_ylabel("KV cache held (MiB)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend()
    return fig


def memory_phases(history: Mapping[str, Sequence[tuple[int, float]]]) -> Figure:
    """Peak memory of each training phase (rollout, replay, optimizer, process) against the training step.

    Args:
        history: phase -> ``[(step, peak bytes), ...]``.
    """
    fig = new_figure()
    ax = fig.add_subplot()
    for phase, points in history.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, [y / MIB for y in ys], marker=".", label=phase)
    ax.set_xlabel("training step")
    ax.set_ylabel("peak memory (MiB)")
    ax.set_title("peak memory per phase")
    ax.grid(alpha=0.3)
    if history:
        ax.legend()
    return fig


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(records: Sequence[dict], ks: Sequence[int]) -> dict:
    """Aggregate one (setting, benchmark): accuracy metrics over scored problems, generation stats over all.

    Args:
        records: the per-problem records of ``pte.evaluation.evaluate.batch_records``.
        ks: the k of pass@k and maj@k (pass@1 is always reported).

    Returns:
        ``problems`` (scored), ``gold_errors``, ``pass@k``/``maj@k`` in [0, 1] (None if nothing was scored),
        ``pass@1_se`` (its standard error over problems: the binomial sqrt(p(1-p)/n) with one sample), mean
        ``window`` W, ``response_length`` and ``truncated_frac`` per sample, ``evictions`` per batch, per-sequence
        ``kv_bytes_held`` (mean, at the end of generation) and ``kv_bytes_peak`` (max), and ``tokens_per_s``
        (generated tokens over generation wall time, prefill included).
    """
    scored = [r for r in records if r["gold_error"] is None]
    out: dict = {"problems": len(scored), "gold_errors": len(records) - len(scored)}
    answers = [r["answers"] for r in scored]
    correct = torch.tensor([r["correct"] for r in scored], dtype=torch.bool) if scored else None
    for k in sorted({1, *ks}):
        out[f"pass@{k}"] = _score(PassAtK(k), correct)
    out["pass@1_se"] = _standard_error(correct.float().mean(1)) if scored else None
    for k in sorted(set(ks)):
        out[f"maj@{k}"] = _score(MajorityAtK(k), correct, answers)
    lengths = [x for r in records for x in r["lengths"]]
    seconds = sum(r["seconds"] for r in records)
    out.update(
        window=_mean([r["window"] for r in records]),
        response_length=_mean(lengths),
        truncated_frac=_mean([float(t) for r in records for t in r["truncated"]]),
        evictions=_mean([r["evictions"] for r in records]),
        kv_bytes_held=_mean([r["kv_bytes_held"] for r in records]),
        kv_bytes_peak=max((r["kv_bytes_peak"] for r in records), default=None),
        tokens_per_s=sum(lengths) / seconds if seconds > 0 else None,
    )
    return out


def _standard_error(rates: torch.Tensor) -> float:
    """Standard error of the mean of per-problem success rates (population variance, so 1 sample = binomial)."""
    return math.sqrt(float(rates.var(correction=0)) / rates.numel())


def _score(metric: PassAtK | MajorityAtK, correct: torch.Tensor | None, answers: list | None = None) -> float | None:
    """The metric over the scored problems; None (neither NaN nor 0) when no problem could be scored."""
    if correct is None:
        return None
    if answers is None:
        metric.update(correct)
    else:
        metric.update(answers, correct)
    return float(metric.compute())


def average(per_bench: dict[str, dict]) -> dict:
    """Macro average over benchmarks (as the paper's average column); counts are summed, the KV peak is a max,
    standard errors combine as those of a mean of independent estimates.
    """
    out: dict = {}
    for key in next(iter(per_bench.values()), {}):
        values = [s[key] for s in per_bench.values() if s[key] is not None]
        if key in ("problems", "gold_errors"):
            out[key] = sum(values)
        elif key == "kv_bytes_peak":
            out[key] = max(values, default=None)
        elif key.endswith("_se"):
            out[key] = math.sqrt(sum(v * v for v in values)) / len(values) if values else None
        else:
            out[key] = _mean(values)
    return out


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _bytes(value: float | None) -> str:
    """Human-readable bytes (KiB for tiny test models, MiB/GiB for real ones)."""
    if value is None:
        return "-"
    for unit, size in (("GiB", 2.0**30), ("MiB", MIB), ("KiB", 2.0**10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


def markdown_table(results: Mapping) -> str:
    """One row per (setting, benchmark) plus an ``average`` row per setting when there are several benchmarks.

    Accuracies are percentages, pass@1 with +- its standard error; KV bytes are per sequence (held at the end /
    peak during generation). A bounded setting that never evicted is marked: it measured the full cache.
    """
    ks = results["k"]
    acc = [f"pass@{k}" for k in sorted({1, *ks})] + [f"maj@{k}" for k in ks]
    head = ["setting", "benchmark", "problems", *acc, "length", "truncated %", "evictions", "KV held", "KV peak"]
    head += ["tokens/s", "gold errors"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    several = len(results["benchmarks"]) > 1
    for setting in results["settings"]:
        rows = list(setting["benchmarks"].items()) + ([("average", setting["average"])] if several else [])
        for bench, s in rows:
            name = setting["name"] + (" (never evicts)" if s.get("never_evicts") else "")
            cells = [name, bench, str(s["problems"]), *(_pct(s[m]) for m in acc)]
            if s.get("pass@1_se") is not None:
                cells[3] += f" ± {100 * s['pass@1_se']:.1f}"
            cells += [_num(s["response_length"]), _pct(s["truncated_frac"]), _num(s["evictions"])]
            cells += [_bytes(s["kv_bytes_held"]), _bytes(s["kv_bytes_peak"]), _num(s["tokens_per_s"])]
            cells.append(str(s["gold_errors"]))
            lines.append("| " + " | ".join(cells) + " |")
    title = f"{results['model']} (method {results['method']}), {results['n_samples']} sample(s) per problem"
    notes = ""
    if any(s.get("never_evicts") for setting in results["settings"] for s in setting["benchmarks"].values()):
        notes = (
            "\n(never evicts): no eviction happened within eval.max_new_tokens, so this row measured the full cache; "
            "lower the window or raise eval.max_new_tokens to test the bounded cache.\n"
        )
    return f"# {title}\n\n" + "\n".join(lines) + "\n" + notes + _variant_tables(results)


def _variant_tables(results: Mapping) -> str:
    """pass@1 % per task variant (rows, with their problem counts) and setting (columns), for each benchmark whose
    problems name variants (the carry task over ranges of ``data.carry_steps`` / ``data.carry_values``)."""
    out = ""
    for bench in results["benchmarks"]:
        cols = [(s["name"], s["benchmarks"][bench].get("by_variant")) for s in results["settings"]]
        cols = [(name, v) for name, v in cols if v]
        if not cols:
            continue
        head = ["variant", "problems", *(name for name, _ in cols)]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for variant, first in cols[0][1].items():
            cells = [variant, str(first["problems"]), *(f"{100 * v[variant]['pass@1']:.0f}" for _, v in cols)]
            lines.append("| " + " | ".join(cells) + " |")
        out += f"\n## {bench}: pass@1 % by variant\n\n" + "\n".join(lines) + "\n"
    return out


def _accuracy_points(results: Mapping, bench: str) -> dict[str, list[Point]]:
    """pass@1 and its standard error per bounded policy against window, and for the full cache, for one benchmark."""
    curves: dict[str, list[Point]] = {}
    for setting in results["settings"]:
        s = setting["average"] if bench == "average" else setting["benchmarks"][bench]
        if s["pass@1"] is None:
            continue
        se = s.get("pass@1_se") or 0.0
        if setting["policy"] == "full":
            curves[setting["name"]] = [Point(None, s["pass@1"], se)]
        else:
            window = setting["window"] or s["window"]
            point = Point(window, s["pass@1"], se, bool(s.get("never_evicts")))
            curves.setdefault(setting["policy"], []).append(point)
    return curves


def _write(path: Path, text: str) -> Path:
    """Replace ``path`` atomically: a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def write_report(results: Mapping, kv_curves: Mapping[str, Sequence[Sequence[float]]], out_dir: Path) -> list[Path]:
    """Write results.json, results.md, ``accuracy_<benchmark>.png`` (and ``accuracy_average.png`` with several
    benchmarks) and ``kv_memory.png`` into ``out_dir``; return the paths written.
    """
    out_dir = Path(out_dir)
    written = [_write(out_dir / "results.json", json.dumps(results, indent=2) + "\n")]
    written.append(_write(out_dir / "results.md", markdown_table(results)))
    benches = list(results["benchmarks"]) + (["average"] if len(results["benchmarks"]) > 1 else [])
    for bench in benches:
        first = results["settings"][0]
        n = (first["average"] if bench == "average" else first["benchmarks"][bench])["problems"]
        title = f"{bench} ({results['model']}): n = {n} problems x {results['n_samples']} sample(s)"
        written.append(
            save_figure(accuracy_vs_budget(_accuracy_points(results, bench), title), out_dir / f"accuracy_{bench}.png")
        )
    written.append(save_figure(kv_memory_curves(kv_curves), out_dir / "kv_memory.png"))
    return written
