"""An evaluation's results: per-category scores and diagnostics, and the official output files."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import flowertune_llm.ml_stack  # noqa: F401  (progress bars quiet, lazy names resolved)
from flowertune_llm.rundir import RESULTS_FILE
from flowertune_llm.evaluate.protocol import (
    ANSWER_LETTERS,
    LEADERBOARD_CATEGORIES,
)

if TYPE_CHECKING:
    from flowertune_llm.evaluate.batching import BatchingCheck

#: What results.json and the printout say about the answer diagnostics.
DIAGNOSTICS_NOTE = (
    "diagnostics, not leaderboard figures: valid_letter_rate = share of outputs that parse to a-d; "
    "letter_ceiling = accuracy of the argmax over the A/B/C/D logits at the answer position; "
    "largest_letter_share = share of the outputs that are the most frequent letter (the letter prior); "
    "letter_probability = mean P(A..D) among the four letters at the answer position"
)


def letter_figures(predicted: dict[str, float], probability: dict[str, float]) -> dict:
    """The letter prior's two figures from predicted-letter shares and mean letter probabilities."""
    return {"largest_letter_share": max(predicted[k] for k in ANSWER_LETTERS), "letter_probability": probability}


@dataclass
class CategoryResult:
    """Accuracy, answer diagnostics and generations of one category."""

    category: str
    correct: int
    total: int
    records: list[dict] = field(default_factory=list, repr=False)

    @property
    def accuracy(self) -> float:
        """correct / questions in the category."""
        return self.correct / self.total if self.total else 0.0

    def _share(self, hit) -> float:  # noqa: ANN001
        return sum(1 for r in self.records if hit(r)) / len(self.records) if self.records else 0.0

    @property
    def valid_letter_rate(self) -> float:
        """Share of outputs the protocol's parser turns into a, b, c or d (format, not knowledge)."""
        return self._share(lambda r: r["prediction"] in ANSWER_LETTERS)

    @property
    def letter_ceiling(self) -> float:
        """Accuracy if the model always answered with its most likely option letter."""
        return self._share(lambda r: r["letter_argmax"] == r["gold"])

    def diagnostics(self) -> dict:
        """Valid-letter rate, letter ceiling, predicted vs gold letters, the commonest outputs."""
        preds = Counter(r["prediction"] if r["prediction"] in ANSWER_LETTERS else "other" for r in self.records)
        gold = Counter(r["gold"].lower() for r in self.records)
        n = max(len(self.records), 1)
        predicted = {k: preds[k] / n for k in (*ANSWER_LETTERS, "other")}
        probability = {k: sum(r["letter_probs"][i] for r in self.records if "letter_probs" in r) / n
                       for i, k in enumerate(ANSWER_LETTERS)}
        return {
            "valid_letter_rate": self.valid_letter_rate,
            "letter_ceiling": self.letter_ceiling,
            "predicted_letters": predicted,
            "gold_letters": {k: gold[k] / n for k in ANSWER_LETTERS},
            **letter_figures(predicted, probability),
            "top_outputs": Counter(r["output"] for r in self.records).most_common(3),
        }


