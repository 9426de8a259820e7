"""`flowertune-llm submission`: a finished run -> the folder a FlowerTune LLM leaderboard entry publishes.

Checks the run against the leaderboard's rules first (rules.py: the static dataset, the hub base
model, exactly 20 SuperNodes, the communication budget; plus a complete run and its final
checkpoint), runs the official evaluation of the final checkpoint (the same `evaluate_mmlu` as
`flowertune-eval`) or reuses an earlier one of the same adapter on the same base, checks the
evaluation's rules, and writes the folder through a temporary sibling renamed into place: nothing
half-written if anything fails.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowertune_llm import rules
from flowertune_llm.config import run_config_arg
from flowertune_llm.evaluate.protocol import LEADERBOARD_CATEGORIES
from flowertune_llm.rundir import (
    CONFIG_FILE, METRICS_FILE, PLOT_FILE, RESULTS_FILE, TRACKING_FILE, checkpoint_name, write_folder,
)
from flowertune_llm.runs import BOOKKEEPING_KEYS, RunRecord, read_run

#: The entry's communication figure, as the leaderboard asks for it.
COMM_COST_FILE = "comm_cost.txt"

class SubmissionError(ValueError):
    """The run cannot become a submission; one line per reason."""


def app_config(app: Path) -> dict[str, Any]:
    """The app's flat [tool.flwr.app.config] (static keys as `static.<key>`), as flwr flattens it."""
    from flwr.common.config import flatten_dict, get_project_config

    if not (Path(app) / "pyproject.toml").is_file():
        raise SubmissionError(f"--app {app}: no pyproject.toml there (the app folder whose static section applies)")
    return flatten_dict(get_project_config(str(app))["tool"]["flwr"]["app"].get("config", {}))


def rule_violations(run: RunRecord) -> list[str]:
    """One line per leaderboard rule (rules.py) the run breaks, plus what an entry needs: a complete run, its final
    checkpoint. Read from the run folder alone: what the run trained on, not what an app folder says now."""
    lines = list(run.rule_violations)
    if any(segment.get("num_nodes") is None for segment in run.segments):
        lines.append("num_nodes: not recorded in config.json (a run from before node counts were recorded)")
    if run.status != "complete":
        lines.append(f"status={run.status!r}: the run must be complete to its last round "
                     f"(num-server-rounds={run.num_rounds})")
    if run.final_checkpoint is None:
        lines.append(f"{checkpoint_name(run.num_rounds)}: the final checkpoint is not in {run.path}")
    return lines


def reusable_evaluation(eval_dir: Path, peft: Path, base: str) -> dict[str, Any]:
    """An earlier `flowertune-eval` of this adapter (weights and config) on this base model (by content) that keeps
    the evaluation rules (rules.evaluation_violations); else an error naming each difference."""
    from flowertune_llm.evaluate.model import adapter_config_sha256, adapter_sha256
    from flowertune_llm.gguf import model_content_key

    path = Path(eval_dir) / RESULTS_FILE
    if not path.is_file():
        raise SubmissionError(f"--eval-results {eval_dir}: no {RESULTS_FILE} there")
    summary = json.loads(path.read_text())
    problems = []
    for key, expected in (("adapter_sha256", adapter_sha256(peft)), ("adapter_config_sha256", adapter_config_sha256(peft)),
                          ("base_model_sha256", model_content_key(base))):
        if summary.get(key) != expected:
            problems.append(f"{key}={summary.get(key)!r} is not that of {peft if 'adapter' in key else base} "
                            f"({expected})")
    problems += rules.evaluation_violations(summary)
    if problems:
        raise SubmissionError(f"--eval-results {eval_dir}: " + "; ".join(problems))
    return summary


@dataclass
class Evaluation:
    """The final checkpoint's scores and where they came from."""

    summary: dict[str, Any]
    source: str  # "ran now" or "reused <dir>"
    command: str


def _evaluate(run: RunRecord, peft: Path, out: Path, args: dict[str, Any]) -> Evaluation:
    from flowertune_llm.evaluate.api import evaluate_mmlu
    from flowertune_llm.evaluate.data import DEFAULT_DATA

    base, run_name = run.base_model, args["run_name"]
    command = (f"flowertune-eval --base-model-name-path {base} --peft-path {peft.name} --run-name {run_name} "
               f"--batch-size {args['batch_size']} --quantization 4"
               + (f" --data {args['data']}" if args["data"] != DEFAULT_DATA else ""))
    if args.get("eval_results"):
        source = Path(args["eval_results"])
        summary = reusable_evaluation(source, peft, base)
        out.mkdir(parents=True)
        for category in LEADERBOARD_CATEGORIES:
            for name in (f"acc_mmlu_{category}_{summary['run_name']}.txt",
                         f"generation_mmlu_{category}_{summary['run_name']}.jsonl"):
                if not (source / name).is_file():
                    raise SubmissionError(f"--eval-results {source}: {name} is missing")
                shutil.copy2(source / name, out / name)
        shutil.copy2(source / RESULTS_FILE, out / RESULTS_FILE)
        return Evaluation(summary, f"reused the evaluation in {source} (same adapter weights and config, same base "
                                   "weights)", command)
    evaluate_mmlu(base, str(peft), LEADERBOARD_CATEGORIES, args["data"], 4, args["batch_size"], args["device"],
                  None, out, run_name, show_progress=args.get("show_progress", True))
    return Evaluation(json.loads((out / RESULTS_FILE).read_text()), "ran now", command)


