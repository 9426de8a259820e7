"""Benchmarks, run by hand (`python -m tests.benchmarks.<name>`), never as timed assertions."""

from __future__ import annotations

import platform
from pathlib import Path


def machine() -> str:
    """The CPU model (from /proc/cpuinfo where there is one) and core count, for every printed figure."""
    import os

    import torch

    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
