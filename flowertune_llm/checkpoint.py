"""PEFT adapter folders written atomically, without loading a model."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from datetime import datetime
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord
from flwr.common.logger import log
from peft import LoraConfig
from safetensors.torch import save_file

from flowertune_llm.models import AdapterState, arrays_to_state

METADATA_FILE = "flowertune_state.json"


def checkpoint_rounds(num_rounds: int, every: int) -> list[int]:
    """The rounds after which the global adapter is saved: every N rounds and the last."""
    rounds = list(range(every, num_rounds + 1, every))
    if not rounds or rounds[-1] != num_rounds:
        rounds.append(num_rounds)
    return rounds


def new_run_dir(output_dir: str | Path) -> Path:
    """`<output_dir>/<timestamp>` (not created yet: nothing is written before a checkpoint)."""
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    path = Path(output_dir).expanduser().resolve() / stamp
    suffix = 1
    while path.exists():
        path = path.with_name(f"{stamp}_{suffix}")
        suffix += 1
    return path


def save_adapter(
    folder: Path, state: AdapterState, peft_config: LoraConfig, metadata: dict[str, Any]
) -> Path:
    """Write a standard PEFT folder (+ our metadata JSON) via a temp folder and one rename."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        peft_config.save_pretrained(str(tmp))
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "adapter_model.safetensors"))
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


class Checkpointer:
    """Strategy `evaluate_fn`: saves the global adapter after the scheduled rounds."""

    def __init__(
        self,
        run_dir: Path,
        peft_config: LoraConfig,
        rounds: list[int],
        metadata: Callable[[int], dict[str, Any]],
    ) -> None:
        self.run_dir = Path(run_dir)
        self.peft_config = peft_config
        self.rounds = set(rounds)
        self.metadata = metadata
        self.saved: list[Path] = []

    def __call__(self, server_round: int, arrays: ArrayRecord) -> None:
        """Save `peft_<round>` when the round is due; never evaluates (returns no metrics)."""
        if server_round in self.rounds:
            folder = self.run_dir / f"peft_{server_round}"
            save_adapter(folder, arrays_to_state(arrays), self.peft_config, self.metadata(server_round))
            self.saved.append(folder)
            log(INFO, "Saved global adapter of round %d to %s", server_round, folder)
