"""The run folder (rundir.py): statuses, a reader that survives what a kill leaves, and writes that never tear."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowertune_llm import rundir
from flowertune_llm.cli import main as cli
from flowertune_llm.rundir import latest_checkpoint, read_metrics, status_record
from flowertune_llm.runs import find_runs, read_run
from tests.helpers import make_run


def dead_pid() -> int:
    """The id of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_live_run_is_listed_as_running_and_one_whose_process_is_gone_as_stopped(tmp_path: Path) -> None:
    run = make_run(tmp_path, "live", 2, num_rounds=4)
    (run / rundir.STATUS_FILE).write_text(json.dumps(status_record("running", 0.0)))  # this process writes it
    assert read_run(run).status == "running at round 2 of 4"
    (run / rundir.STATUS_FILE).write_text(json.dumps({**status_record("running", 0.0), "pid": dead_pid()}))
    assert read_run(run).status == "stopped at round 2 of 4"
    (run / rundir.STATUS_FILE).write_text(json.dumps({"status": "running", "started": 0.0}))  # before pids
    assert read_run(run).status == "stopped at round 2 of 4"


def test_a_corrupt_config_is_named_while_the_other_runs_are_listed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_run(tmp_path, "good", 2, num_rounds=2, status="complete")
    bad = make_run(tmp_path, "bad", 2, num_rounds=2)
    (bad / rundir.CONFIG_FILE).write_text('{"num_server_rounds": 2, "mod')
    assert cli(["runs", str(tmp_path), "--format", "json"]) == 0
    out, err = capsys.readouterr()
    assert [Path(r["run"]).name for r in json.loads(out)] == ["good"]
    assert err.startswith(f"warning: {bad / rundir.CONFIG_FILE}: unreadable (JSONDecodeError") and "not listed" in err