@dataclass
class EvalResult:
    """All categories of one evaluation, with timing and how batching was checked."""

    categories: dict[str, CategoryResult]
    wall_time_s: float
    batching: BatchingCheck | None = None

    def _mean(self, attr: str) -> float | None:
        if not all(c in self.categories for c in LEADERBOARD_CATEGORIES):
            return None
        return sum(getattr(self.categories[c], attr) for c in LEADERBOARD_CATEGORIES) / 3

    @property
    def average(self) -> float | None:
        """Leaderboard average: mean of STEM, social sciences, humanities (None if one is missing)."""
        return self._mean("accuracy")

    @property
    def valid_letter_rate(self) -> float | None:
        """Mean valid-letter rate of the three leaderboard categories (diagnostic)."""
        return self._mean("valid_letter_rate")

    @property
    def letter_ceiling(self) -> float | None:
        """Mean letter ceiling of the three leaderboard categories (diagnostic)."""
        return self._mean("letter_ceiling")

    def letter_prior(self) -> dict | None:
        """Over the three leaderboard categories: mean predicted-letter shares and letter probabilities, and the
        largest share (None if a category is missing)."""
        if not all(c in self.categories for c in LEADERBOARD_CATEGORIES):
            return None
        diags = [self.categories[c].diagnostics() for c in LEADERBOARD_CATEGORIES]
        predicted = {k: sum(d["predicted_letters"][k] for d in diags) / 3 for k in (*ANSWER_LETTERS, "other")}
        probability = {k: sum(d["letter_probability"][k] for d in diags) / 3 for k in ANSWER_LETTERS}
        return {"predicted_letters": predicted, **letter_figures(predicted, probability)}

    def summary(self) -> dict:
        """Machine-readable figures (no generations)."""
        total = sum(c.total for c in self.categories.values())
        return {
            "categories": {
                name: {"accuracy": c.accuracy, "correct": c.correct, "total": c.total}
                for name, c in self.categories.items()
            },
            "average": self.average,
            "diagnostics": {
                "note": DIAGNOSTICS_NOTE,
                "average": {"valid_letter_rate": self.valid_letter_rate, "letter_ceiling": self.letter_ceiling,
                            **(self.letter_prior() or {})},
                "categories": {name: c.diagnostics() for name, c in self.categories.items()},
            },
            "batching": self.batching.mode if self.batching else None,
            "batching_check": self.batching.to_dict() if self.batching else None,
            "questions": total,
            "wall_time_s": round(self.wall_time_s, 3),
            "questions_per_s": round(total / self.wall_time_s, 3) if self.wall_time_s else None,
        }

    def report(self) -> str:
        """The human-readable summary: official scores, then the diagnostics, labelled as such."""
        lines = [f"{'category':<16} {'accuracy':>8}   | {'letters':>7} {'ceiling':>7} {'largest':>7}  "
                 "predicted a/b/c/d/other (gold a/b/c/d)  mean P(a/b/c/d)"]
        for name, c in self.categories.items():
            diag = c.diagnostics()
            pred = "/".join(f"{100 * v:.0f}" for v in diag["predicted_letters"].values())
            gold = "/".join(f"{100 * v:.0f}" for v in diag["gold_letters"].values())
            prob = "/".join(f"{100 * v:.0f}" for v in diag["letter_probability"].values())
            lines.append(f"{name:<16} {100 * c.accuracy:>8.2f}   | {100 * c.valid_letter_rate:>6.1f}% "
                         f"{100 * c.letter_ceiling:>7.2f} {100 * diag['largest_letter_share']:>6.1f}%  {pred} ({gold})  {prob}")
        prior = self.letter_prior()
        if self.average is not None and prior is not None:
            pred = "/".join(f"{100 * v:.0f}" for v in prior["predicted_letters"].values())
            prob = "/".join(f"{100 * v:.0f}" for v in prior["letter_probability"].values())
            lines.append(
                f"{'average':<16} {100 * self.average:>8.2f}   | {100 * self.valid_letter_rate:>6.1f}% "
                f"{100 * self.letter_ceiling:>7.2f} {100 * prior['largest_letter_share']:>6.1f}%  {pred}  {prob}"
            )
        lines.append(f"accuracy = the leaderboard's figure; right of '|': {DIAGNOSTICS_NOTE}")
        if self.batching is not None:
            b = self.batching
            probe = f", probe: {b.differing} of {b.probe_prompts} prompts differ" if b.probe_prompts else ""
            lines.append(f"batching: {b.mode} (batch size {b.batch_size}{probe})")
        return "\n".join(lines)


def write_outputs(result: EvalResult, run_name: str, output_dir: Path, extra: dict) -> Path:
    """The leaderboard's acc/generation files per category, plus results.json."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for name, cat in result.categories.items():
        (output_dir / f"acc_mmlu_{name}_{run_name}.txt").write_text(f"Accuracy: {cat.accuracy}. ")
        # as the official save_results writes it (pandas' to_json, orient="records"): one JSON array
        (output_dir / f"generation_mmlu_{name}_{run_name}.jsonl").write_text(json.dumps(cat.records))
    summary = {"run_name": run_name, **extra, **result.summary()}
    path = output_dir / RESULTS_FILE
    path.write_text(json.dumps(summary, indent=2))
    return path
