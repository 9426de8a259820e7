"""The ServerApp's in-training evaluation: the official protocol on MMLU's validation split."""

from __future__ import annotations

import time
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.common.logger import log
from peft import LoraConfig

from flowertune_llm.config import Config, ConfigError, EvalSettings
from flowertune_llm.evaluate.api import AdapterScorer
from flowertune_llm.evaluate.data import EvalDataError, Question, by_category, load_questions, stratified_sample
from flowertune_llm.evaluate.protocol import LEADERBOARD_CATEGORIES
from flowertune_llm.models import AdapterState

KEY = "eval.data"
#: Fixed, so that every run (whatever its train.seed) and every round scores the same questions.
SAMPLE_SEED = 0


def validation_questions(settings: EvalSettings) -> dict[str, list[Question]]:
    """The run's fixed, stratified validation questions; a bad `eval.data` is a ConfigError naming it."""
    path = Path(settings.data).expanduser()
    if path.exists() and "test" in path.name.lower():
        log(WARNING, "%s=%r looks like the MMLU test split, which the leaderboard scores on: "
            "evaluating on it during training leaks the test set into your choices; use the validation split",
            KEY, settings.data)
    try:
        questions = by_category(load_questions(settings.data, "validation", KEY), list(LEADERBOARD_CATEGORIES))
    except EvalDataError as exc:
        message = str(exc)
        raise ConfigError(message if message.startswith(KEY) else f"{KEY}={settings.data!r}: {message}") from exc
    return stratified_sample(questions, settings.questions, SAMPLE_SEED)


class Validator:
    """Scores the global adapter of a round; the base model is loaded once, at the first call."""

    def __init__(self, cfg: Config, peft_config: LoraConfig, questions: dict[str, list[Question]]) -> None:
        self.settings = cfg.eval
        self.questions = questions
        # The protocol loads the base model in 4-bit whatever the training used.
        self.scorer = AdapterScorer(cfg.model.name, peft_config, quantization=4)

    def __call__(self, state: AdapterState) -> dict[str, Any]:
        """The round's metrics: protocol accuracy per category and average, plus the diagnostics."""
        start = time.perf_counter()
        result = self.scorer.score(
            state, self.questions, self.settings.batch_size, self.settings.allow_inexact_batching
        )
        diagnostics = {name: c.diagnostics() for name, c in result.categories.items()}
        prior = result.letter_prior() or {}
        metrics: dict[str, Any] = {
            f"val_mmlu_{name}": cat.accuracy for name, cat in result.categories.items()
        }
        metrics.update(
            val_mmlu_avg=result.average,
            val_valid_letter_rate=result.valid_letter_rate,
            val_letter_ceiling=result.letter_ceiling,
            val_questions=sum(c.total for c in result.categories.values()),
            # the letter prior, over the three categories (diagnostic): mean predicted shares, the largest, mean P(A..D)
            val_predicted_letters=prior.get("predicted_letters"),
            val_largest_letter_share=prior.get("largest_letter_share"),
            val_letter_probability=prior.get("letter_probability"),
            val_by_category={  # per category: valid letters, ceiling, predicted and gold letter shares, letter prior
                name: {k: d[k] for k in ("valid_letter_rate", "letter_ceiling", "predicted_letters", "gold_letters",
                                         "largest_letter_share", "letter_probability")}
                for name, d in diagnostics.items()
            },
            val_batching=result.batching.mode if result.batching else "",
            val_eval_s=round(time.perf_counter() - start, 3),
        )
        return metrics