def test_a_half_written_last_metrics_line_survives_runs_and_resume(
    tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flowertune_llm.config import parse_config
    from flowertune_llm.metrics import RunLog
    from tests.helpers import tiny_run_config

    run = make_run(tmp_path, "killed", 2, num_rounds=4)
    with open(run / rundir.METRICS_FILE, "a") as fh:
        fh.write('{"server_round": 3, "train_loss": 1.7, "mb_to')  # a kill during the append
    problems: list[str] = []
    assert [m["server_round"] for m in read_metrics(run, problems)] == [1, 2]
    assert problems == [f"{run / rundir.METRICS_FILE}:3: not a complete JSON line (a run killed while writing?); left out"]
    assert cli(["runs", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "stopped at round 2 of 4" in out and "metrics.jsonl:3: not a complete JSON line" in err
    RunLog(run, parse_config(tiny_run_config(tiny_llama_dir, **{"num-server-rounds": 4})), last_round=2)  # resume
    assert [json.loads(line)["server_round"] for line in (run / rundir.METRICS_FILE).read_text().splitlines()] == [1, 2]


def test_resume_from_round_5_of_a_run_that_had_reached_peft_10_ends_with_this_runs_final_checkpoint(
    tmp_path: Path, tiny_llama_dir: Path, task_identity: None
) -> None:
    from flwr.app import Context, RecordDict

    from flowertune_llm import server_app
    from flowertune_llm.checkpoint import checkpoint_metadata, save_adapter
    from flowertune_llm.config import parse_config
    from flowertune_llm.models import initial_adapter
    from tests.benchmarks.bench_quality import InProcessGrid
    from tests.helpers import tiny_run_config

    overrides = {"num-server-rounds": 10, "train.save-every-round": 5, "train.training-arguments.max-steps": 1,
                 "train.output-dir": str(tmp_path / "results")}
    cfg = parse_config(tiny_run_config(tiny_llama_dir, **overrides))
    state, peft_config = initial_adapter(cfg.model, cfg.train.seed)
    comm = {"sent_payload": 0, "sent_with_keys": 0, "received_payload": 0, "received_with_keys": 0}
    run = tmp_path / "results" / "run"
    save_adapter(run / "peft_5", state, peft_config, checkpoint_metadata(cfg, 5, comm))
    abandoned = {k: v + 1.0 for k, v in state.items()}  # the peft_10 of a continuation that is not this run's
    save_adapter(run / "peft_10", abandoned, peft_config, checkpoint_metadata(cfg, 10, comm))

    run_config = tiny_run_config(tiny_llama_dir, **overrides, **{"train.resume-from": str(run / "peft_5")})
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    server_app.main(InProcessGrid(run_config), context)

    (aside,) = (run / rundir.ABANDONED_DIR).iterdir()
    moved = load_file(str(aside / "peft_10" / "adapter_model.safetensors"))
    assert all(torch.equal(moved[k], abandoned[k]) for k in abandoned)  # kept, out of the way
    record = find_runs([tmp_path / "results"])[0]
    assert record.status == "complete" and record.final_checkpoint == run / "peft_10"
    final = load_file(str(run / "peft_10" / "adapter_model.safetensors"))
    assert all(not torch.equal(final[k], abandoned[k]) for k in abandoned)  # this run's rounds 6-10


def fill(folder: Path, text: str) -> None:
    """A stand-in checkpoint: every file of a complete one."""
    for name in rundir.ADAPTER_FILES:
        (folder / name).write_text(text)


def test_a_kill_between_the_two_steps_of_a_checkpoint_replacement_leaves_a_complete_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "run" / "peft_5"
    with rundir.write_folder(dest) as tmp:
        fill(tmp, "old")

    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # SIGINT right after the swap, before the old folder is deleted

    monkeypatch.setattr(rundir.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt), rundir.write_folder(dest, replace=True) as tmp:
        fill(tmp, "new")
    monkeypatch.undo()
    assert rundir.is_complete(dest) and (dest / "adapter_config.json").read_text() == "new"

    # where the file system cannot swap: set aside, then rename; a kill in between is recovered by the reader
    monkeypatch.setattr(rundir, "_exchange", lambda a, b: False)
    real_rename = Path.rename

    def rename_then_die(self: Path, target: Path) -> Path:
        if self.name.startswith(".peft_5.tmp-"):
            raise KeyboardInterrupt  # after the old one was set aside, before the new one took its place
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename_then_die)
    with pytest.raises(KeyboardInterrupt), rundir.write_folder(dest, replace=True) as tmp:
        fill(tmp, "newer")
    monkeypatch.undo()
    assert not dest.exists()
    assert latest_checkpoint(tmp_path / "run") == dest and (dest / "adapter_config.json").read_text() == "new"
    names = sorted(p.name for p in (tmp_path / "run").iterdir())  # the first kill's temp folder is ignored by readers
    assert [n for n in names if not n.startswith(".peft_5.tmp-")] == ["peft_5"]


def test_runs_shows_which_leaderboard_rules_a_run_breaks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_run(tmp_path, "eligible", 2, num_rounds=2, status="complete",
             overrides={"model.name": "HuggingFaceTB/SmolLM2-135M-Instruct"})
    make_run(tmp_path, "small", 2, num_rounds=2, status="complete", num_nodes=2,
             overrides={"model.name": "HuggingFaceTB/SmolLM2-135M-Instruct", "static.dataset.name": "vicgalle/alpaca-gpt4"})
    assert cli(["runs", str(tmp_path), "--format", "json"]) == 0
    listed = {Path(r["run"]).name: r["rules"] for r in json.loads(capsys.readouterr().out)}
    assert listed["eligible"] == [] and [v.split("=")[0] for v in listed["small"]] == ["static.dataset.name", "num_nodes"]
    assert cli(["runs", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "2 broken" in table and " ok " in table


def test_written_files_and_folders_get_an_ordinary_writes_permissions_and_reach_the_disk_before_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mkstemp/mkdtemp make 0600/0700 entries; what the tool writes is readable as an ordinary write would leave it
    (the umask's mode), also for an owner-only file copied in; every file is fsynced before its rename."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        synced: list[str] = []
        real_fsync = os.fsync
        monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
        rundir.write_json(tmp_path / "run" / "config.json", {"a": 1})
        assert stat.S_IMODE((tmp_path / "run" / "config.json").stat().st_mode) == 0o644
        assert any(".config." in s and s.endswith(".tmp.json") for s in synced)  # the temp file, before its rename
        private = tmp_path / "private.txt"
        private.write_text("x")
        private.chmod(0o600)
        import shutil

        with rundir.write_folder(tmp_path / "entry") as tmp:
            (tmp / "inner").mkdir()
            shutil.copy2(private, tmp / "inner" / "copied.txt")  # copy2 carries 0600
        modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode)
                 for p in [tmp_path / "entry", *(tmp_path / "entry").rglob("*")]}
        assert modes == {"entry": 0o755, "entry/inner": 0o755, "entry/inner/copied.txt": 0o644}
        os.umask(0o077)  # a user who wants owner-only files gets them
        rundir.write_text(tmp_path / "run" / "status.json", "{}")
        assert stat.S_IMODE((tmp_path / "run" / "status.json").stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_a_checkpoint_set_aside_by_a_crash_mid_replacement_is_still_the_runs_final_checkpoint(tmp_path: Path) -> None:
    """Where the folder swap is not available, a replacement renames peft_N away, then the new one in: a crash
    between the two leaves only `.peft_N.previous`; the readers find it, as `latest_checkpoint` does."""
    run = make_run(tmp_path, "run", rounds_done=4, num_rounds=4)
    aside = run / ".peft_4.previous"
    aside.mkdir()
    for name in rundir.ADAPTER_FILES:
        (aside / name).write_text("{}")
    record = read_run(run)
    assert record.final_checkpoint == aside and 4 in record.checkpoints
    assert list(run.glob("peft_*")) == []  # reading changed nothing
    assert latest_checkpoint(run) == run / "peft_4"  # resume puts it back
