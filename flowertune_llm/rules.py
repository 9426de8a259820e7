"""The FlowerTune LLM leaderboard's rules (General NLP track), each with where it comes from, defined once.

Preflight logs a run's violations as warnings, `flowertune-llm submission` refuses on them and
`flowertune-llm runs` shows them. Light on purpose (no torch, no flwr).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flowertune_llm.evaluate.protocol import FULL_TEST_COUNTS, LEADERBOARD_CATEGORIES
from flowertune_llm.gguf import imported_source

#: The static dataset: `[tool.flwr.app.config.static] dataset.name` of Flower's general-nlp template
#: and the leaderboard README since flwr PR #5205 (2025-04-08).
DATASET = "flwrlabs/alpaca-gpt4"
#: The same 52,002 rows under the id the rule named before 2025-04-08 (the 2025 SmolLM2 entries used it).
DATASET_BEFORE_2025_04_08 = "vicgalle/alpaca-gpt4"
#: Rows of the static dataset (both hub copies).
DATASET_ROWS = 52_002
#: SuperNodes of the federation (the template's `options.num-supernodes`).
NUM_SUPERNODES = 20
#: The leaderboard's MB is 1024**2 bytes (a MiB); every MB figure of this app, communication and memory, is in it.
MIB = 1024**2
#: The communication budget of a whole run (the leaderboard README), in MB of 1024**2 bytes, the
#: leaderboard's own unit: its SmolLM2-135M reference entry reports 747.07 MB for 100 rounds.
COMM_BUDGET_MB = 200_000.0
#: The evaluation: Flower's general-nlp `eval.py`, unmodified: the base model in 4-bit, the full
#: MMLU test split of these categories (these question counts), one greedy token per question.
EVAL_QUANTIZATION = 4
EVAL_SPLIT = "test"
EVAL_CATEGORIES = LEADERBOARD_CATEGORIES
EVAL_COUNTS = {c: FULL_TEST_COUNTS[c] for c in LEADERBOARD_CATEGORIES}
#: `evaluate.data.question_set_sha256` of those questions (MMLU's test split, the three categories' 10,935, as
#: cais/mmlu and Hendrycks' files have them; tests/test_rules.py recomputes it from the offline copy). Counts alone
#: are not the questions: a file of the right counts with one answer changed hashes otherwise.
TEST_QUESTIONS_SHA256 = "aca0cd70cfed42a601e9172b13db353793bbdbbc72286936b2ea3cda01ca7dd4"
#: The `batching` of a results.json whose answers are the official (one-prompt-at-a-time) ones.
BATCHING_EXACT, BATCHING_SOLO, BATCHING_INEXACT = "exact", "one-at-a-time", "inexact"
EXACT_BATCHING = (BATCHING_EXACT, BATCHING_SOLO)


def is_local_model(name: str) -> bool:
    """True for a local folder or file (a GGUF or its import), False for a hub id."""
    return name.startswith(("/", ".", "~")) or name.lower().endswith(".gguf") or Path(name).expanduser().exists()


def dataset_violation(dataset: str) -> str | None:
    """Why training on `dataset` does not qualify (None when it does)."""
    if dataset == DATASET:
        return None
    if dataset == DATASET_BEFORE_2025_04_08:
        return (f"static.dataset.name={dataset!r}: the rule before 2025-04-08 (the same rows); the leaderboard's "
                f"static dataset is now {DATASET!r}")
    return f"static.dataset.name={dataset!r}: the leaderboard trains on {DATASET!r}"


def run_violations(
    dataset: str, base_model: str, num_nodes: int | None = None, comm_mb: float | None = None
) -> list[str]:
    """One line per rule a training run breaks, naming key and value (num_nodes/comm_mb None: not known yet)."""
    lines = [v for v in [dataset_violation(dataset)] if v]
    if is_local_model(base_model):
        gguf = base_model.lower().endswith(".gguf") or imported_source(base_model) is not None
        kind = "a GGUF import (close to, not bit-equal with, the hub weights)" if gguf else "a local model"
        lines.append(f"model.name={base_model!r}: {kind}; the leaderboard loads the base model from the hub by its id")
    if num_nodes is not None and num_nodes != NUM_SUPERNODES:
        lines.append(f"num_nodes={num_nodes}: the run's federation had {num_nodes} SuperNodes; "
                     f"the leaderboard needs exactly {NUM_SUPERNODES}")
    if comm_mb is not None and comm_mb > COMM_BUDGET_MB:
        lines.append(f"communication={comm_mb:,.2f} MiB: over the leaderboard's budget of {COMM_BUDGET_MB:,.0f} MB (MiB)")
    return lines


def evaluation_violations(summary: Mapping[str, Any]) -> list[str]:
    """One line per rule a `flowertune-eval` results.json breaks: 4-bit, full test split, official counts, exact."""
    lines = []
    if summary.get("quantization") != EVAL_QUANTIZATION:
        lines.append(f"quantization={summary.get('quantization')!r}: the leaderboard evaluates in "
                     f"{EVAL_QUANTIZATION}-bit")
    if summary.get("split") != EVAL_SPLIT:
        lines.append(f"split={summary.get('split')!r}: the leaderboard scores MMLU's {EVAL_SPLIT} split")
    if summary.get("limit") is not None:
        lines.append(f"limit={summary.get('limit')!r}: the leaderboard scores every question")
    if summary.get("questions_sha256") != TEST_QUESTIONS_SHA256:
        lines.append(f"questions_sha256={summary.get('questions_sha256')!r}: not the questions of MMLU's {EVAL_SPLIT} "
                     f"split (the leaderboard's are {TEST_QUESTIONS_SHA256[:16]}...)")
    categories = summary.get("categories") or {}
    for category, count in EVAL_COUNTS.items():
        got = (categories.get(category) or {}).get("total")
        if got != count:
            lines.append(f"categories.{category}.total={got!r}: the full test split has {count} questions")
    if summary.get("batching") not in EXACT_BATCHING:
        lines.append(f"batching={summary.get('batching')!r}: the answers must be the one-at-a-time ones (batches "
                     "checked to give them, or one prompt at a time)")
    return lines
