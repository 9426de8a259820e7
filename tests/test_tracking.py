"""Experiment trackers: keys, preflight, what each backend holds when read back with its own API.

The trackers run in a fresh interpreter (trackio reads TRACKIO_DIR once, at import); what they logged is read
back with MLflow's client (SQLite store), trackio's SQLiteStorage and W&B's offline run files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flowertune_llm.config import ConfigError, parse_config
from flowertune_llm.tracking import check_backends, client_reporting, tracker_metrics
from tests.helpers import ROOT, default_run_config, mlflow_run, trackio_logs, wandb_history

SCRIPT = """
import sys
from pathlib import Path
from flowertune_llm.config import parse_config
from flowertune_llm.tracking import Trackers, log_entry
from tests.helpers import default_run_config

tmp = Path(sys.argv[1])
cfg = parse_config(default_run_config(**{"tracking.backends": "mlflow,wandb,trackio,tensorboard",
                                         "train.output-dir": str(tmp / "results"), "num-server-rounds": 3,
                                         "sweep.name": "lr-sweep", "sweep.point": "train.seq-length=64"}))
run_dir = tmp / "results" / "2026-12-06_00-00-00"
run_dir.mkdir(parents=True)
checkpoint = run_dir / "peft_3"
checkpoint.mkdir()
(checkpoint / "adapter_config.json").write_text("{}")
line = {"server_round": 1, "train_loss": 2.0, "lr": 1e-3, "replies": 2, "failures": 1, "mb_total": 1.5,
        "val_mmlu_avg": 0.25, "client_losses": [{"partition": 3, "loss": 2.1, "peak_mem_mb": 100.0}],
        "rejected": [{"node": 7, "partition": 5, "reason": "no reply in 600 s"}], "timeout_s": None}
first = Trackers(run_dir, cfg)
first.add({"server_round": 0, "val_mmlu_avg": 0.2})
first.add(line)
first.flush()                                     # round 1's checkpoint
first.add({**line, "server_round": 2, "train_loss": 9.9})  # trained, never checkpointed: the process dies
first.finish("failed", "RuntimeError: the process died")
second = Trackers(run_dir, cfg)                   # the resume from round 1
for rnd in (2, 3):
    second.add({**line, "server_round": rnd, "train_loss": 2.0 - rnd / 10})
