"""`flowertune-eval` / `python -m flowertune_llm.evaluate`: the official MMLU flags, plus more."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from flowertune_llm.config import ConfigError
from flowertune_llm.evaluate.data import DEFAULT_DATA, EvalDataError
from flowertune_llm.evaluate.protocol import LEADERBOARD_CATEGORIES
from flowertune_llm.gguf import GgufError
from flowertune_llm.rundir import RESULTS_FILE


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The evaluation flags (shared by the console script and `flowertune-llm evaluate`)."""
    parser.add_argument("--base-model-name-path", default="HuggingFaceTB/SmolLM2-135M-Instruct",
                        help="hub id, local HF folder, or .gguf file")
    parser.add_argument("--peft-path", default=None, help="PEFT adapter folder (e.g. results/<run>/peft_100)")
    parser.add_argument("--run-name", default="fl", help="suffix of the output files")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--quantization", type=int, default=4, choices=(4, 8, 0),
                        help="4 (leaderboard), 8, or 0 for full precision")
    parser.add_argument("--category", default=",".join(LEADERBOARD_CATEGORIES),
                        help="comma list of stem, social_sciences, humanities, other")
    parser.add_argument("--data", default=DEFAULT_DATA,
                        help="hub dataset id, or a local MMLU folder/file (Hendrycks CSV or jsonl)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument("--limit", type=int, default=None, help="first N questions per category")
    parser.add_argument("--output-dir", default="benchmarks", help="where result files go")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--allow-inexact-batching", action="store_true",
                        help="keep batches even when the on-device check finds that they change answers")
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record comes (not the one at creation)."""

    @property
    def stream(self):  # noqa: ANN201, D102
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001
        pass


def log_warnings_as_lines() -> None:
    """Print the evaluation's warnings (e.g. the batching check's) as one 'warning: ...' line each."""
    logger = logging.getLogger("flowertune_llm")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("warning: %(message)s"))
        handler.setLevel(logging.WARNING)
        logger.addHandler(handler)


def run(args: argparse.Namespace) -> int:
    """Run the evaluation from parsed flags; print the scores; 2 on bad input."""
    from flowertune_llm.evaluate.api import evaluate_mmlu  # the ML stack: only once there is something to run
    from flowertune_llm.evaluate.model import EvalModelError

    log_warnings_as_lines()
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        print("error: --batch-size and --limit must be >= 1", file=sys.stderr)
        return 2
    try:
        result = evaluate_mmlu(
            base_model=args.base_model_name_path,
            peft_path=args.peft_path,
            categories=[c.strip() for c in args.category.split(",") if c.strip()],
            data=args.data,
            quantization=args.quantization,
            batch_size=args.batch_size,
            device=args.device,
            limit=args.limit,
            output_dir=Path(args.output_dir),
            run_name=args.run_name,
            show_progress=not args.no_progress,
            allow_inexact_batching=args.allow_inexact_batching,
        )
    except (ConfigError, EvalDataError, EvalModelError, GgufError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.report())
    print(f"results: {Path(args.output_dir) / RESULTS_FILE}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point."""
    parser = add_arguments(argparse.ArgumentParser(prog="flowertune-eval", description=__doc__))
    return run(parser.parse_args(argv))
