"""The local round as a plain function, on a tiny Llama in 4-bit on CPU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from flowertune_llm.config import parse_config
from flowertune_llm.models import initial_adapter
from flowertune_llm.train import evaluate_adapter, train_one_round
from tests.conftest import tiny_run_config


def test_one_round_in_4bit_changes_the_adapter_and_reports_float32(tiny_llama_dir: Path) -> None:
    cfg = parse_config(tiny_run_config(tiny_llama_dir, **{"model.quantization": 4, "train.seq-length": 1024}))
    start, _ = initial_adapter(cfg.model, cfg.train.seed)
    result = train_one_round(cfg, start, partition_id=0, num_partitions=20, lr=1e-2)
    assert math.isfinite(result.train_loss) and result.train_loss > 0
    assert result.num_examples == 50  # 985 rows / 20 partitions; none too long for 1024 tokens
    short = train_one_round(cfg.__class__(**{**cfg.__dict__, "train": cfg.train.__class__(
        **{**cfg.train.__dict__, "seq_length": 60})}), start, 0, 20, 1e-2)
    assert short.num_examples == 43  # the 7 rows whose prompt alone fills 60 tokens are dropped
    assert set(result.state) == set(start)
    assert all(v.dtype == torch.float32 for v in result.state.values())
    assert any(not torch.equal(result.state[k], start[k]) for k in start)


def test_local_evaluation_returns_a_finite_loss(tiny_llama_dir: Path) -> None:
    cfg = parse_config(tiny_run_config(tiny_llama_dir, **{"model.quantization": "none"}))
    start, _ = initial_adapter(cfg.model, cfg.train.seed)
    loss, n = evaluate_adapter(cfg, start, partition_id=1, num_partitions=20)
    assert math.isfinite(loss) and n == 50


def test_threads_follow_the_cpus_a_process_was_given(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from flowertune_llm.models import process_threads

    available = len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what Ray sets for client-resources-num-cpus=1
    assert process_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", str(available + 7))  # never more than the process can run on
    assert process_threads() == available
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert process_threads() == available
