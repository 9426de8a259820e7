"""Prompt format, loss mask, data sources and IID partitioning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flowertune_llm.config import ConfigError, parse_config
from flowertune_llm.dataset import federated_dataset, load_partition, resolve_source, validate_dataset
from flowertune_llm.prompts import PROMPT_PREAMBLE, PROMPT_TEMPLATES, build_prompt, qa_prompt, to_prompt_completion
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


@pytest.mark.parametrize("template", PROMPT_TEMPLATES)
def test_loss_mask_counts_response_and_end_token_only(template: str, tiny_llama_dir: Path, tmp_path: Path) -> None:
    from datasets import Dataset

    from flowertune_llm.models import adapter_state, build_peft_model
    from flowertune_llm.train import make_trainer

    cfg = parse_config(tiny_run_config(tiny_llama_dir, **{"train.prompt-template": template}))
    row = to_prompt_completion({"instruction": "Say hi.", "input": "To Bob.", "output": "Hi there!"}, template)
    state = adapter_state(build_peft_model(cfg.model, "cpu", 0))
    trainer = make_trainer(cfg, state, Dataset.from_list([row]), 1e-3, str(tmp_path))
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    tok = trainer.processing_class
    counted = tok.decode([t for t, lab in zip(ids, labels) if lab != -100])
    masked = tok.decode([t for t, lab in zip(ids, labels) if lab == -100])
    if template == "alpaca":
        assert masked == f"{PROMPT_PREAMBLE}\n\n### Instruction:\nSay hi.\n\n### Input:\nTo Bob.\n\n### Response:\n"
        assert counted == "Hi there!<|im_end|>"
    elif template == "qa":  # the evaluation's own wrapper, as the protocol asks its questions
        assert masked == qa_prompt("Say hi.\n\nTo Bob.\n")
        assert masked == "<|im_start|>question\nSay hi.\n\nTo Bob.\n<|im_end|>\n<|im_start|>answer\n"
        assert counted == "Hi there!<|im_end|>"
    else:  # the model's chat template: the user turn (and default system turn) masked
        user = [{"role": "user", "content": "Say hi.\n\nTo Bob."}]
        assert masked == tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        assert masked.endswith("<|im_start|>user\nSay hi.\n\nTo Bob.<|im_end|>\n<|im_start|>assistant\n")
        assert counted.startswith("Hi there!<|im_end|>")
        assert counted.removeprefix("Hi there!<|im_end|>").strip() == ""  # at most the template's newline


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
