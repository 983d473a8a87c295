"""Aggregates, figures and the written report of the evaluation protocol (method.md §5).

Per (setting, benchmark) aggregates of the per-problem records (pass@1 over the samples, unbiased pass@k, maj@k
with the torchmetrics classes of ``pte.metrics``), figures of accuracy against the cache budget, of KV memory against
generated tokens and of the per-phase training memory behind the paper's Table 1 memory column, and the
results.json / results.md files of an eval run.

Figures use matplotlib's object API on an Agg canvas: no pyplot global state, no display, safe inside a
training loop. ``figure_array`` renders a figure to an ``[H, W, 3]`` uint8 array for TensorBoard images.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pte.metrics import MajorityAtK, PassAtK

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


def accuracy_vs_budget(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    flat: Mapping[str, float],
    title: str,
    metric: str = "pass@1",
) -> Figure:
    """Accuracy of each bounded policy against its thought window, unbounded settings as horizontal lines.

    Args:
        curves: policy -> ``(window, accuracy in [0, 1])`` points; sorted by window here.
        flat: label -> accuracy of settings without a window (the full cache), drawn across the plot.
        title: axes title (the benchmark).
        metric: y-axis label.

    Returns:
        The figure (save it with ``save_figure``).
    """
    fig = new_figure()
    ax = fig.add_subplot()
    for policy, points in curves.items():
        xs, ys = zip(*sorted(points)) if points else ((), ())
        ax.plot(xs, [100 * y for y in ys], marker="o", label=policy)
    for i, (label, value) in enumerate(flat.items()):
        ax.axhline(100 * value, linestyle="--", color=f"C{len(curves) + i}", label=label)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("thought window W (tokens)")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if curves or flat:
        ax.legend()
    return fig


def kv_memory_curves(curves: Mapping[str, Sequence[Sequence[float]]], title: str = "KV cache per sequence") -> Figure:
    """KV bytes held per sequence against generated tokens, one line per cache setting.

    Args:
        curves: label -> ``[(generated tokens, bytes held), ...]`` breakpoints of a piecewise-linear curve.
        title: axes title.
    """
    fig = new_figure()
    ax = fig.add_subplot()
    for label, points in curves.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, [y / MIB for y in ys], label=label)
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
        records: the per-problem records of ``pte.evaluate.batch_records``.
        ks: the k of pass@k and maj@k (pass@1 is always reported).

    Returns:
        ``problems`` (scored), ``gold_errors``, ``pass@k``/``maj@k`` in [0, 1] (None if nothing was scored), mean
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
    """Macro average over benchmarks (as the paper's average column); counts are summed, the KV peak is a max."""
    out: dict = {}
    for key in next(iter(per_bench.values()), {}):
        values = [s[key] for s in per_bench.values() if s[key] is not None]
        if key in ("problems", "gold_errors"):
            out[key] = sum(values)
        elif key == "kv_bytes_peak":
            out[key] = max(values, default=None)
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

    Accuracies are percentages; KV bytes are per sequence (held at the end / peak during generation).
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
            cells = [setting["name"], bench, str(s["problems"]), *(_pct(s[m]) for m in acc)]
            cells += [_num(s["response_length"]), _pct(s["truncated_frac"]), _num(s["evictions"])]
            cells += [_bytes(s["kv_bytes_held"]), _bytes(s["kv_bytes_peak"]), _num(s["tokens_per_s"])]
            cells.append(str(s["gold_errors"]))
            lines.append("| " + " | ".join(cells) + " |")
    title = f"{results['model']} (method {results['method']}), {results['n_samples']} sample(s) per problem"
    return f"# {title}\n\n" + "\n".join(lines) + "\n"


def _accuracy_points(results: Mapping, bench: str) -> tuple[dict, dict]:
    """pass@1 per bounded policy against window, and per unbounded setting, for one benchmark (or average)."""
    curves: dict[str, list[tuple[float, float]]] = {}
    flat: dict[str, float] = {}
    for setting in results["settings"]:
        s = setting["average"] if bench == "average" else setting["benchmarks"][bench]
        if s["pass@1"] is None:
            continue
        if setting["policy"] == "full":
            flat[setting["name"]] = s["pass@1"]
        else:
            curves.setdefault(setting["policy"], []).append((setting["window"] or s["window"], s["pass@1"]))
    return curves, flat


def write_report(results: Mapping, kv_curves: Mapping[str, Sequence[Sequence[float]]], out_dir: Path) -> list[Path]:
    """Write results.json, results.md, ``accuracy_<benchmark>.png`` (and ``accuracy_average.png`` with several
    benchmarks) and ``kv_memory.png`` into ``out_dir``; return the paths written.
    """
    out_dir = Path(out_dir)
    written = [out_dir / "results.json", out_dir / "results.md"]
    written[0].write_text(json.dumps(results, indent=2) + "\n")
    written[1].write_text(markdown_table(results))
    benches = list(results["benchmarks"]) + (["average"] if len(results["benchmarks"]) > 1 else [])
    for bench in benches:
        fig = accuracy_vs_budget(*_accuracy_points(results, bench), title=f"{bench} ({results['model']})")
        written.append(save_figure(fig, out_dir / f"accuracy_{bench}.png"))
    written.append(save_figure(kv_memory_curves(kv_curves), out_dir / "kv_memory.png"))
    return written
