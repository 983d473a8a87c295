"""Peak memory per training phase (rollout, replay, optimiser) on CUDA; the process's resident-set peak on CPU.

CUDA has resettable allocator peaks, so each phase gets its own figures since the phase started: allocated
(``torch.cuda.max_memory_allocated``, live tensors) and reserved (``torch.cuda.max_memory_reserved``, what the caching
allocator holds: live tensors plus freed blocks kept for reuse and fragmentation). Reserved is what the device has
really given the process, what other processes cannot use and what an out-of-memory error is measured against, so
allocated alone reads low. A CPU has no such counter: the resident set only grows to its high-water mark, so per-phase
figures would all show the same curve. On CPU only the process-wide peak is reported, under a name that says so.
"""

from __future__ import annotations

import resource
import sys

import torch
from typing_extensions import Self


def max_rss_bytes() -> int:
    """Process high-water mark (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class MemoryTracker:
    """Start/stop named phases; ``peaks()`` maps a metric name (what was measured, where) to bytes.

    Names: ``allocated_<phase>``, ``reserved_<phase>``, ``allocated_process`` and ``reserved_process`` on CUDA;
    ``rss_process`` on CPU.
    """

    def __init__(self) -> None:
        self.cuda = torch.cuda.is_available()
        self._peaks: dict[str, int] = {}
        # The allocator's peaks are reset per phase, so the run's peaks are the maxima over the phases.
        self._process = {"allocated": 0, "reserved": 0}

    def start(self, phase: str) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def stop(self, phase: str) -> None:
        if not self.cuda:
            return
        peaks = {"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved()}
        for kind, peak in peaks.items():
            self._peaks[f"{kind}_{phase}"] = peak
            self._process[kind] = max(self._process[kind], peak)

    def peaks(self) -> dict[str, int]:
        if not self.cuda:
            return {"rss_process": max_rss_bytes()}
        return {**self._peaks, **{f"{kind}_process": peak for kind, peak in self._process.items()}}


class TensorPeak:
    """Peak bytes of tensor memory allocated above the level at entry, inside a ``with`` block (``.peak`` after it).

    CUDA: the allocator's peak since entry. CPU has no allocator peak, so the block runs under the profiler with
    memory recording on and the peak is the running maximum of its allocation and free events: exact tensor bytes,
    unlike the resident set. It slows the block (every op is recorded), so it is for measurement, not training.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.peak = 0
        self._prof: torch.profiler.profile | None = None
        self._base = 0

    def __enter__(self) -> Self:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        self._prof.__exit__(*exc)
        events = [e for e in self._prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        level = peak = 0
        for e in sorted(events, key=lambda e: e.start_ns()):
            level += e.nbytes()
            peak = max(peak, level)
        self.peak = peak
