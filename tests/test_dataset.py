"""Prompt format, loss mask, data sources and IID partitioning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flowertune_llm.config import ConfigError, parse_config
from flowertune_llm.dataset import (
    PROMPT_PREAMBLE,
    build_prompt,
    federated_dataset,
    load_partition,
    resolve_source,
    to_prompt_completion,
    validate_dataset,
)
from tests.conftest import ALPACA_SUBSET, tiny_run_config


def test_prompt_without_input_is_the_alpaca_template() -> None:
    assert build_prompt("Name a color.") == (
        f"{PROMPT_PREAMBLE}\n\n### Instruction:\nName a color.\n\n### Response:\n"
    )


def test_prompt_keeps_non_empty_input() -> None:
    row = {"instruction": "Translate.", "input": "Bonjour", "output": " Hello "}
    pc = to_prompt_completion(row)
    assert "### Input:\nBonjour\n\n### Response:\n" in pc["prompt"]
    assert pc["completion"] == "Hello"
    assert "### Input" not in to_prompt_completion({**row, "input": "  "})["prompt"]


def test_loss_mask_counts_response_and_eos_only(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from flowertune_llm.models import adapter_state, build_peft_model
    from flowertune_llm.train import make_trainer

    cfg = parse_config(tiny_run_config(tiny_llama_dir))
    row = to_prompt_completion({"instruction": "Say hi.", "input": "", "output": "Hi there!"})
    from datasets import Dataset

    state = adapter_state(build_peft_model(cfg.model, "cpu", 0))
    trainer = make_trainer(cfg, state, Dataset.from_list([row]), 1e-3, str(tmp_path))
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    tok = trainer.processing_class
    counted = [t for t, lab in zip(ids, labels) if lab != -100]
    masked = [t for t, lab in zip(ids, labels) if lab == -100]
    assert counted[-1] == tok.eos_token_id
    assert tok.decode(counted[:-1]) == "Hi there!"
    assert tok.decode(masked) == row["prompt"]


def test_partitions_are_20_disjoint_iid_shares_of_the_whole_set() -> None:
    name = str(ALPACA_SUBSET)
    parts = [federated_dataset(name, 20, 42).load_partition(i, "train") for i in range(20)]
    sizes = [len(p) for p in parts]
    assert sum(sizes) == 985 and max(sizes) - min(sizes) <= 1
    keys = [(r["instruction"], r["input"], r["output"]) for p in parts for r in p]
    assert len(set(keys)) == len(keys)  # disjoint (rows of the sample are unique)
    first = load_partition(name, 3, 20, 42)
    assert load_partition(name, 3, 20, 42) is first  # cached per process
    assert first.column_names == ["prompt", "completion"] and len(first) == sizes[3]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv", "folder"])
def test_local_formats_load_with_the_same_code_path(fmt: str, tmp_path: Path) -> None:
    from datasets import load_dataset

    rows = load_dataset("json", data_files=str(ALPACA_SUBSET), split="train").select(range(40))
    if fmt == "jsonl":
        path = tmp_path / "a.jsonl"
        rows.to_json(str(path))
    elif fmt == "parquet":
        path = tmp_path / "a.parquet"
        rows.to_parquet(str(path))
    elif fmt == "csv":
        path = tmp_path / "a.csv"
        rows.to_csv(str(path), index=False)
    else:
        path = tmp_path / "folder"
        path.mkdir()
        rows.to_json(str(path / "train.jsonl"))
    assert validate_dataset(str(path)) == 40
    assert len(load_partition(str(path), 0, 20, 42)) == 2


def test_missing_local_path_is_named() -> None:
    with pytest.raises(ConfigError, match=r"static.dataset.name='./nope.jsonl'.*does not exist"):
        resolve_source("./nope.jsonl")


def test_missing_column_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"instruction": "x", "response": "y"}) + "\n")
    with pytest.raises(ConfigError, match=r"missing required column\(s\) \['input', 'output'\]"):
        validate_dataset(str(path))


def test_hub_id_is_not_mistaken_for_a_path() -> None:
    assert resolve_source("vicgalle/alpaca-gpt4").load_kwargs() == {"dataset": "vicgalle/alpaca-gpt4"}
