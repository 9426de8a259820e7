"""Benchmarks, run by hand (`python -m tests.benchmarks.<name>`), never as timed assertions."""

from __future__ import annotations


def machine() -> str:
    """The CPU model, core count, bf16 flags and torch threads, for every printed figure."""
    import torch

    from flowertune_llm.devices import hardware

    return f"{hardware('cpu')}, torch threads {torch.get_num_threads()}"
