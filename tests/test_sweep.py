"""`flowertune-llm sweep`: points checked first and known by their settings; every run it starts stopped on Ctrl-C or error."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowertune_llm.config import ConfigError
from flowertune_llm.runs import find_runs
from flowertune_llm.sweep import file_points, grid_points, run_sweep
from tests.helpers import default_run_config, make_run


class FakeCli:
    """FlowerCli without Flower: each run 'finishes' with the status the test decides."""

    def __init__(self, outcome: dict[str, str], interrupt_at: int = 0, fail: BaseException | None = None,
                 fail_in: str = "status") -> None:
        self.outcome, self.started, self.stopped, self.interrupt_at = outcome, [], [], interrupt_at
        self.fail, self.fail_in = fail, fail_in

    def start(self, run_config: str, federation_config: str | None) -> str:
        self.started.append(run_config)  # submitted to the SuperLink ...
        if self.fail is not None and self.fail_in == "start":
            raise self.fail  # ... but `flwr run` is interrupted before it prints the id
        return str(len(self.started))

    def runs(self) -> dict[str, str]:
        return {str(i): "finished:completed" if str(i) in self.stopped else "running"
                for i in range(1, len(self.started) + 1)}

    def status(self, run_id: str) -> tuple[str, str]:
        if self.interrupt_at and int(run_id) == self.interrupt_at:
            raise KeyboardInterrupt
        if self.fail is not None and self.fail_in == "status":
            raise self.fail
        label = self.started[int(run_id) - 1]
        return next(((s, "boom") for key, s in self.outcome.items() if key in label), ("finished:completed", ""))

    def stop(self, run_id: str) -> None:
        self.stopped.append(run_id)


def test_sweep_checks_every_point_before_any_run(tmp_path: Path) -> None:
    defaults = default_run_config()
    fake = FakeCli({})
    points = grid_points(["train.learning-rate-max=5e-5,2e-4", "train.prompt-templat=alpaca,qa"])
    with pytest.raises(ConfigError, match="point 1 .*unknown key 'train.prompt-templat' .*did you mean train.prompt-template"):
        run_sweep("s", points, {"train.output-dir": str(tmp_path)}, defaults, fake)
    with pytest.raises(ConfigError, match="point 4 .*train.prompt-template='nope'"):
        run_sweep("s", grid_points(["train.prompt-template=alpaca,qa,chat,nope"]), {"train.output-dir": str(tmp_path)},
                  defaults, fake)
    assert fake.started == []


def test_sweep_points_from_a_grid_and_a_toml_file(tmp_path: Path) -> None:
    points = grid_points(["train.learning-rate-max=5e-5,2e-4", "train.prompt-template=alpaca,'qa'"])
    assert [p.label for p in points] == [
        "train.learning-rate-max=5e-05 train.prompt-template='alpaca'",
        "train.learning-rate-max=5e-05 train.prompt-template='qa'",
        "train.learning-rate-max=0.0002 train.prompt-template='alpaca'",
        "train.learning-rate-max=0.0002 train.prompt-template='qa'",
    ]
    toml = tmp_path / "points.toml"
    toml.write_text('[grid]\n"train.seed" = [1, 2]\n\n[[point]]\n"train.prompt-template" = "qa"\n"num-server-rounds" = 3\n')
    assert [p.label for p in file_points(toml)] == [
        "train.seed=1", "train.seed=2", "train.prompt-template='qa' num-server-rounds=3"]


def test_sweep_reports_a_failed_point_goes_on_and_a_rerun_skips_completed_points(tmp_path: Path) -> None:
    defaults = default_run_config()
    out = tmp_path / "results"
    points = grid_points(["train.seed=1,2,3"])
    fake = FakeCli({"train.seed=2": "finished:failed"})
    outcomes = run_sweep("s", points, {"train.output-dir": str(out)}, defaults, fake, poll_s=0)
    assert [o.status for o in outcomes] == ["finished:completed", "finished:failed", "finished:completed"]
    assert all("sweep.name='s'" in c and "sweep.point=" in c for c in fake.started)
    failed = find_runs([out])  # the fake wrote no run folders: only the failed point's record
    assert len(failed) == 1 and failed[0].status == "failed" and failed[0].sweep == ("s", "train.seed=2")
    assert failed[0].status_file["error"] == "boom"
    for seed in (1, 3):  # as the ServerApp would have written them
        make_run(out, f"run-{seed}", 4, num_rounds=100, status="complete", overrides={
            "train.seed": seed, "sweep.name": "s", "sweep.point": f"train.seed={seed}", "train.output-dir": str(out)})
    again = FakeCli({})
    outcomes = run_sweep("s", points, {"train.output-dir": str(out)}, defaults, again, poll_s=0)
    assert [o.status for o in outcomes] == ["skipped", "finished:completed", "skipped"]
    assert len(again.started) == 1 and "train.seed=2" in again.started[0]


def test_ctrl_c_stops_the_running_run_and_leaves_finished_points(tmp_path: Path) -> None:
    fake = FakeCli({}, interrupt_at=2)
    with pytest.raises(KeyboardInterrupt):
        run_sweep("s", grid_points(["train.seed=1,2,3"]), {"train.output-dir": str(tmp_path)}, default_run_config(),
                  fake, poll_s=0)
    assert fake.stopped == ["2"] and len(fake.started) == 2


def test_ctrl_c_while_flwr_run_starts_stops_the_run_it_submitted(tmp_path: Path) -> None:
    fake = FakeCli({}, fail=KeyboardInterrupt(), fail_in="start")
    with pytest.raises(KeyboardInterrupt):
        run_sweep("s", grid_points(["train.seed=1,2"]), {"train.output-dir": str(tmp_path)}, default_run_config(),
                  fake, poll_s=0)
    assert fake.started and fake.stopped == ["1"]


def test_a_flwr_ls_error_stops_the_running_run_and_is_one_line(tmp_path: Path) -> None:
    fake = FakeCli({}, fail=RuntimeError("flwr ls did not answer within 60 s"))
    said: list[str] = []
    with pytest.raises(RuntimeError, match="did not answer"):
        run_sweep("s", grid_points(["train.seed=1,2"]), {"train.output-dir": str(tmp_path)}, default_run_config(),
                  fake, poll_s=0, say=said.append)
    assert fake.stopped == ["1"] and "flwr ls did not answer within 60 s: stopping run 1" in said[-1]


def test_a_sweep_rerun_with_other_settings_is_refused_naming_them(tmp_path: Path) -> None:
    out = tmp_path / "results"
    make_run(out, "run-1", 4, num_rounds=4, status="complete",
             overrides={"train.seed": 1, "sweep.name": "s", "sweep.point": "train.seed=1", "train.output-dir": str(out)})
    fake = FakeCli({})
    with pytest.raises(ConfigError, match=r"sweep 's' ran train.seed=1 with other settings \(num-server-rounds: 4 -> 5\)"):
        run_sweep("s", grid_points(["train.seed=1,2"]), {"train.output-dir": str(out), "num-server-rounds": 5},
                  default_run_config(), fake, poll_s=0)
    assert fake.started == []
    outcomes = run_sweep("s", grid_points(["train.seed=1,2"]), {"train.output-dir": str(out), "num-server-rounds": 4},
                         default_run_config(), fake, poll_s=0)
    assert [o.status for o in outcomes] == ["skipped", "finished:completed"]  # the same settings: done


def test_flwr_json_is_found_whatever_surrounds_it() -> None:
    from flowertune_llm.sweep import flwr_json

    out = 'Loading project configuration... {not json}\n{"success": true, "run-id": 7}\nbye {"x": 1}'
    assert flwr_json(out, "run-id") == {"success": True, "run-id": 7}
    with pytest.raises(RuntimeError, match="no JSON object with 'runs'"):
        flwr_json(out, "runs")
