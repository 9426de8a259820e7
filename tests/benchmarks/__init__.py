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
    return f"{model}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, CPU flags: {bf16_flags()}"


def bf16_flags() -> str:
    """The CPU's bf16 flags (`lscpu`'s avx512_bf16 / amx_bf16): figures depend on them, so every table says."""
    cpuinfo = Path("/proc/cpuinfo")
    flags: set[str] = set()
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    found = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return " ".join(found) if found else "no avx512_bf16/amx_bf16"
