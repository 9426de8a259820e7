"""Checkpoint cadence, atomic PEFT folders, and loading them with PeftModel."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from flowertune_llm.checkpoint import Checkpointer, checkpoint_rounds, save_adapter
from flowertune_llm.config import parse_config
from flowertune_llm.models import adapter_state, initial_adapter, state_to_arrays
from flowertune_llm.rundir import METADATA_FILE, new_run_dir
from tests.helpers import tiny_run_config


@pytest.mark.parametrize(
    ("rounds", "every", "expected"),
    [
        (100, 5, list(range(5, 101, 5))),
        (12, 5, [5, 10, 12]),
        (3, 5, [3]),
        (2, 1, [1, 2]),
    ],
)
def test_checkpoint_cadence_is_every_n_rounds_and_the_last(
    rounds: int, every: int, expected: list[int]
) -> None:
    assert checkpoint_rounds(rounds, every) == expected


def test_initial_adapter_is_deterministic_and_saved_folder_loads(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    cfg = parse_config(tiny_run_config(tiny_llama_dir))
    state, peft_config = initial_adapter(cfg.model, seed=7)
    again, _ = initial_adapter(cfg.model, seed=7)
    assert all(torch.equal(state[k], again[k]) for k in state)
    assert all(v.dtype == torch.float32 for v in state.values())
    assert any("lora_magnitude_vector" in k for k in state)  # DoRA by default

    saved = Checkpointer(tmp_path / "run", peft_config, [2], metadata=lambda r: {"round": r})
    changed = {k: v + 0.5 for k, v in state.items()}
    saved(1, state_to_arrays(changed))
    assert not (tmp_path / "run").exists()  # nothing written before a due round
    saved(2, state_to_arrays(changed))
    folder = tmp_path / "run" / "peft_2"
    assert (folder / "adapter_config.json").is_file()
    assert (folder / "adapter_model.safetensors").is_file()
    assert (folder / METADATA_FILE).is_file()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["peft_2"]

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    loaded = PeftModel.from_pretrained(base, str(folder))
    assert loaded.peft_config["default"].base_model_name_or_path == str(tiny_llama_dir)
    got = adapter_state(loaded)
    assert all(torch.allclose(got[k], changed[k]) for k in changed)


def test_failed_write_leaves_no_partial_folder(tmp_path: Path, tiny_llama_dir: Path) -> None:
    cfg = parse_config(tiny_run_config(tiny_llama_dir))
    state, peft_config = initial_adapter(cfg.model, seed=0)
    broken = {**state, "not-a-tensor": 1.0}  # fails after the config file is written
    with pytest.raises(AttributeError):
        save_adapter(tmp_path / "peft_5", broken, peft_config, metadata={})
    assert list(tmp_path.iterdir()) == []


def test_run_dirs_are_unique_and_not_created_early(tmp_path: Path) -> None:
    first = new_run_dir(tmp_path)
    assert not first.exists()
    first.mkdir()
    assert new_run_dir(tmp_path) != first