def training_command(run: RunRecord, defaults: dict[str, Any]) -> str:
    """The `flwr run` line that reproduces the run: every key that differs from the app's defaults."""
    rc = (run.config.get("run") or {}).get("run_config") or {}
    changed = {k: v for k, v in rc.items() if k not in BOOKKEEPING_KEYS and defaults.get(k) != v}
    nodes = run.num_nodes or rules.NUM_SUPERNODES
    line = f'flwr run . --stream --federation-config "num-supernodes={nodes}"'
    return line + (f' --run-config "{run_config_arg(changed)}"' if changed else "")


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.2f}"


def readme(run: RunRecord, ev: Evaluation, defaults: dict[str, Any], violations: list[str], peft_name: str) -> str:
    """The entry's README: results table in the seed's format, cost, memory, settings, commands, diagnostics."""
    s = ev.summary
    cats = s["categories"]
    rc = (run.config.get("run") or {}).get("run_config") or {}
    dataset = run.dataset
    questions = {c: cats[c]["total"] for c in LEADERBOARD_CATEGORIES}
    full = all(questions[c] == rules.EVAL_COUNTS[c] for c in LEADERBOARD_CATEGORIES)
    method = "DoRA" if rc.get("model.lora.use-dora") else "LoRA"
    lines = [f"# FlowerTune LLM, General NLP: {Path(run.base_model).name} + federated {method}", ""]
    if violations:
        lines += ["> **Not eligible for the leaderboard** (built with `--allow-rule-violations`):", ">"]
        lines += [f"> - {v}" for v in violations] + [""]
    if not full:
        lines += [f"> Evaluated on {sum(questions.values())} questions, not the full MMLU test split "
                  f"({sum(rules.EVAL_COUNTS.values())}): not a leaderboard figure.", ""]
    lines += [
        "## Method", "",
        f"{method} adapters (r={rc.get('model.lora.peft-lora-r')}, alpha={rc.get('model.lora.peft-lora-alpha')}, "
        f"dropout={rc.get('model.lora.peft-lora-dropout')}) on `{run.base_model}` loaded in "
        f"{rc.get('model.quantization')}-bit, trained with TRL's SFTTrainer on {run.num_nodes} Flower SuperNodes "
        f"(IID partitions of the dataset), strategy `{rc.get('strategy.name')}` with "
        f"{rc.get('strategy.fraction-train')} of the nodes per round, {run.num_rounds} rounds, prompt template "
        f"`{rc.get('train.prompt-template', 'alpaca')}`; built with flowertune-llm.", "",
        "## Results (MMLU test split, official protocol, 4-bit)", "",
        "| Model | Rounds | STEM | Social Sciences | Humanities | Average |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| {Path(run.base_model).name} + {peft_name} | {run.num_rounds} | {_pct(cats['stem']['accuracy'])} | "
        f"{_pct(cats['social_sciences']['accuracy'])} | {_pct(cats['humanities']['accuracy'])} | {_pct(s['average'])} |",
        "",
        f"Questions: STEM {questions['stem']}, social sciences {questions['social_sciences']}, humanities "
        f"{questions['humanities']}. Evaluation: {ev.source}; files in `evaluation/` "
        "(`acc_mmlu_<category>_<run>.txt`, `generation_mmlu_<category>_<run>.jsonl`).", "",
        f"**Communication cost:** {run.comm_total_mb or 0:.2f} MB (adapter payload sent and received over "
        f"{run.rounds_done} rounds, MB = 1024² bytes; `comm_cost.txt`).", "",
        "**Memory per client:** " + (f"{run.peak_mem_mb:,.0f} MiB peak (largest client, largest round; "
                                     "GPU: allocated; CPU: resident set)" if run.peak_mem_mb else "not recorded by this run"),
        "",
        "## Training settings", "",
        "| setting | value |", "| --- | --- |",
    ]
    for key in ("num-server-rounds", "model.name", "model.quantization", "model.lora.peft-lora-r",
                "model.lora.peft-lora-alpha", "model.lora.use-dora", "train.learning-rate-max", "train.learning-rate-min",
                "train.seq-length", "train.prompt-template", "train.training-arguments.per-device-train-batch-size",
                "train.training-arguments.max-steps", "strategy.name", "strategy.fraction-train", "comm.dtype"):
        if key in rc:
            lines.append(f"| `{key}` | {rc[key]} |")
    note = rules.dataset_violation(dataset) or "the leaderboard's static dataset"
    lines += [
        "", f"**Dataset:** `{dataset}` ({note}).", "",
        "## Commands", "", "Training:", "", "```bash", training_command(run, defaults), "```", "",
        "Evaluation:", "", "```bash", ev.command, "```", "",
        f"Evaluation hardware: {s.get('hardware', 'not recorded')}.", "",
        "## Diagnostics (not leaderboard figures)", "",
        "Valid letters = share of answers the protocol's parser reads as a-d; letter ceiling = accuracy of the "
        "most likely of the four option letters; largest letter = share of the answers that are the most frequent "
        "letter (the letter prior: the test split's gold letters are not balanced). They separate answer format "
        "and letter prior from knowledge.", "",
        "| category | valid letters % | letter ceiling % | largest letter % |", "| --- | --- | --- | --- |",
    ]
    diag = s.get("diagnostics", {}).get("categories", {})
    for c in LEADERBOARD_CATEGORIES:
        if c in diag:
            largest = diag[c].get("largest_letter_share")  # absent in an evaluation made before it was recorded
            lines.append(f"| {c} | {_pct(diag[c]['valid_letter_rate'])} | {_pct(diag[c]['letter_ceiling'])} "
                         f"| {_pct(largest) if largest is not None else '-'} |")
    lines += ["", "## Files", "", f"`{peft_name}/` (the final PEFT adapter: `PeftModel.from_pretrained(base, "
              f"\"{peft_name}\")`), `evaluation/`, `{RESULTS_FILE}`, `{COMM_COST_FILE}`, `config.json`, `metrics.jsonl`, "
              "`loss.png`; checksums in `SHA256SUMS` (`sha256sum -c SHA256SUMS`).", ""]
    return "\n".join(lines)


