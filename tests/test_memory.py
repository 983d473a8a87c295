"""Peak memory per training phase (pte.training.memory.MemoryTracker), on CUDA's counters mocked and on the CPU."""

from __future__ import annotations

import pytest
import torch

from pte.training.memory import MemoryTracker

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


@pytest.mark.gpu
def test_cuda_peaks_are_the_real_allocator_figures_per_phase():
    """On a real device: a phase's allocated peak covers the tensor it made, and the next phase starts from zero."""
    tracker = MemoryTracker()
    tracker.start("rollout")
    x = torch.empty(64 * MIB, dtype=torch.uint8, device="cuda")
    tracker.stop("rollout")
    del x
    tracker.start("replay")
    tracker.stop("replay")
    peaks = tracker.peaks()
    assert peaks["allocated_rollout"] >= 64 * MIB and peaks["reserved_rollout"] >= peaks["allocated_rollout"]
    assert peaks["allocated_replay"] <= peaks["allocated_rollout"] - 64 * MIB  # x was freed before the reset
    assert peaks["allocated_process"] == peaks["allocated_rollout"]
