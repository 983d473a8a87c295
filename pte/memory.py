"""Peak memory per training phase (rollout, replay, optimiser) on CUDA; the process's resident-set peak on CPU.

CUDA has a resettable allocator peak, so each phase gets its own figure (``torch.cuda.max_memory_allocated`` since
the phase started). A CPU has no such counter: the resident set only grows to its high-water mark, so per-phase
figures would all show the same curve. On CPU only the process-wide peak is reported, under a name that says so.
"""

from __future__ import annotations

import resource
import sys

import torch


def max_rss_bytes() -> int:
    """Process high-water mark (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class MemoryTracker:
    """Start/stop named phases; ``peaks()`` maps a metric name (what was measured, where) to bytes.

    Names: ``allocated_<phase>`` and ``allocated_process`` on CUDA; ``rss_process`` on CPU.
    """

    def __init__(self) -> None:
        self.cuda = torch.cuda.is_available()
        self._peaks: dict[str, int] = {}
        self._process = 0  # the allocator peak is reset per phase, so the run's peak is the max of the phases

    def start(self, phase: str) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def stop(self, phase: str) -> None:
        if self.cuda:
            peak = torch.cuda.max_memory_allocated()
            self._peaks[f"allocated_{phase}"] = peak
            self._process = max(self._process, peak)

    def peaks(self) -> dict[str, int]:
        if not self.cuda:
            return {"rss_process": max_rss_bytes()}
        return {**self._peaks, "allocated_process": self._process}
