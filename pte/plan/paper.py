"""The paper's three training configs, planned for each method, next to its Table 1 peak memory (docs/method.md §5).

Table 1 reports peak GPU memory as a percentage of an A100's 40 GB for LoRA (full cache), LoRA_c (window cache)
and PTE. The plan is for this project's configs (configs/paper.yaml and one overlay per model) with only ``method``
changed; the paper's own micro-batches, checkpointing and kernels are not stated, so the two columns are
comparable in trend (full cache against bounded cache, and across models), not to the point.
"""

from __future__ import annotations

from pathlib import Path

from pte.config import load_config
from pte.plan import GIB, plan

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# Table 1, peak GPU memory in % of 40 GB: (LoRA, LoRA_c, PTE).
TABLE1 = {
    "qwen2.5_3b": {"lora": 82.8, "lora_c": 38.0, "pte": 45.3},
    "qwen2.5_7b": {"lora": 85.8, "lora_c": 63.1, "pte": 67.2},
    "deepseek_llama8b": {"lora": 88.7, "lora_c": 59.1, "pte": 59.8},
}


def paper_rows(gpu_mem_gb: float, world: int, prompt_len: int, overrides: list[str]) -> list[dict]:
    """One row per (model, method): the paper's figure, the planned training and eval.py peaks, the phase."""
    rows = []
    for name, paper in TABLE1.items():
        for method, percent in paper.items():
            cfg = load_config(CONFIGS / f"{name}.yaml", [*overrides, f"method={method}"])
            p = plan(cfg, gpu_mem_gb, world, prompt_len)
            train = max((ph for ph in p.phases if ph.name != "eval"), key=lambda ph: ph.total)
            evaluation = next(ph for ph in p.phases if ph.name == "eval")
            rows.append(
                {
                    "config": name,
                    "method": method,
                    "paper": percent,
                    "plan": 100 * train.total / p.gpu_mem,
                    "gib": train.total / GIB,
                    "phase": train.name,
                    "eval": 100 * evaluation.total / p.gpu_mem,
                    "fits": p.fits,
                }
            )
    return rows


def paper_table(gpu_mem_gb: float = 40.0, world: int = 8, prompt_len: int = 512, overrides: list[str] = ()) -> str:
    """Markdown: Table 1 against the plan of configs/<model>.yaml per method, on ``world`` x ``gpu_mem_gb`` GiB."""
    changed = f"; overrides: {' '.join(overrides)}" if overrides else ""
    lines = [
        f"Per-rank peak on {world} x {gpu_mem_gb:g} GiB, prompt length {prompt_len}{changed} (planned, not run)",
        "",
        "| config | method | paper Table 1 | plan, training | GiB | set by | plan, eval.py | fits |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in paper_rows(gpu_mem_gb, world, prompt_len, list(overrides)):
        lines.append(
            f"| {r['config']} | {r['method']} | {r['paper']:.1f} % | {r['plan']:.1f} % | {r['gib']:.1f} | "
            f"{r['phase']} | {r['eval']:.1f} % | {'yes' if r['fits'] else 'no'} |"
        )
    return "\n".join(lines)
