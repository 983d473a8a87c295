"""Peak memory per training phase (rollout, replay, optimiser): max allocated on CUDA, resident set on CPU.

On CPU there is no resettable allocator peak, so a phase's figure is the larger of the resident set at its
start and end, and the process-wide high-water mark is reported separately.
"""

from __future__ import annotations

import resource
import sys

import psutil
import torch


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def max_rss_bytes() -> int:
    """Process high-water mark (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class MemoryTracker:
    """Start/stop named phases; ``peaks()`` returns the last peak of each phase in bytes."""

    def __init__(self) -> None:
        self._peaks: dict[str, int] = {}
        self._start: dict[str, int] = {}

    def start(self, phase: str) -> None:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._start[phase] = rss_bytes()

    def stop(self, phase: str) -> None:
        if torch.cuda.is_available():
            self._peaks[phase] = torch.cuda.max_memory_allocated()
        else:
            self._peaks[phase] = max(self._start.pop(phase, 0), rss_bytes())

    def peaks(self) -> dict[str, int]:
        out = dict(self._peaks)
        out["process"] = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else max_rss_bytes()
        return out
