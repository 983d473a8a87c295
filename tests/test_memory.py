"""Peak memory per training phase (pte.memory.MemoryTracker), on CUDA's counters mocked and on the CPU."""

from __future__ import annotations

import torch

from pte.memory import MemoryTracker

MIB = 2**20


class FakeAllocator:
    """torch.cuda's peak counters: set by the test per phase, zeroed by a reset."""

    def __init__(self) -> None:
        self.allocated = self.reserved = 0
        self.resets = 0

    def reset(self) -> None:
        self.allocated = self.reserved = 0
        self.resets += 1


def test_cuda_phases_report_allocated_and_reserved_peaks(monkeypatch):
    fake = FakeAllocator()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", fake.reset)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: fake.allocated)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda: fake.reserved)
    tracker = MemoryTracker()
    # The allocator keeps freed blocks: reserved stays above allocated, and its largest phase need not be allocated's.
    for phase, allocated, reserved in (("rollout", 5, 9), ("replay", 7, 8), ("optimizer", 1, 10)):
        tracker.start(phase)
        fake.allocated, fake.reserved = allocated * MIB, reserved * MIB
        tracker.stop(phase)
    assert fake.resets == 3
    assert {k: v // MIB for k, v in tracker.peaks().items()} == {
        "allocated_rollout": 5,
        "reserved_rollout": 9,
        "allocated_replay": 7,
        "reserved_replay": 8,
        "allocated_optimizer": 1,
        "reserved_optimizer": 10,
        "allocated_process": 7,
        "reserved_process": 10,
    }


def test_cpu_reports_the_process_resident_peak_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    tracker = MemoryTracker()
    tracker.start("rollout")
    tracker.stop("rollout")
    peaks = tracker.peaks()
    assert list(peaks) == ["rss_process"] and peaks["rss_process"] > 0
