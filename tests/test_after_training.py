"""After training: `runs` (tables and curves of run folders), `sweep` (checked, resumable), `submission`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from flowertune_llm.cli import main as cli
from flowertune_llm.config import ConfigError
from flowertune_llm.plots import plot_runs
from flowertune_llm.runs import differing_keys, find_runs, format_table
from flowertune_llm.sweep import file_points, grid_points, run_sweep
from tests.helpers import MMLU_DIR, ROOT, default_run_config


def make_run(
    root: Path, name: str, rounds_done: int, num_rounds: int = 4, overrides: dict | None = None,
    validation: list[tuple[int, float]] | None = None, status: str | None = None, old: bool = False,
    num_nodes: int = 20,
) -> Path:
    """A run folder as the ServerApp writes it (old=True: as runs from before run_config/status were recorded)."""
    run = root / name
    run.mkdir(parents=True)
    rc = default_run_config(**{"num-server-rounds": num_rounds, **(overrides or {})})
    config: dict[str, Any] = {"num_server_rounds": num_rounds, "model": {"name": rc["model.name"]},
                              "dataset_name": rc["static.dataset.name"]}
    if not old:
        config["run"] = {"run_config": rc, "num_nodes": num_nodes, "flower_run_id": 7}
    (run / "config.json").write_text(json.dumps(config))
    lines = []
    evals = dict(validation or [])
    for rnd in range(0, rounds_done + 1):
        line: dict[str, Any] = {"server_round": rnd}
        if rnd:
            line.update(train_loss=2.0 - 0.1 * rnd, mb_total=7.47 * rnd, mb_total_with_keys=7.5 * rnd,
                        wall_time_s=10.0, **({} if old else {"peak_mem_mb": 900.0 + rnd}))
        if rnd in evals:
            line.update(val_mmlu_avg=evals[rnd], val_valid_letter_rate=0.5, val_letter_ceiling=0.25, val_eval_s=2.0)
        if len(line) > 1:
            lines.append(json.dumps(line))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if status:
        (run / "status.json").write_text(json.dumps({"status": status, "started": 0.0, "updated": 95.0}))
    return run


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


# --- submission ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> tuple[Path, dict]:
    """The initial adapter of the tiny Llama, saved as a PEFT folder."""
    from flowertune_llm.checkpoint import save_adapter
    from flowertune_llm.config import parse_config
    from flowertune_llm.models import initial_adapter
    from tests.helpers import tiny_run_config

    state, peft_config = initial_adapter(parse_config(tiny_run_config(tiny_llama_dir)).model, 0)
    folder = save_adapter(tmp_path_factory.mktemp("ckpt") / "peft_2", state, peft_config, {})
    return folder, {"model.name": str(tiny_llama_dir)}


def tiny_finished_run(root: Path, checkpoint: tuple[Path, dict], **kwargs: Any) -> Path:
    """A complete 2-round run of the tiny model with its final checkpoint."""
    import shutil

    folder, overrides = checkpoint
    run = make_run(root, kwargs.pop("name", "run"), 2, num_rounds=2, overrides={**overrides, **kwargs.pop("overrides", {})},
                   status="complete", **kwargs)
    shutil.copytree(folder, run / "peft_2")
    return run


@pytest.fixture(scope="module")
def small_test_split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 test questions per leaderboard category (a local stand-in for the full split)."""
    from flowertune_llm.evaluate.data import by_category, load_questions

    picked = {q.question for qs in by_category(load_questions(str(MMLU_DIR / "mmlu_test.jsonl")),
                                                ["stem", "social_sciences", "humanities"], 4).values() for q in qs}
    path = tmp_path_factory.mktemp("mmlu") / "mmlu_test_small.jsonl"
    lines = [line for line in (MMLU_DIR / "mmlu_test.jsonl").read_text().split("\n")
             if line.strip() and json.loads(line)["question"] in picked]
    path.write_text("\n".join(lines) + "\n")
    return path


HUB_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def edited_app(tmp_path: Path, dataset: str) -> Path:
    """A copy of this app whose static section was edited to name `dataset`."""
    app = tmp_path / "edited-app"
    app.mkdir()
    text = (ROOT / "pyproject.toml").read_text()
    (app / "pyproject.toml").write_text(text.replace('dataset.name = "flwrlabs/alpaca-gpt4"', f'dataset.name = "{dataset}"'))
    return app


