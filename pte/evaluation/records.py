"""Per-problem evaluation records: built from a finished generation batch, kept in an append-only JSONL.

Each record holds a problem's samples, grades, lengths and the cache figures of the rollout that sampled it; the
aggregates of pte.evaluation.evaluate and pte.evaluation.plots are recomputed from records only, so an interrupted sweep
resumes cleanly.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pte.engine.rollout import Rollout
from pte.evaluation.math_sets import Problem

if TYPE_CHECKING:
    from pte.evaluation.evaluate import Setting

log = logging.getLogger(__name__)


@dataclass
class Sampled:
    """One generation batch: decoded responses, their extracted answers, its rollouts (row batches, in order) and
    its wall time."""

    texts: list[str]
    answers: list[str | None]
    rollouts: list[Rollout]
    seconds: float


def kv_curve(ro: Rollout) -> list[list[float]]:
    """Per-sequence KV bytes held against generated tokens, kept only at slope changes (exact when joined)."""
    y = [n * ro.slot_bytes for n in ro.used_slots]
    keep = [0, *(j for j in range(1, len(y) - 1) if y[j] - y[j - 1] != y[j + 1] - y[j]), len(y) - 1]
    return [[j + 1, y[j]] for j in sorted(set(keep))] if y else []


def batch_records(
    fp: str, setting: Setting, bench: str, batch: list[Problem], out: Sampled, grades: list
) -> list[dict]:
    """One record per problem of a finished batch; the first carries the batch's KV curve for the memory plot.

    Cache figures (window, evictions, per-sequence KV bytes) are those of the rollout that sampled the problem; a
    problem whose samples span several rollouts (``eval.max_rows`` < ``eval.n_samples``) gets their mean (the peak:
    their max).
    """
    n = len(out.texts) // len(batch)
    owner = [k for k, ro in enumerate(out.rollouts) for _ in range(ro.response_ids.shape[0])]  # rollout of each row
    cache = [_cache_stats(ro) for ro in out.rollouts]
    lengths = [x for ro in out.rollouts for x in ro.response_mask.sum(1).tolist()]
    truncated = [x for ro in out.rollouts for x in ro.truncated.tolist()]
    common = {"fingerprint": fp, "setting": setting.name, "benchmark": bench, "seconds": out.seconds / len(batch)}
    records = []
    for j, problem in enumerate(batch):
        rows_j = slice(j * n, (j + 1) * n)
        grade = grades[j]
        records.append(
            {
                **common,
                **_merged([cache[k] for k in sorted(set(owner[rows_j]))]),
                "id": problem.id,
                "gold": problem.answer,
                "correct": grade if isinstance(grade, list) else None,
                "gold_error": grade if isinstance(grade, str) else None,
                "answers": out.answers[rows_j],
                "lengths": lengths[rows_j],
                "truncated": truncated[rows_j],
                "responses": out.texts[rows_j],
            }
        )
    records[0]["kv_curve"] = kv_curve(out.rollouts[0])
    return records


def _cache_stats(ro: Rollout) -> dict[str, float]:
    """A rollout's thought window, evictions and per-sequence KV bytes (held at the end, peak)."""
    stats, rows = ro.stats(), ro.response_ids.shape[0]
    return {
        "window": ro.policy.window,
        "evictions": stats["evictions"],
        "kv_bytes_held": stats["kv_bytes_held"] / rows,
        "kv_bytes_peak": stats["kv_bytes_peak"] / rows,
    }


def _merged(parts: list[dict[str, float]]) -> dict[str, float]:
    """One problem's cache figures from the rollouts its samples came from: the one, or the mean (peak: max)."""
    if len(parts) == 1:
        return parts[0]
    out = {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}
    return out | {"kv_bytes_peak": max(p["kv_bytes_peak"] for p in parts)}


class RecordStore:
    """Per-(fingerprint, benchmark, problem) records in an append-only JSONL; the last line for a key wins.

    Lines cut short by an interrupted write are dropped from the file once, with one warning, so their
    problems are redone and later runs read a clean file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: dict[tuple[str, str, str], dict] = {}
        if path.exists():
            self._load()

    def _load(self) -> None:
        text = self.path.read_text(encoding="utf-8")
        good, dropped = [], 0
        for line in text.splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            good.append(line)
            self.records[rec["fingerprint"], rec["benchmark"], rec["id"]] = rec
        if dropped or (text and not text.endswith("\n")):
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in good), encoding="utf-8")
            tmp.replace(self.path)
            if dropped:
                log.warning("%s: dropped %d incomplete line(s); their problems will be recomputed", self.path, dropped)

    def get(self, fp: str, bench: str, pid: str) -> dict | None:
        return self.records.get((fp, bench, pid))

    def append(self, records: Iterable[dict]) -> None:
        """Append and flush (the file is closed after every batch)."""
        records = list(records)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in records)
        for r in records:
            self.records[r["fingerprint"], r["benchmark"], r["id"]] = r
