"""Run lifecycle: model kept across rounds, seeded sampling, resume checks, bf16 wire, metrics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord
from safetensors.torch import load_file

from flowertune_llm.checkpoint import checkpoint_metadata, load_resume, save_adapter
from flowertune_llm.config import ConfigError, parse_config
from flowertune_llm.devices import default_device
from flowertune_llm.metrics import RunLog
from flowertune_llm.models import arrays_to_state, initial_adapter, state_to_arrays
from flowertune_llm.rundir import latest_checkpoint, read_metrics
from flowertune_llm.schedule import sample_round
from flowertune_llm.strategy import FlowerTuneFedAvg, RoundLog
from flowertune_llm.train import ModelCache, TokenizedCache, train_one_round
from tests.helpers import ROOT, FakeGrid, reply, smollm2_adapter, tiny_run_config

pytestmark = pytest.mark.usefixtures("task_identity")  # Flower messages need a run identity

B_ALONE = """
import sys
from safetensors.torch import save_file
from flowertune_llm.config import parse_config
from flowertune_llm.models import initial_adapter
from flowertune_llm.train import ModelCache, TokenizedCache, train_one_round
from tests.helpers import tiny_run_config
cfg = parse_config(tiny_run_config(sys.argv[1], **{"model.quantization": 4}))
start, _ = initial_adapter(cfg.model, cfg.train.seed)
res = train_one_round(cfg, start, 7, 20, 1e-2, ModelCache(), TokenizedCache())
save_file(res.state, sys.argv[2])
"""


def test_partition_a_then_b_in_one_process_equals_b_alone_in_a_fresh_process(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    cfg = parse_config(tiny_run_config(tiny_llama_dir, **{"model.quantization": 4}))
    start, _ = initial_adapter(cfg.model, cfg.train.seed)
    models, tokenized = ModelCache(), TokenizedCache()
    a = train_one_round(cfg, start, 3, 20, 1e-2, models, tokenized)
    device = default_device()  # the key train_one_round used on this machine
    model_after_a = models.get(cfg.model, device, cfg.train.seed)
    b = train_one_round(cfg, start, 7, 20, 1e-2, models, tokenized)
    assert models.get(cfg.model, device, cfg.train.seed) is model_after_a  # kept, not rebuilt
    assert any(not torch.equal(a.state[k], b.state[k]) for k in a.state)

    out = tmp_path / "b_alone.safetensors"
    subprocess.run([sys.executable, "-c", B_ALONE, str(tiny_llama_dir), str(out)], cwd=ROOT, check=True)
    alone = load_file(str(out))
    assert max((alone[k] - b.state[k]).abs().max().item() for k in alone) <= 1e-6

    again = train_one_round(cfg, start, 7, 20, 1e-2, models, tokenized)  # tokenized partition cached
    assert max((again.state[k] - b.state[k]).abs().max().item() for k in again.state) <= 1e-6


def test_sampling_is_seeded_per_round_and_independent_of_node_ids() -> None:
    nodes_a = {101: 0, 55: 1, 9: 2, 870: 3}
    nodes_b = {5: 0, 6: 1, 7: 2, 8: 3}  # another run: new node ids, same partitions
    for rnd in range(1, 6):
        pick_a = [nodes_a[n] for n in sample_round(list(nodes_a), nodes_a, 2, 42, rnd)]
        pick_b = [nodes_b[n] for n in sample_round(list(nodes_b), nodes_b, 2, 42, rnd)]
        assert pick_a == pick_b
    picks = {tuple(sample_round(list(nodes_b), nodes_b, 2, 42, r)) for r in range(1, 20)}
    assert len(picks) > 1


def test_bf16_wire_halves_communication_and_stays_within_bf16_rounding() -> None:
    adapter = smollm2_adapter(576, 1536, 30, 9, 3)
    state = arrays_to_state(adapter)
    local = [{k: v + 0.01 * (i + 1) for k, v in state.items()} for i in range(2)]
    results = {}
    for dtype in ("float32", "bf16"):
        strategy = FlowerTuneFedAvg(lambda r: 1e-5, 0.1, 0.0, wire_dtype=dtype)
        messages = list(strategy.configure_train(1, adapter, ConfigRecord(), FakeGrid()))
        replies = [reply(m, state_to_arrays(local[i], dtype), 1.0, 10 * (i + 1)) for i, m in enumerate(messages)]
        agg, _ = strategy.aggregate_train(1, replies)
        results[dtype] = (strategy.rounds[1].comm_round.total_payload_mb, arrays_to_state(agg))
    (mb32, agg32), (mb16, agg16) = results["float32"], results["bf16"]
    assert 0.5 <= mb16 / mb32 < 0.51  # 2 bytes instead of 4, plus the same small npy headers
    for k in agg32:
        assert agg16[k].dtype == torch.float32
        tolerance = 2**-8 * agg32[k].abs().max().item() + 1e-12
        assert (agg16[k] - agg32[k]).abs().max().item() <= tolerance


def _checkpoint(tmp_path: Path, cfg, rnd: int) -> Path:
    state, peft_config = initial_adapter(cfg.model, cfg.train.seed)
    comm = {"sent_payload": 1, "sent_with_keys": 2, "received_payload": 3, "received_with_keys": 4}
    meta = checkpoint_metadata(cfg, rnd, comm)
    return save_adapter(tmp_path / "run" / f"peft_{rnd}", state, peft_config, meta)


def test_resume_refuses_a_config_that_changes_the_training(tmp_path: Path, tiny_llama_dir: Path) -> None:
    cfg = parse_config(tiny_run_config(tiny_llama_dir, **{"num-server-rounds": 4}))
    _checkpoint(tmp_path, cfg, 2)
    changed = parse_config(tiny_run_config(
        tiny_llama_dir,
        **{"num-server-rounds": 6, "model.lora.peft-lora-r": 16, "train.resume-from": str(tmp_path / "run")},
    ))
    with pytest.raises(ConfigError) as err:
        load_resume(changed)
    assert "model.lora.r: 8 -> 16" in str(err.value) and "num_server_rounds: 4 -> 6" in str(err.value)
    ok = parse_config(tiny_run_config(tiny_llama_dir, **{
        "num-server-rounds": 4, "train.resume-from": str(tmp_path / "run"), "train.save-every-round": 1,
    }))
    resume = load_resume(ok)
    assert resume.round == 2 and resume.run_dir == tmp_path / "run"
    assert resume.comm_total_bytes["received_with_keys"] == 4


def test_old_checkpoints_resume_as_alpaca_and_the_fraction_counts_only_for_mcq(tmp_path: Path, tiny_llama_dir: Path) -> None:
    from flowertune_llm.checkpoint import config_differences

    cfg = parse_config(tiny_run_config(tiny_llama_dir))
    old = cfg.to_dict()
    saved_alpaca = json.loads(json.dumps(old, default=str))
    del old["train"]["prompt_template"], old["train"]["mcq_fraction"], old["eval"]  # a version without these keys
    old = json.loads(json.dumps(old, default=str))
    assert config_differences(old, cfg) == []
    qa = parse_config(tiny_run_config(tiny_llama_dir, **{"train.prompt-template": "qa"}))
    assert config_differences(old, qa) == ["train.prompt_template: 'alpaca' -> 'qa'"]
    # The fraction is read by the mcq template only: another value resumes an alpaca run, never an mcq one.
    other = parse_config(tiny_run_config(tiny_llama_dir, **{"train.mcq-fraction": 0.9}))
    assert config_differences(saved_alpaca, other) == config_differences(old, other) == []
    mcq = parse_config(tiny_run_config(tiny_llama_dir, **{"train.prompt-template": "mcq", "train.mcq-fraction": 0.9}))
    assert config_differences(old, mcq) == ["train.mcq_fraction: None -> 0.9", "train.prompt_template: 'alpaca' -> 'mcq'"]
    saved_mcq = json.loads(json.dumps(mcq.to_dict(), default=str))
    assert config_differences(saved_mcq, parse_config(tiny_run_config(
        tiny_llama_dir, **{"train.prompt-template": "mcq", "train.mcq-fraction": 0.5}))) == ["train.mcq_fraction: 0.9 -> 0.5"]


def test_resume_ignores_incomplete_checkpoints(tmp_path: Path, tiny_llama_dir: Path) -> None:
    cfg = parse_config(tiny_run_config(tiny_llama_dir, **{"num-server-rounds": 10}))
    _checkpoint(tmp_path, cfg, 2)
    (tmp_path / "run" / ".peft_4.tmp-abc").mkdir()  # a crash during the rename's preparation
    broken = tmp_path / "run" / "peft_6"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{}")
    assert latest_checkpoint(tmp_path / "run") == tmp_path / "run" / "peft_2"
    with pytest.raises(ConfigError, match="incomplete checkpoint"):
        load_resume(parse_config(tiny_run_config(tiny_llama_dir, **{"train.resume-from": str(broken)})))
    with pytest.raises(ConfigError, match="no such folder"):
        load_resume(parse_config(tiny_run_config(tiny_llama_dir, **{"train.resume-from": str(tmp_path / "x")})))


def test_run_log_writes_config_metrics_and_plot(tmp_path: Path, tiny_llama_dir: Path) -> None:
    cfg = parse_config(tiny_run_config(tiny_llama_dir, **{"num-server-rounds": 3}))
    log = RunLog(tmp_path / "run", cfg)
    for rnd, loss in ((1, 3.0), (2, 2.5), (3, 2.0)):
        log.append(RoundLog(rnd, cfg.lr(rnd), [rnd], 2, 0, loss, [{"partition": rnd, "loss": loss}]))
    assert (log.plot()).stat().st_size > 1000
    assert json.loads((tmp_path / "run" / "config.json").read_text())["num_server_rounds"] == 3
    rows = read_metrics(tmp_path / "run")
    assert [r["server_round"] for r in rows] == [1, 2, 3]
    assert {"lr", "replies", "failures", "train_loss", "client_losses", "mb_round", "mb_total", "wall_time_s"} <= set(rows[0])
    RunLog(tmp_path / "run", cfg, last_round=2)  # resuming after round 2 drops round 3's line
    assert [r["server_round"] for r in read_metrics(tmp_path / "run")] == [1, 2]
    np.testing.assert_allclose(rows[1]["lr"], cfg.lr(2))