@pytest.mark.parametrize("kwargs, line", [
    # the app folder's static section was edited the same way: the run is still refused (rules.py, not --app)
    ({"overrides": {"static.dataset.name": "/data/my-alpaca.jsonl"}, "app": "/data/my-alpaca.jsonl"},
     "error: static.dataset.name='/data/my-alpaca.jsonl': the leaderboard trains on 'flwrlabs/alpaca-gpt4'"),
    ({"overrides": {"static.dataset.name": "vicgalle/alpaca-gpt4"}},
     "error: static.dataset.name='vicgalle/alpaca-gpt4': the rule before 2025-04-08 (the same rows)"),
    ({"num_nodes": 2}, "error: num_nodes=2: the run's federation had 2 SuperNodes; the leaderboard needs exactly 20"),
    ({"overrides": {"model.name": "/models/SmolLM2-135M-Instruct.Q4_1.gguf"}},
     "error: model.name='/models/SmolLM2-135M-Instruct.Q4_1.gguf': a GGUF import (close to, not bit-equal with"),
])
def test_submission_refuses_a_rule_violation_with_one_line(
    tmp_path: Path, tiny_checkpoint: tuple[Path, dict], capsys: pytest.CaptureFixture[str], kwargs: dict, line: str
) -> None:
    kwargs = {**kwargs, "overrides": {"model.name": HUB_MODEL, **kwargs.get("overrides", {})}}
    app = edited_app(tmp_path, kwargs.pop("app")) if "app" in kwargs else ROOT
    run = tiny_finished_run(tmp_path / "results", tiny_checkpoint, **kwargs)
    assert cli(["submission", str(run), "--out", str(tmp_path / "entry"), "--app", str(app)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(line), err
    assert not (tmp_path / "entry").exists() and not list(tmp_path.glob(".entry*"))


def test_submission_builds_an_entry_whose_numbers_match_the_evaluation_in_the_official_files(
    tmp_path: Path, tiny_checkpoint: tuple[Path, dict], small_test_split: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A tiny local model on 4 questions per category: built with --allow-rule-violations, which names exactly the
    local base model and the three partial categories; everything else as a real entry."""
    run = tiny_finished_run(tmp_path / "results", tiny_checkpoint)
    out = tmp_path / "entry"
    args = ["--data", str(small_test_split), "--batch-size", "4", "--device", "cpu", "--no-progress", "--run-name", "fl"]
    assert cli(["submission", str(run), "--out", str(out), "--app", str(ROOT), *args]) == 2  # refused before evaluating
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: model.name={tiny_checkpoint[1]['model.name']!r}: a local model")
    assert not out.exists() and not list(tmp_path.glob(".entry*"))
    assert cli(["submission", str(run), "--out", str(out), "--app", str(ROOT), *args, "--allow-rule-violations"]) == 0
    assert "evaluation ran now" in capsys.readouterr().out
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"peft_2/adapter_config.json", "peft_2/adapter_model.safetensors", "README.md", "SHA256SUMS",
            "results.json", "comm_cost.txt", "config.json", "metrics.jsonl", "evaluation/results.json"} <= names
    for cat in ("stem", "social_sciences", "humanities"):
        assert {f"evaluation/acc_mmlu_{cat}_fl.txt", f"evaluation/generation_mmlu_{cat}_fl.jsonl"} <= names
    summary = json.loads((out / "results.json").read_text())
    readme = (out / "README.md").read_text()
    cats = summary["categories"]
    row = (f"| run + peft_2 | 2 | {100 * cats['stem']['accuracy']:.2f} | {100 * cats['social_sciences']['accuracy']:.2f} "
           f"| {100 * cats['humanities']['accuracy']:.2f} | {100 * summary['average']:.2f} |")
    assert row.replace("run + ", f"{Path(tiny_checkpoint[1]['model.name']).name} + ") in readme, readme
    for cat in ("stem", "social_sciences", "humanities"):
        acc = (out / f"evaluation/acc_mmlu_{cat}_fl.txt").read_text()
        assert acc == f"Accuracy: {cats[cat]['accuracy']}. "
        records = json.loads((out / f"evaluation/generation_mmlu_{cat}_fl.jsonl").read_text())
        assert sum(r["correct"] for r in records) == cats[cat]["correct"] and len(records) == cats[cat]["total"] == 4
    assert "not the full MMLU test split" in readme and "**Not eligible for the leaderboard**" in readme
    violations = [line for line in readme.splitlines() if line.startswith("> - ")]
    assert [v[4:].split("=")[0] for v in violations] == [
        "model.name", "categories.stem.total", "categories.social_sciences.total", "categories.humanities.total"]
    assert "Communication cost:** 14.94 MB" in readme and "902 MiB peak" in readme
    assert "flowertune-eval --base-model-name-path" in readme and "flwr run . --stream" in readme
    assert "flwrlabs/alpaca-gpt4" in readme and "not leaderboard figures" in readme
    for entry in (out / "SHA256SUMS").read_text().splitlines():
        digest, name = entry.split("  ", 1)
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    assert summary["split"] == "test" and summary["adapter_config_sha256"] and summary["base_model_sha256"]
    assert cli(["submission", str(run), "--out", str(out), "--app", str(ROOT), "--allow-rule-violations"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err  # never over a finished entry


def full_split_evaluation(source: Path, dest: Path, **changes: Any) -> Path:
    """A copy of an evaluation folder whose results.json says it scored the full test split exactly (+ changes)."""
    import shutil

    from flowertune_llm import rules

    shutil.copytree(source, dest)
    summary = json.loads((dest / "results.json").read_text())
    for cat, count in rules.EVAL_COUNTS.items():
        summary["categories"][cat]["total"] = count
    summary.update(changes)
    (dest / "results.json").write_text(json.dumps(summary))
    return dest


def test_an_evaluation_is_reused_only_for_the_same_adapter_on_the_same_base_under_the_rules(
    tmp_path: Path, tiny_checkpoint: tuple[Path, dict], small_test_split: Path, smollm2_tokenizer_dir: Path
) -> None:
    import shutil

    from flowertune_llm.evaluate.api import evaluate_mmlu
    from flowertune_llm.submission import SubmissionError, reusable_evaluation
    from tests.helpers import make_tiny_llama

    peft, overrides = tiny_checkpoint
    base = overrides["model.name"]
    scored = tmp_path / "scored"
    evaluate_mmlu(base, str(peft), data=str(small_test_split), batch_size=4, device="cpu", output_dir=scored,
                  show_progress=False)
    assert reusable_evaluation(full_split_evaluation(scored, tmp_path / "ok"), peft, base)["average"] is not None

    def refused(eval_dir: Path, adapter: Path = peft, base_model: str = base) -> str:
        with pytest.raises(SubmissionError) as err:
            reusable_evaluation(eval_dir, adapter, base_model)
        return str(err.value)

    assert "categories.stem.total=4: the full test split has 3153" in refused(scored)  # as scored: 4 per category
    assert "split='validation'" in refused(full_split_evaluation(scored, tmp_path / "val", split="validation"))
    assert "batching='inexact'" in refused(full_split_evaluation(scored, tmp_path / "inexact", batching="inexact"))
    other_alpha = tmp_path / "alpha" / peft.name
    shutil.copytree(peft, other_alpha)  # the same weights, another lora_alpha: another adapter
    config = json.loads((other_alpha / "adapter_config.json").read_text())
    (other_alpha / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 2 * config["lora_alpha"]}))
    assert "adapter_config_sha256=" in refused(full_split_evaluation(scored, tmp_path / "a"), adapter=other_alpha)
    twin = make_tiny_llama(tmp_path / "elsewhere" / Path(base).name, smollm2_tokenizer_dir, seed=1)  # same name
    assert "base_model_sha256=" in refused(full_split_evaluation(scored, tmp_path / "b"), base_model=str(twin))


def test_submission_with_allowed_violations_is_marked_not_eligible(
    tmp_path: Path, tiny_checkpoint: tuple[Path, dict], small_test_split: Path
) -> None:
    run = tiny_finished_run(tmp_path / "results", tiny_checkpoint, num_nodes=2)
    out = tmp_path / "entry"
    assert cli(["submission", str(run), "--out", str(out), "--app", str(ROOT), "--data", str(small_test_split),
                "--device", "cpu", "--no-progress", "--allow-rule-violations"]) == 0
    readme = (out / "README.md").read_text()
    assert "**Not eligible for the leaderboard**" in readme and "num_nodes=2" in readme
