"""`flowertune-llm submission`: rules from the run folder, the evaluation (or its reuse by content), the entry written whole."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from flowertune_llm.cli import main as cli
from tests.helpers import MMLU_DIR, ROOT, make_run


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
        "model.name", "questions_sha256", "categories.stem.total", "categories.social_sciences.total",
        "categories.humanities.total"]
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
    summary["questions_sha256"] = rules.TEST_QUESTIONS_SHA256  # as if it had scored the official questions
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
    as_scored = json.loads((scored / "results.json").read_text())["questions_sha256"]  # the small split's own
    assert f"questions_sha256='{as_scored}'" in refused(
        full_split_evaluation(scored, tmp_path / "other", questions_sha256=as_scored))  # right counts, other questions
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
