"""Checks that run before any model is loaded, so bad input fails in seconds with the key named."""

from __future__ import annotations

from dataclasses import dataclass
from logging import INFO, WARNING

from flwr.common.logger import log

from flowertune_llm import rules
from flowertune_llm.config import Config, ConfigError
from flowertune_llm.dataset import validate_dataset
from flowertune_llm.evaluate.data import Question
from flowertune_llm.evaluate.validation import validation_questions
from flowertune_llm.tracking import check_backends
from flowertune_llm.models import check_model_source


def leaderboard_warnings(cfg: Config) -> list[str]:
    """Reasons this run's configuration does not qualify for the FlowerTune leaderboard (rules.py)."""
    return rules.run_violations(cfg.dataset_name, cfg.model.name)


def federation_warning(num_nodes: int) -> str | None:
    """Why a federation of `num_nodes` does not qualify, and the exact commands that fix it."""
    if num_nodes == rules.NUM_SUPERNODES:
        return None
    return (
        f"This run does NOT qualify for the FlowerTune leaderboard: the federation has {num_nodes} "
        f"SuperNodes, the leaderboard requires {rules.NUM_SUPERNODES}. Fix: stop this run "
        f"(`flwr stop <run-id>`), run `flowertune-llm federation` once, then `flwr run .` again; or add "
        f'`--federation-config "num-supernodes={rules.NUM_SUPERNODES}"` to `flwr run`; on the '
        f"Deployment Engine, register and start {rules.NUM_SUPERNODES} SuperNodes (docs/deployment.md)"
    )


def check_chat_template(cfg: Config) -> None:
    """Refuse `train.prompt-template = "chat"` for a tokenizer that has no chat template."""
    if cfg.train.prompt_template != "chat":
        return
    from flowertune_llm.train import load_tokenizer

    if not getattr(load_tokenizer(cfg.model.name), "chat_template", None):
        raise ConfigError(
            f"train.prompt-template='chat': the tokenizer of model.name={cfg.model.name!r} has no chat "
            "template; use 'alpaca' or 'qa'"
        )


@dataclass(frozen=True)
class Preflight:
    """What the checks found that the run goes on with."""

    questions: dict[str, list[Question]] | None  # the in-training evaluation's (None when eval.every-round is 0)
    dataset_rows: int  # rows of the training dataset (the denominator of the run's coverage)


def preflight(cfg: Config) -> Preflight:
    """Validate data, model and eval sources, log leaderboard eligibility; raise ConfigError."""
    from flowertune_llm.train import check_training_arguments

    check_training_arguments(cfg)  # first: milliseconds, and TRL's reason beats a failure in every ClientApp
    check_backends(cfg)
    questions = validation_questions(cfg.eval) if cfg.eval.enabled else None
    rows = validate_dataset(cfg.dataset_name)
    check_model_source(cfg.model.name)
    check_chat_template(cfg)
    log(INFO, "Dataset %s: %d rows; model %s", cfg.dataset_name, rows, cfg.model.name)
    if questions is not None:
        log(INFO, "In-training evaluation: %d MMLU validation questions from %s every %d rounds",
            sum(len(q) for q in questions.values()), cfg.eval.data, cfg.eval.every_round)
    for reason in leaderboard_warnings(cfg):
        log(WARNING, "This run does NOT qualify for the FlowerTune leaderboard: %s", reason)
    return Preflight(questions, rows)
