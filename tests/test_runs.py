"""`flowertune-llm runs`: one table of run folders, their curves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flowertune_llm.cli import main as cli
from flowertune_llm.plots import plot_runs
from flowertune_llm.runs import differing_keys, find_runs, format_table
from tests.helpers import make_run


@pytest.fixture
def results(tmp_path: Path) -> Path:
    root = tmp_path / "results"
    make_run(root, "2026-11-01_old", 4, old=True)  # no validation, no status, no run_config
    make_run(root, "2026-11-02_stopped", 2, overrides={"train.learning-rate-max": 1e-3},
             validation=[(0, 0.10), (2, 0.30)], status="running")
    make_run(root, "2026-11-03_done", 4, overrides={"train.learning-rate-max": 2e-4, "train.prompt-template": "qa"},
             validation=[(0, 0.10), (2, 0.20), (4, 0.25)], status="complete")
    return root


def test_runs_lists_old_stopped_and_complete_runs_best_validation_first(
    results: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = find_runs([results])
    assert {r.name: r.status for r in runs} == {
        "2026-11-01_old": "complete", "2026-11-02_stopped": "stopped at round 2 of 4", "2026-11-03_done": "complete"}
    new = [r for r in runs if r.name != "2026-11-01_old"]
    assert differing_keys(new) == ["train.learning-rate-max", "train.prompt-template"]
    assert cli(["runs", str(results)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[2:5]] == ["2026-11-02_stopped", "2026-11-03_done", "2026-11-01_old"]
    stopped = lines[2].split()
    assert "30.00" in stopped and "2" in stopped  # best validation 30% at round 2 of a stopped run
    rows = json.loads(format_table(runs, "json"))
    old = next(r for r in rows if r["run"].endswith("old"))
    assert old["best_val_avg"] is None and old["peak_mem_mb"] is None and old["rounds"] == 4  # empty, no error
    done = next(r for r in rows if r["run"].endswith("done"))
    assert (done["best_val_avg"], done["best_round"], done["letter_ceiling_at_best"]) == (0.25, 4, 0.25)
    assert done["comm_mb"] == pytest.approx(29.88) and done["peak_mem_mb"] == 904.0 and done["wall_s"] == 95.0
    csv_lines = format_table(runs, "csv").splitlines()
    assert len(csv_lines) == 4 and csv_lines[0].startswith("run,status,base_model")


def test_runs_plot_draws_one_curve_per_run(results: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.figure

    seen = {}
    real_savefig = matplotlib.figure.Figure.savefig

    def capture(fig, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen["lines"] = [len(ax.get_lines()) for ax in fig.axes]
        seen["labels"] = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", capture)
    runs = find_runs([results])
    path = plot_runs(runs, tmp_path / "plots" / "runs.png")
    assert path.is_file() and path.stat().st_size > 1000
    assert seen["lines"] == [3, 3]  # validation average and train loss: one curve per run each
    assert any("train.prompt-template=qa" in label for label in seen["labels"])


def test_runs_refuses_a_folder_that_is_not_there(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["runs", str(tmp_path / "nope")]) == 2
    assert "nope: no such folder" in capsys.readouterr().err
