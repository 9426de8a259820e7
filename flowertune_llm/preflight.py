"""Checks that run before any model is loaded, so bad input fails in seconds with the key named."""

from __future__ import annotations

from logging import INFO, WARNING

from flwr.common.logger import log

from flowertune_llm.config import LEADERBOARD_DATASETS, LEADERBOARD_NUM_SUPERNODES, Config
from flowertune_llm.dataset import validate_dataset
from flowertune_llm.metrics import check_tensorboard
from flowertune_llm.models import check_model_source


def leaderboard_warnings(cfg: Config, num_nodes: int) -> list[str]:
    """Reasons this run does not qualify for the FlowerTune leaderboard (empty if it does)."""
    reasons = []
    if not cfg.is_leaderboard_dataset:
        reasons.append(
            f"static.dataset.name={cfg.dataset_name!r} is not {LEADERBOARD_DATASETS[0]!r}"
        )
    if num_nodes != LEADERBOARD_NUM_SUPERNODES:
        reasons.append(
            f"the federation has {num_nodes} SuperNodes, the leaderboard requires "
            f"{LEADERBOARD_NUM_SUPERNODES}"
        )
    return reasons


def preflight(cfg: Config, num_nodes: int) -> None:
    """Validate dataset and model sources and log leaderboard eligibility; raise ConfigError."""
    check_tensorboard(cfg)
    rows = validate_dataset(cfg.dataset_name)
    check_model_source(cfg.model.name)
    log(INFO, "Dataset %s: %d rows; model %s", cfg.dataset_name, rows, cfg.model.name)
    for reason in leaderboard_warnings(cfg, num_nodes):
        log(WARNING, "This run does NOT qualify for the FlowerTune leaderboard: %s", reason)
