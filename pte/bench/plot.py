"""One PNG per benchmark result: the measured quantity against length, one line per method or policy."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# benchmark -> (x key, y key, line key, y label)
SPECS = {
    "decode": ("tokens", "tokens_per_s", "method", "generated tokens/s"),
    "rollout-throughput": ("tokens", "rows_per_s", "method", "rows/s of a rollout phase"),
    "rollout-memory": ("length", "kv_mib", "policy", "K/V held (MiB)"),
    "train-memory": ("length", "peak_mib", "method", "peak memory of one update (MiB)"),
    "flops": ("tokens", "attn_tflops", "policy", "attention TFLOPs per rollout"),
}


def plot_result(result: dict, path: str | Path) -> bool:
    """Write ``path`` for a benchmark that has a length axis; False for the others (step-time)."""
    spec = SPECS.get(result["benchmark"])
    if spec is None:
        return False
    x, y, line, label = spec
    fig = Figure(figsize=(5, 3.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name in dict.fromkeys(r[line] for r in result["rows"]):
        rows = sorted((r for r in result["rows"] if r[line] == name), key=lambda r: r[x])
        by_x: dict = {}
        for r in rows:  # decode: several batch sizes share a length; plot the largest batch
            if r[x] not in by_x or r.get("batch", 0) >= by_x[r[x]].get("batch", 0):
                by_x[r[x]] = r
        ax.plot(list(by_x), [r[y] for r in by_x.values()], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(x)
    ax.set_ylabel(label)
    ax.set_title(f"{result['benchmark']} ({result.get('model', '')})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return True