second.flush()
second.finish("complete", None, checkpoint)
entry = tmp / "entry"
entry.mkdir()
(entry / "results.json").write_text("{}")
print("ENTRY", log_entry(run_dir, cfg, entry, {"average": 0.2795, "valid_letter_rate": 1.0}))
"""


def test_each_tracker_holds_one_run_with_the_final_rounds_once_the_checkpoint_and_the_entry(tmp_path: Path) -> None:
    """One tracker run per run, resumed by id: params, each round once at its `server_round` (a round the dead
    process trained after its last checkpoint comes from the resume only), status, the final checkpoint and the
    entry with its scores; sweep name and point tag the run."""
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "ENTRY ['mlflow', 'wandb', 'trackio', 'tensorboard']" in out.stdout
    results = tmp_path / "results"
    run_dir = results / "2026-12-06_00-00-00"
    ids = json.loads((run_dir / "tracking.json").read_text())["runs"]
    assert set(ids) == {"mlflow", "wandb", "trackio", "tensorboard"}
    want = [(1, 2.0), (2, 1.8), (3, 1.7)]

    client, run = mlflow_run(results, ids["mlflow"])
    assert [(m.step, m.value) for m in client.get_metric_history(ids["mlflow"], "train/loss")] == want
    assert [m.step for m in client.get_metric_history(ids["mlflow"], "validation/mmlu_avg")] == [0, 1, 2, 3]
    assert [m.value for m in client.get_metric_history(ids["mlflow"], "federation/failed")] == [1.0] * 3
    assert [m.value for m in client.get_metric_history(ids["mlflow"], "client/3/loss")] == [2.1] * 3
    assert [m.value for m in client.get_metric_history(ids["mlflow"], "entry/average")] == [0.2795]
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "complete" and "error" not in run.data.tags
    assert run.data.params["train.seq_length"] == "512" and run.data.params["num_server_rounds"] == "3"
    name = "train.seq-length=64 2026-12-06_00-00-00"  # the sweep point and the run folder
    assert run.data.tags["sweep.name"] == "lr-sweep" and run.data.tags["mlflow.runName"] == name
    assert {a.path for a in client.list_artifacts(ids["mlflow"])} == {"peft_3", "entry"}
    assert [a.path for a in client.list_artifacts(ids["mlflow"], "peft_3")] == ["peft_3/adapter_config.json"]

    rows, records = wandb_history(run_dir)
    assert [(r["_step"], r["train/loss"]) for r in rows if "train/loss" in r] == want
    assert [r["_step"] for r in rows if "validation/mmlu_avg" in r] == [0, 1, 2, 3]
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert {r.run_id for r in runs} == {ids["wandb"]}
    assert {r.run_group for r in runs} == {"lr-sweep"} and {r.display_name for r in runs} == {name}
    exits = [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"]
    assert exits[-1] == 0 and 1 in exits  # the dead process's failed status, then the resume's and entry's
    assert {r.artifact.name for r in records if r.WhichOneof("record_type") == "artifact"} == {
        f"{ids['wandb']}-peft_3", f"{ids['wandb']}-entry"}
    summary = {i.key: json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "summary"
               for i in r.summary.update if i.key in ("status", "error", "entry/average")}
    assert summary == {"status": "complete", "error": "", "entry/average": 0.2795}  # last words: resume, entry

    logs = trackio_logs(tmp_path / "trackio", ids["trackio"])
    artifacts, logs = logs[-1], logs[:-1]
    assert [(r["step"], r["train/loss"]) for r in logs if "train/loss" in r] == want
    assert [r["step"] for r in logs if "validation/mmlu_avg" in r] == [0, 1, 2, 3]
    assert {a["name"] for a in artifacts["output"]} == {"train.seq-length_64_2026-12-06_00-00-00-peft_3",
                                                         "train.seq-length_64_2026-12-06_00-00-00-entry"}
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_tracker_metric_names_follow_trl_and_carry_only_numbers() -> None:
    line = {"server_round": 4, "train_loss": 1.5, "lr": 2e-5, "replies": 2, "failures": 0, "mb_total": 3.0,
            "val_mmlu_avg": 0.3, "val_batching": "exact", "validation": {}, "timeout_s": None, "rejected": [],
            "client_losses": [{"partition": 7, "loss": 1.4, "peak_mem_mb": 812.0, "node": 99}], "comm_total_bytes": {}}
    assert tracker_metrics(line) == {
        "train/loss": 1.5, "train/learning_rate": 2e-5, "federation/clients": 2.0, "federation/failed": 0.0,
        "comm/mb_total": 3.0, "validation/mmlu_avg": 0.3, "client/7/loss": 1.4, "client/7/peak_mem_mb": 812.0}


def test_tracking_keys_are_checked_and_a_missing_library_fails_in_preflight_with_the_install(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match=r"tracking.backends='mlflow,neptune': 'neptune' is not one of"):
        parse_config(default_run_config(**{"tracking.backends": "mlflow,neptune"}))
    with pytest.raises(ConfigError, match="tracking.wandb-mode"):
        parse_config(default_run_config(**{"tracking.wandb-mode": "cloud"}))
    cfg = parse_config(default_run_config(**{"tracking.backends": " wandb , mlflow"}))
    assert cfg.tracking.backends == ("wandb", "mlflow")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r'^tracking.backends=wandb: wandb is not installed; pip install '
                                          r'"flowertune-llm\[tracking\]"'):
        check_backends(cfg)
    tensorboard = parse_config(default_run_config(**{"metrics.tensorboard": True}))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError, match="^metrics.tensorboard=true: tensorboard is not installed"):
        check_backends(tensorboard)


def test_clients_stay_quiet_unless_asked_then_trl_reports_to_the_run_backends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flowertune_llm.train import sft_config

    for key in ("WANDB_MODE", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "TRACKIO_PROJECT"):
        monkeypatch.delenv(key, raising=False)
    quiet = parse_config(default_run_config(**{"tracking.backends": "mlflow"}))
    assert sft_config(quiet, 1e-3, str(tmp_path), "cpu").report_to in ("none", [], ["none"])
    loud = parse_config(default_run_config(**{"tracking.backends": "mlflow,wandb", "tracking.clients": True,
                                              "train.output-dir": str(tmp_path / "results")}))
    args = sft_config(loud, 1e-3, str(tmp_path), "cpu", run_name="p round 3 partition 7")
    assert args.report_to == ["mlflow", "wandb"] and args.run_name == "p round 3 partition 7"
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{(tmp_path / 'results').resolve() / 'mlflow.db'}"
    assert os.environ["WANDB_MODE"] == "offline"
    assert client_reporting(loud, "x")["report_to"] == ["mlflow", "wandb"]
