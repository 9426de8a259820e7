"""Prompt format, loss mask, data sources and IID partitioning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flowertune_llm.config import ConfigError, parse_config
from flowertune_llm.dataset import federated_dataset, load_partition, resolve_source, validate_dataset
from flowertune_llm.evaluate.protocol import qa_prompt
from flowertune_llm.prompts import PROMPT_PREAMBLE, PROMPT_TEMPLATES, alpaca_prompt, to_prompt_completion
from tests.helpers import ALPACA_SUBSET, tiny_run_config


def test_prompt_without_input_is_the_alpaca_template() -> None:
    assert alpaca_prompt("Name a color.") == (
        f"{PROMPT_PREAMBLE}\n\n### Instruction:\nName a color.\n\n### Response:\n"
    )


def test_prompt_keeps_non_empty_input() -> None:
    row = {"instruction": "Translate.", "input": "Bonjour", "output": " Hello "}
    pc = to_prompt_completion(row)
    assert "### Input:\nBonjour\n\n### Response:\n" in pc["prompt"]
    assert pc["completion"] == "Hello"
    assert "### Input" not in to_prompt_completion({**row, "input": "  "})["prompt"]


@pytest.mark.parametrize("template", [t for t in PROMPT_TEMPLATES if t != "mcq"])  # mcq: its own test below
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


# --- the mcq template -----------------------------------------------------------------------------


def _mcq_rows(tiny_llama_dir: Path, seq_length: int = 512, fraction: float = 1.0, partitions: int = 20):
    return load_partition(str(ALPACA_SUBSET), 0, partitions, 42, "mcq", fraction, str(tiny_llama_dir), seq_length)


def test_an_mcq_example_is_the_protocols_question_with_the_gold_letter_and_the_loss_on_letter_and_end_token(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    from flowertune_llm.evaluate.protocol import mcq_prompt
    from flowertune_llm.models import initial_adapter
    from flowertune_llm.prompts import one_line, user_text
    from flowertune_llm.train import make_trainer

    originals = federated_dataset(str(ALPACA_SUBSET), 20, 42).load_partition(0, "train").to_list()
    rows = _mcq_rows(tiny_llama_dir).to_list()
    assert len(rows) == len(originals)
    i, example = next((i, r) for i, r in enumerate(rows)  # a question whose options were not cut to fit
                      if r["completion"] in ("A", "B", "C", "D") and " ..." not in r["prompt"])
    gold = "ABCD".index(example["completion"])
    options = example["prompt"].split("\nOptions:\n", 1)[1].split("\nThe answer is:", 1)[0].split("\n")
    options = [o[3:] for o in options]  # "A. text"
    assert [o[:3] for o in example["prompt"].split("\nOptions:\n", 1)[1].split("\n")[:4]] == ["A. ", "B. ", "C. ", "D. "]
    assert options[gold] == one_line(originals[i]["output"])  # the row's own answer at the gold letter
    others = {one_line(o["output"]) for j, o in enumerate(originals) if j != i}
    assert all(o in others for k, o in enumerate(options) if k != gold)  # distractors: this partition's outputs
    question = user_text(originals[i]["instruction"], originals[i]["input"])
    assert example["prompt"] == mcq_prompt(question, options)  # the evaluation's own builder
    cfg = parse_config(tiny_run_config(tiny_llama_dir, **{"train.prompt-template": "mcq", "train.seq-length": 512}))
    start, _ = initial_adapter(cfg.model, cfg.train.seed)
    trainer = make_trainer(cfg, start, _mcq_rows(tiny_llama_dir).select([i]), 1e-3, str(tmp_path))
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    tok = trainer.processing_class
    counted = tok.decode([t for t, lab in zip(ids, labels) if lab != -100])
    assert counted == example["completion"] + "<|im_end|>"  # the loss: the letter and the end token only
    assert tok.decode([t for t, lab in zip(ids, labels) if lab == -100]) == example["prompt"]


def test_mcq_examples_are_the_same_from_two_calls_and_in_a_new_process(tiny_llama_dir: Path) -> None:
    """A resumed run rebuilds its partitions in a fresh process: the same examples in the same order."""
    from flowertune_llm.dataset import token_budget
    from flowertune_llm.prompts import mcq_examples
    from tests.helpers import partition_sha256_in_new_process, rows_sha256

    rows = federated_dataset(str(ALPACA_SUBSET), 20, 42).load_partition(3, "train").to_list()
    fits, shorten = token_budget(str(tiny_llama_dir), 256)
    first = mcq_examples(rows, 42, 3, 0.5, fits, shorten)
    assert mcq_examples(rows, 42, 3, 0.5, fits, shorten) == first
    assert 0 < sum(e["completion"] in ("A", "B", "C", "D") for e in first) < len(first)  # a mix of mcq and qa
    assert mcq_examples(rows, 43, 3, 0.5, fits, shorten) != first  # the seed matters
    fresh = partition_sha256_in_new_process(str(ALPACA_SUBSET), 3, 20, 42, "mcq", 0.5, str(tiny_llama_dir), 256)
    assert fresh == rows_sha256(first)


def test_gold_letters_are_uniform_within_sampling_noise(tiny_llama_dir: Path) -> None:
    from collections import Counter

    examples = _mcq_rows(tiny_llama_dir, partitions=1).to_list()  # all 985 rows, every one a question if it fits
    letters = Counter(e["completion"] for e in examples if e["completion"] in ("A", "B", "C", "D"))
    n = sum(letters.values())
    assert n > 900
    chi2 = sum((letters[k] - n / 4) ** 2 / (n / 4) for k in "ABCD")
    assert chi2 < 11.34, letters  # chi-square, 3 degrees of freedom, p = 0.01


def test_an_over_long_row_stays_in_qa_form_and_long_options_are_cut_not_the_question(tiny_llama_dir: Path) -> None:
    from flowertune_llm.dataset import token_budget
    from flowertune_llm.prompts import mcq_examples

    rows = [{"instruction": f"Question number {k}?", "input": "", "output": f"answer {k} " + "word " * 200}
            for k in range(6)]
    rows.append({"instruction": "Explain " + "very " * 300 + "much.", "input": "", "output": "short"})
    fits, shorten = token_budget(str(tiny_llama_dir), 96)
    examples = mcq_examples(rows, 0, 0, 1.0, fits, shorten)
    last = {k: examples[-1][k] for k in ("prompt", "completion")}
    assert last == to_prompt_completion(rows[-1], "qa")  # the question alone does not fit: qa, no crash
    cut = examples[0]
    assert cut["completion"] in ("A", "B", "C", "D") and fits(cut["prompt"], cut["completion"])
    assert "Question: Question number 0?" in cut["prompt"] and " ..." in cut["prompt"]  # options cut, question whole
