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
from tests.helpers import ROOT, FakeGrid, default_run_config, reply, smollm2_adapter, tiny_run_config

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


def test_every_config_key_is_recorded_since_the_start_added_later_or_free_to_change() -> None:
    """A key added to Config must say what older checkpoints trained with (ADDED_LATER) or that it may change on
    resume (RESUME_MAY_CHANGE): otherwise every checkpoint saved before it would be refused."""
    from flowertune_llm.checkpoint import ADDED_LATER, FIRST_KEYS, RESUME_MAY_CHANGE, _flat

    keys = set(_flat(parse_config(default_run_config()).to_dict()))
    unknown = keys - FIRST_KEYS - set(ADDED_LATER) - RESUME_MAY_CHANGE
    assert not unknown, f"add to checkpoint.ADDED_LATER (the value older checkpoints trained with): {sorted(unknown)}"
    assert not (FIRST_KEYS | set(ADDED_LATER) | RESUME_MAY_CHANGE) - keys  # no stale names


def _without(config: dict, dotted: str) -> dict:
    """A copy of a nested config dict without one dotted key."""
    out = json.loads(json.dumps(config))
    *path, last = dotted.split(".")
    node = out
    for part in path:
        node = node[part]
    node.pop(last, None)
    return out


def test_a_checkpoint_missing_any_later_key_resumes_with_the_value_it_trained_with(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    """Each key added later dropped in turn, then all of them (the first release's checkpoints), then a folder
    written as the release before issue 35 wrote it: a resume with the values they trained with continues."""
    from flowertune_llm.checkpoint import ADDED_LATER, RESUME_MAY_CHANGE, config_differences

    cfg = parse_config(tiny_run_config(tiny_llama_dir, **{"num-server-rounds": 4, "train.dynamic-data-seed": False}))
    saved = json.loads(json.dumps(cfg.to_dict(), default=str))
    later = list(ADDED_LATER) + sorted(RESUME_MAY_CHANGE)
    for key in later:
        assert config_differences(_without(saved, key), cfg) == [], key
    everything = saved
    for key in later:
        everything = _without(everything, key)
    assert config_differences(everything, cfg) == []
    # as the previous release wrote peft_2: no mcq rotation/balance/option keys, no padding-free/cpu-compute keys, and
    # train.training-arguments.save-strategy = "no" in the pyproject (now set by the app, refused as a key)
    comm = {"sent_payload": 1, "sent_with_keys": 2, "received_payload": 3, "received_with_keys": 4}
    meta = checkpoint_metadata(cfg, 2, comm)
    for key in ("train.mcq_rotations", "train.mcq_balance", "train.mcq_options", "train.padding_free",
                "train.cpu_compute"):
        meta["config"] = _without(json.loads(json.dumps(meta["config"], default=str)), key)
    meta["config"]["train"]["training_arguments"].append(["save_strategy", "no"])
    state, peft_config = initial_adapter(cfg.model, cfg.train.seed)
    save_adapter(tmp_path / "run" / "peft_2", state, peft_config, meta)
    resumed = parse_config(tiny_run_config(tiny_llama_dir, **{
        "num-server-rounds": 4, "train.dynamic-data-seed": False, "train.resume-from": str(tmp_path / "run")}))
    assert load_resume(resumed).round == 2
    # ... while a real difference is still refused
    other = parse_config(tiny_run_config(tiny_llama_dir, **{
        "num-server-rounds": 4, "train.resume-from": str(tmp_path / "run")}))
    with pytest.raises(ConfigError, match="train.dynamic_data_seed: False -> True"):
        load_resume(other)


def test_a_resume_keeps_each_segments_evidence_and_the_rules_judge_every_segment(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    """2 rounds on 2 SuperNodes, then a resume on 20: config.json keeps both segments (node count, Flower run id,
    start), `runs` shows the whole wall time, and the submission rules name the 2-node segment."""
    import time

    from flowertune_llm.runs import read_run
    from flowertune_llm.submission import rule_violations

    cfg = parse_config(tiny_run_config(tiny_llama_dir, **{"num-server-rounds": 4}))
    run = tmp_path / "run"
    first = RunLog(run, cfg, run_info={"run_config": {}, "num_nodes": 2, "flower_run_id": 11})
    first.set_status("running")
    for rnd in (1, 2):
        first.append(RoundLog(rnd, cfg.lr(rnd), [rnd], 2, 0, 2.0, [{"partition": rnd, "loss": 2.0}]))
    time.sleep(0.2)
    first.set_status("running")  # the process's last word before it was killed
    second = RunLog(run, cfg, last_round=2, run_info={"run_config": {}, "num_nodes": 20, "flower_run_id": 12})
    second.set_status("running")
    for rnd in (3, 4):
        second.append(RoundLog(rnd, cfg.lr(rnd), [rnd], 2, 0, 2.0, [{"partition": rnd, "loss": 2.0}]))
    second.set_status("complete")
    record = read_run(run)
    assert [(s["first_round"], s["last_round"], s["num_nodes"], s["flower_run_id"]) for s in record.segments] == [
        (1, 2, 2, 11), (3, 4, 20, 12)]
    assert record.num_nodes is None  # two federations: no single node count to report
    assert record.wall_time_s >= 0.2  # the first segment's time counts too
    assert record.config["run"]["started"] == record.segments[0]["started"]
    (line,) = [v for v in rule_violations(record) if "num_nodes=" in v]
    assert line.startswith("segment 1 of 2 (rounds 1-2, Flower run 11): num_nodes=2:"), line
