"""What a run is on: CPUs differ in speed and in how their kernels round (the same toy-base spec trains another model
on another CPU: docs/results.md), so figures and builds name the machine they came from."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux; elsewhere platform's coarser name, then "cpu")."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    names = [line.partition(":")[2].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or "cpu"