def _sha256sums(folder: Path) -> str:
    lines = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        lines.append(f"{digest}  {path.relative_to(folder).as_posix()}")
    return "\n".join(lines) + "\n"


def build_submission(
    run_dir: Path,
    out: Path,
    app: Path = Path("."),
    data: str = "cais/mmlu",
    batch_size: int = 16,
    device: str | None = None,
    eval_results: Path | None = None,
    allow_rule_violations: bool = False,
    run_name: str | None = None,
    show_progress: bool = True,
) -> tuple[Path, list[str], Evaluation]:
    """Check the rules, evaluate (or reuse), write `out` complete or not at all; (out, violations, evaluation)."""
    run = read_run(Path(run_dir))
    defaults = app_config(Path(app))  # for the training command only: the rules read the run folder
    violations = rule_violations(run)
    if violations and not allow_rule_violations:
        raise SubmissionError("\n".join(violations))
    peft = run.final_checkpoint
    if peft is None:  # even with --allow-rule-violations: nothing to publish
        raise SubmissionError(f"{run.path}: no complete checkpoint {checkpoint_name(run.num_rounds)} to publish")
    out = Path(out).expanduser().resolve()
    if out.exists() and any(out.iterdir()):
        raise SubmissionError(f"--out {out}: exists and is not empty")
    with write_folder(out) as tmp:
        shutil.copytree(peft, tmp / peft.name)
        args = {"data": data, "batch_size": batch_size, "device": device, "eval_results": eval_results,
                "run_name": run_name or run.name, "show_progress": show_progress}
        ev = _evaluate(run, peft, tmp / "evaluation", args)
        violations = violations + rules.evaluation_violations(ev.summary)
        if violations and not allow_rule_violations:  # this evaluation breaks a rule (a partial --data file, ...)
            raise SubmissionError("\n".join(violations))
        shutil.copy2(tmp / "evaluation" / RESULTS_FILE, tmp / RESULTS_FILE)
        comm = run.comm_total_mb or 0.0
        (tmp / COMM_COST_FILE).write_text(
            f"Communication cost: {comm:.2f} MB (adapter payload, sent + received, {run.rounds_done} rounds, "
            f"MB = 1024^2 bytes)\nWith key strings: {run.comm_total_with_keys_mb or 0.0:.2f} MB\n")
        for name in (CONFIG_FILE, METRICS_FILE, PLOT_FILE):
            if (run.path / name).is_file():
                shutil.copy2(run.path / name, tmp / name)
        (tmp / "README.md").write_text(readme(run, ev, defaults, violations, peft.name))
        (tmp / "SHA256SUMS").write_text(_sha256sums(tmp))
        if out.exists():
            out.rmdir()  # empty, checked above: the finished folder takes its place
    track_entry(run, out, ev.summary)
    return out, violations, ev


def track_entry(run: RunRecord, out: Path, summary: dict[str, Any]) -> None:
    """The entry folder and its scores into the run's tracker runs (those its tracking.json names), if any."""
    from flowertune_llm.config import parse_config
    from flowertune_llm.tracking import log_entry

    if not (run.path / TRACKING_FILE).is_file() or not run.run_config:
        return
    scores = {k: v for k, v in summary.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    try:
        names = log_entry(run.path, parse_config(run.run_config), out, scores)
    except Exception as exc:  # noqa: BLE001  the entry is written: a tracker's failure must not undo that
        print(f"warning: the entry was not logged to the run's trackers: {type(exc).__name__}: {exc}")
        return
    print(f"logged the entry and its scores to the run's tracker runs: {', '.join(names)}")
