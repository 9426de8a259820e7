"""End to end: `flwr run` of the real app, 20 simulated SuperNodes, tiny 4-bit Llama, 2 rounds."""

from __future__ import annotations

import math
import re
import subprocess
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from flowertune_llm.config import parse_config
from flowertune_llm.models import adapter_state, initial_adapter
from tests.conftest import ALPACA_SUBSET, ROOT, tiny_run_config
from tests.processes import BIN, flower_env, start_simulation_superlink, stop_tree

pytestmark = pytest.mark.slow


def run_config_arg(overrides: dict) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        return f"'{v}'" if isinstance(v, str) else str(v)

    return " ".join(f"{k}={fmt(v)}" for k, v in overrides.items())


def test_flwr_run_trains_two_clients_per_round_and_saves_a_loadable_checkpoint(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    overrides = {
        "model.name": str(tiny_llama_dir),
        "model.quantization": 4,
        "static.dataset.name": str(ALPACA_SUBSET),
        "num-server-rounds": 2,
        "train.seq-length": 64,
        "train.learning-rate-max": 1e-2,
        "train.learning-rate-min": 1e-3,
        "train.training-arguments.per-device-train-batch-size": 4,
        "train.training-arguments.max-steps": 2,
        "train.output-dir": str(tmp_path / "results"),
    }
    home = tmp_path / "flwr-home"
    superlink, connection = start_simulation_superlink(home, tmp_path / "superlink.log")
    try:
        proc = subprocess.run(
            [str(BIN / "flwr"), "run", str(ROOT), connection, "--stream",
             "--federation-config", "num-supernodes=20 client-resources-num-cpus=1",
             "--run-config", run_config_arg(overrides)],
            env=flower_env(home), capture_output=True, text=True, timeout=900, check=False,
        )
    finally:
        stop_tree(superlink.pid)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]

    assert "Sampled 2 nodes (out of 20)" in log, log[-3000:]
    rounds = re.findall(r"\[round (\d+)\] lr=\S+ clients=(\d+) failed=(\d+) train_loss=(\S+)", log)
    assert [(r, c, f) for r, c, f, _ in rounds] == [("1", "2", "0"), ("2", "2", "0")], log[-3000:]
    assert all(math.isfinite(float(loss)) for *_, loss in rounds)

    checkpoints = list((tmp_path / "results").glob("*/peft_2"))
    assert len(checkpoints) == 1, log[-3000:]
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    trained = adapter_state(PeftModel.from_pretrained(base, str(checkpoints[0])))
    cfg = parse_config(tiny_run_config(tiny_llama_dir))
    start, _ = initial_adapter(cfg.model, cfg.train.seed)
    assert set(trained) == set(start)
    assert max((trained[k] - start[k]).abs().max().item() for k in start) > 1e-4
