"""The letter prior of `mcq`: rotations, the balance term, MMLU-like options, and the diagnostics that show it."""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from flowertune_llm.config import ConfigError, parse_config
from flowertune_llm.dataset import federated_dataset, load_partition
from flowertune_llm.letter_balance import answer_positions, complete_groups, letter_balance
from flowertune_llm.prompts import first_sentence, mcq_examples, rotations, similar_rows, to_prompt_completion
from flowertune_llm.schedule import Coverage, rotation_order, row_order
from tests.helpers import (
    ALPACA_SUBSET,
    ROOT,
    partition_sha256_in_new_process,
    record_training_batches,
    rows_sha256,
    tiny_run_config,
)

LETTERS = ("A", "B", "C", "D")


def options_of(prompt: str) -> list[str]:
    """The option texts of an mcq prompt, in letter order."""
    block = prompt.split("\nOptions:\n", 1)[1].split("\nThe answer is:", 1)[0].split("\n")
    assert [o[:3] for o in block] == ["A. ", "B. ", "C. ", "D. "]
    return [o[3:] for o in block]


def rotated_rows(model_dir: Path, options: str = "random", partition: int = 0, fraction: float = 0.5):
    """A partition of the local alpaca sample in mcq form with rotations (sequence 512: questions fit)."""
    return load_partition(str(ALPACA_SUBSET), partition, 20, 42, "mcq", fraction, str(model_dir), 512, True, options)


# --- the four rotations ---------------------------------------------------------------------------------------------


def test_rotations_put_the_gold_at_each_letter_in_cyclic_order() -> None:
    forms = rotations(["x", "GOLD", "y", "z"], 1)
    assert [g for _, g in forms] == [0, 1, 2, 3]
    assert [opts[g] for opts, g in forms] == ["GOLD"] * 4
    assert forms[0][0] == ["GOLD", "y", "z", "x"]
    for (a, _), (b, _) in zip(forms, forms[1:]):
        assert b == [a[-1]] + a[:-1]  # each rotation shifts the options one place


def test_a_rows_four_rotations_decoded_gold_letter_option_order_and_loss_on_letter_and_end_token(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    from flowertune_llm.models import initial_adapter
    from flowertune_llm.prompts import one_line
    from flowertune_llm.train import make_trainer

    originals = federated_dataset(str(ALPACA_SUBSET), 20, 42).load_partition(0, "train").to_list()
    data = rotated_rows(tiny_llama_dir)
    rows = data.to_list()
    by_row = Counter(r["mcq_row"] for r in rows)
    assert set(by_row.values()) == {1, 4} and sorted(by_row) == list(range(len(originals)))  # every row, 1 or 4 times
    row = next(r for r, n in by_row.items() if n == 4 and " ..." not in rows[[x["mcq_row"] for x in rows].index(r)]["prompt"])
    idx = [i for i, r in enumerate(rows) if r["mcq_row"] == row]
    assert idx == list(range(idx[0], idx[0] + 4))  # one after another
    group = [rows[i] for i in idx]
    assert [e["completion"] for e in group] == list(LETTERS) and [e["mcq_rotation"] for e in group] == [0, 1, 2, 3]
    opts = [options_of(e["prompt"]) for e in group]
    gold = one_line(originals[row]["output"])
    assert [o[k] for k, o in enumerate(opts)] == [gold] * 4  # the row's own output at A, B, C, D
    for a, b in zip(opts, opts[1:]):
        assert b == [a[-1]] + a[:-1]  # cyclic rotations of one option list
    qa = [r for r in rows if r["mcq_rotation"] == -1]
    assert qa and all(r["completion"] not in LETTERS for r in qa)  # the rest stays qa

    cfg = parse_config(tiny_run_config(tiny_llama_dir, **{"train.prompt-template": "mcq", "train.seq-length": 512,
                                                           "train.mcq-rotations": True}))
    start, _ = initial_adapter(cfg.model, cfg.train.seed)
    trainer = make_trainer(cfg, start, data.select(idx), 1e-3, str(tmp_path))
    tok = trainer.processing_class
    for k in range(4):
        batch = trainer.data_collator([trainer.train_dataset[k]])
        ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
        assert tok.decode([t for t, lab in zip(ids, labels) if lab != -100]) == LETTERS[k] + "<|im_end|>"
        assert tok.decode([t for t, lab in zip(ids, labels) if lab == -100]) == group[k]["prompt"]


def test_rotation_order_keeps_groups_whole_takes_a_prefix_of_rows_and_fills_the_last_block() -> None:
    example_rows = [0, 1, 1, 1, 1, 2, 3, 3, 3, 3, 4, 5]  # rows 1 and 3 are questions (4 rotations each)
    out, taken = rotation_order([2, 1, 0, 3, 4, 5], example_rows, budget=8)
    assert taken == 3 and out == [1, 2, 3, 4, 5, 0, 5, 0]  # rows 2, 1, 0; row 3 does not fit; 2 singles repeated
    out, taken = rotation_order([1, 3, 0, 2, 4, 5], example_rows, budget=8)
    assert taken == 2 and out == [1, 2, 3, 4, 6, 7, 8, 9]
    out, taken = rotation_order([2, 1, 0, 3, 4, 5], example_rows, budget=None)  # by epochs: every row
    assert taken == 6 and sorted(out) == list(range(12))


def test_a_clients_round_trains_each_letter_equally_often_with_whole_groups_per_batch(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From the batches the trainer computes its loss on: equal A/B/C/D counts, no question split over batches,
    and the rows the server counts (a prefix of the round's row order) are the rows trained."""
    from flowertune_llm.models import initial_adapter
    from flowertune_llm.train import ModelCache, TokenizedCache, train_one_round

    batches: list[list[tuple[int, ...]]] = []
    record_training_batches(monkeypatch, batches.append)
    from flowertune_llm.letter_balance import LetterBalance

    terms: list[float | None] = []
    original_term = LetterBalance.term

    def term(self, labels, rotations, *more):  # noqa: ANN001, ANN002, ANN202
        value = original_term(self, labels, rotations, *more)
        terms.append(None if value is None else float(value.detach()))
        return value

    monkeypatch.setattr(LetterBalance, "term", term)
    cfg = parse_config(tiny_run_config(tiny_llama_dir, **{
        "model.quantization": 4, "train.prompt-template": "mcq", "train.seq-length": 512, "train.mcq-rotations": True,
        "train.mcq-balance": 0.5, "train.training-arguments.per-device-train-batch-size": 8,
        "train.training-arguments.max-steps": 3}))
    start, _ = initial_adapter(cfg.model, cfg.train.seed)
    data = rotated_rows(tiny_llama_dir)
    tok = __import__("transformers").AutoTokenizer.from_pretrained(tiny_llama_dir)
    key_of = {tuple(tok(e["prompt"] + e["completion"]).input_ids): e for e in data.to_list()}
    result = train_one_round(cfg, start, 0, 20, lr=1e-3, models=ModelCache(), tokenized=TokenizedCache(),
                             server_round=2)
    assert len(batches) == 3 and all(len(b) == 8 for b in batches)
    letters: Counter[str] = Counter()
    trained_rows = set()
    examples_by_batch = []
    for batch in batches:
        examples = [next(e for k, e in key_of.items() if seq[: len(k)] == k) for seq in batch]
        examples_by_batch.append(examples)
        for block in range(0, 8, 4):  # a block: one question's 4 rotations, or single rows
            rots = [e["mcq_rotation"] for e in examples[block : block + 4]]
            assert rots == [0, 1, 2, 3] or rots == [-1] * 4
        letters.update(e["completion"] for e in examples if e["mcq_rotation"] >= 0)
        trained_rows |= {e["mcq_row"] for e in examples}
    assert letters and len(set(letters.values())) == 1, letters  # each letter the gold equally often
    groups = [sum(1 for b in range(0, 8, 4) if examples_by_batch[k][b]["mcq_rotation"] == 0) for k in range(3)]
    assert len(terms) == 3 and all((t is None) == (g == 0) for t, g in zip(terms, groups))  # the term ran on each
    assert all(t > 0 for t in terms if t is not None)  # batch that holds a whole question, and only there
    order = row_order(42, 2, 0, result.partition_rows, dynamic=True)
    assert trained_rows == set(order[: result.rows_trained].tolist())  # what the server's Coverage counts
    assert Coverage(42, True).add(2, 0, result.partition_rows, result.rows_trained) == len(trained_rows)


def test_rows_per_round_expects_fewer_rows_with_rotations_and_check_says_so() -> None:
    import subprocess
    import sys

    plain = parse_config(tiny_run_config("unused", **{"train.prompt-template": "mcq",
                                                      "train.training-arguments.per-device-train-batch-size": 16,
                                                      "train.training-arguments.max-steps": 10}))
    rotating = parse_config(tiny_run_config("unused", **{"train.prompt-template": "mcq", "train.mcq-rotations": True,
                                                         "train.training-arguments.per-device-train-batch-size": 16,
                                                         "train.training-arguments.max-steps": 10}))
    assert plain.train.rows_per_round(2600) == 160
    assert rotating.train.rows_per_round(2600) == 64  # 160 examples / 2.5 examples a row (fraction 0.5)
    assert rotating.train.rows_per_round(20) == 20
    out = subprocess.run([sys.executable, "-m", "flowertune_llm.cli", "check",
                          "train.prompt-template='mcq' train.mcq-rotations=true"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "with mcq rotations a row is 2.5 examples on average" in out


# --- the balance term ----------------------------------------------------------------------------------------------


def test_the_balance_term_is_zero_for_a_uniform_mean_and_kl_otherwise() -> None:
    knows = torch.full((1, 4, 4), -5.0)
    for r in range(4):
        knows[0, r, r] = 5.0  # each rotation: its own gold letter
    assert letter_balance(knows).item() == pytest.approx(0.0, abs=1e-6)  # knowledge is not penalized
    assert letter_balance(torch.zeros(2, 4, 4)).item() == pytest.approx(0.0, abs=1e-7)
    prior = torch.log(torch.tensor([0.7, 0.1, 0.1, 0.1])).expand(1, 4, 4).clone()  # always leans on A
    expected = 0.7 * math.log(0.7 / 0.25) + 3 * 0.1 * math.log(0.1 / 0.25)
    assert letter_balance(prior).item() == pytest.approx(expected, rel=1e-5)
    two = torch.stack([prior[0], knows[0]])
    assert letter_balance(two).item() == pytest.approx(expected / 2, rel=1e-5)  # mean over groups
    assert letter_balance(torch.full((1, 4, 4), 0.0).index_fill(2, torch.tensor([1]), 50.0)).item() == \
        pytest.approx(math.log(4), rel=1e-4)  # all mass on one letter: log 4


def test_the_balance_terms_gradient_pushes_the_favoured_letter_down_and_the_others_up() -> None:
    logits = torch.log(torch.tensor([0.1, 0.6, 0.2, 0.1])).expand(1, 4, 4).clone().requires_grad_(True)
    letter_balance(logits).backward()
    grad = logits.grad.sum(dim=(0, 1))
    assert grad[1] > 0  # descending lowers B, the favoured letter
    assert grad[0] < 0 and grad[3] < 0  # ... and raises the letters below uniform
    assert float(grad.sum()) == pytest.approx(0.0, abs=1e-6)  # softmax: shifting all logits changes nothing


def test_complete_groups_and_answer_positions() -> None:
    assert complete_groups([-1, 0, 1, 2, 3, 0, 1, -1]) == [1]
    assert complete_groups([0, 1, 2, 3, 0, 1, 2, 3]) == [0, 4]
    assert complete_groups([1, 2, 3, 0]) == []
    # rotations 0-3 of two different questions side by side are no group: the question id must agree
    assert complete_groups([0, 1, 2, 3, 0, 1, 2, 3], rows=[7, 7, 7, 7, 8, 8, 9, 8]) == [0]
    labels = torch.tensor([[-100, -100, 7, 2], [-100, 5, 2, -100]])
    assert answer_positions(labels) == [(0, 1), (1, 0)]
    packed = torch.tensor([[-100, -100, 7, 2, -100, 5, 2]])  # the same two rows end to end (padding-free)
    assert answer_positions(packed, [(0, 0, 4), (0, 4, 7)]) == [(0, 1), (0, 4)]


def test_a_row_with_a_rotation_missing_fails_loudly() -> None:
    from flowertune_llm.schedule import rotation_order

    with pytest.raises(ValueError, match="row 1 has 3 examples"):
        rotation_order([0, 1], [0, 1, 1, 1], None)


@pytest.mark.parametrize(("padding_free", "accumulation"), [(False, 1), (True, 1), (True, 2)])
def test_the_trainers_loss_adds_exactly_the_term_computed_from_full_logits(
    tiny_llama_dir: Path, tmp_path: Path, padding_free: bool, accumulation: int
) -> None:
    """A second path: the term from the model's own logits of a padded batch (no fused head, no hook, no packing)
    equals what the trainer adds, padded or padding-free; with gradient accumulation, divided over its steps
    (the Trainer leaves the averaging to the loss when it passes `num_items_in_batch`)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from flowertune_llm.evaluate.generation import letter_token_ids
    from flowertune_llm.models import initial_adapter
    from flowertune_llm.train import make_trainer

    data = rotated_rows(tiny_llama_dir, fraction=1.0)
    rows = data.to_list()
    first = next(i for i, r in enumerate(rows) if r["mcq_rotation"] == 0)
    subset = data.select(range(first, first + 4))
    losses = {}
    for weight in (0.0, 2.0):
        cfg = parse_config(tiny_run_config(tiny_llama_dir, **{
            "train.prompt-template": "mcq", "train.seq-length": 512, "train.mcq-rotations": True,
            "train.mcq-balance": weight, "train.padding-free": padding_free, "model.lora.peft-lora-dropout": 0.0,
            "train.training-arguments.gradient-accumulation-steps": accumulation}))
        start, _ = initial_adapter(cfg.model, cfg.train.seed)
        trainer = make_trainer(cfg, start, subset, 1e-3, str(tmp_path / str(weight)), models=None)
        trainer.model.train()  # the term is a training term (evaluation reports the completion loss alone); no dropout
        trainer.current_gradient_accumulation_steps = accumulation
        examples = [{k: v for k, v in trainer.train_dataset[k].items() if k in ("input_ids", "labels", "mcq_rotation",
                                                                                "mcq_row")} for k in range(4)]
        batch = trainer.data_collator(examples)
        assert ("cu_seq_lens_q" in batch) == padding_free
        labelled = int((batch["labels"] != -100).sum())
        with torch.no_grad():
            losses[weight] = float(trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=labelled))
            if weight:
                padded = DataCollatorForLanguageModeling(pad_token_id=trainer.processing_class.pad_token_id)(
                    [{k: e[k] for k in ("input_ids", "labels")} for e in examples])
                logits = trainer.model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
                at = answer_positions(padded["labels"])
                letters = logits[torch.tensor([r for r, _ in at]), torch.tensor([p for _, p in at])]
                letters = letters[:, letter_token_ids(trainer.processing_class)]
                term = weight * float(letter_balance(letters.view(1, 4, 4))) / accumulation
    assert term > 0
    assert losses[2.0] - losses[0.0] == pytest.approx(term, rel=1e-3, abs=1e-6)


# --- options like MMLU's -------------------------------------------------------------------------------------------


def test_similar_rows_rank_rows_that_share_rare_instruction_words_first() -> None:
    instructions = ["Explain photosynthesis in plants.", "Write a poem about the sea.",
                    "Describe how photosynthesis works in plants.", "Name three colors.",
                    "Summarize photosynthesis.", "Write a story about the sea."]
    ranked = similar_rows(instructions, 42, 0)
    assert set(ranked[0][:2]) == {2, 4}  # the other photosynthesis rows come first
    assert ranked[1][0] == 5  # "about the sea"
    assert all(sorted(r + [i]) == list(range(6)) for i, r in enumerate(ranked))  # every other row, once
    assert ranked == similar_rows(instructions, 42, 0)


def test_first_sentence_is_an_option_as_short_as_mmlus() -> None:
    assert first_sentence("Paris is the capital. It is large.") == "Paris is the capital."
    assert first_sentence("Three colors:\n1. red\n2. blue") == "Three colors: 1. red 2. blue"  # "1." is no end
    assert first_sentence("No end at all") == "No end at all"


def test_similar_options_are_short_near_topic_and_the_same_in_a_fresh_process(tiny_llama_dir: Path) -> None:
    data = rotated_rows(tiny_llama_dir, options="similar", partition=3).to_list()
    questions = [e for e in data if e["mcq_rotation"] == 0]
    assert questions
    tok = __import__("transformers").AutoTokenizer.from_pretrained(tiny_llama_dir)
    lengths = [len(tok(o.removesuffix(" ..."), add_special_tokens=False).input_ids)
               for e in questions for o in options_of(e["prompt"])]
    assert max(lengths) <= 20 + 1
    fresh = partition_sha256_in_new_process(str(ALPACA_SUBSET), 3, 20, 42, "mcq", 0.5, str(tiny_llama_dir), 512, True,
                                            "similar")
    assert fresh == rows_sha256(data)


def test_an_over_long_row_stays_qa_with_rotations_and_similar_options(tiny_llama_dir: Path) -> None:
    from flowertune_llm.dataset import token_budget

    rows = [{"instruction": f"Question number {k}?", "input": "", "output": f"answer {k} " + "word " * 200}
            for k in range(6)]
    rows.append({"instruction": "Explain " + "very " * 300 + "much.", "input": "", "output": "short"})
    fits, shorten = token_budget(str(tiny_llama_dir), 96)
    for options in ("random", "similar"):
        examples = mcq_examples(rows, 0, 0, 1.0, fits, shorten, rotate=True, options=options)
        last = examples[-1]
        assert {k: last[k] for k in ("prompt", "completion")} == to_prompt_completion(rows[-1], "qa")
        assert last["mcq_rotation"] == -1
        assert [e["mcq_rotation"] for e in examples[:4]] == [0, 1, 2, 3]
        assert all(fits(e["prompt"], e["completion"]) for e in examples[:-1])


# --- settings ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "message"), [
    ({"train.mcq-balance": 0.5}, "train.mcq-balance=0.5 needs train.mcq-rotations=true"),
    ({"train.mcq-rotations": True, "train.training-arguments.per-device-train-batch-size": 6},
     "train.training-arguments.per-device-train-batch-size=6 with train.mcq-rotations=true: must be a multiple of 4"),
    ({"train.mcq-balance": -1.0}, "train.mcq-balance=-1.0: must be >= 0"),
    ({"train.mcq-options": "nearby"}, "train.mcq-options='nearby': expected one of random, similar"),
    ({"train.mcq-rotations": True, "train.dynamic-data-seed": False,
      "train.training-arguments.train-sampling-strategy": "group_by_length"}, "train.mcq-rotations=true orders"),
])
def test_mcq_settings_that_cannot_work_are_refused_naming_the_keys(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(tiny_run_config("unused", **{"train.prompt-template": "mcq", **overrides}))


def test_similar_rows_keep_a_few_candidates_and_duplicates_fall_back_to_the_seeded_order() -> None:
    """Memory grows with the rows, not their square: 16 candidates a row; a question whose closest rows all share
    one output still gets three distinct distractors from the seeded order after them."""
    from flowertune_llm.prompts import SIMILAR_KEEP, mcq_examples

    instructions = [f"Describe topic {i % 50} with words alpha{i % 7} beta{i % 11}" for i in range(3000)]
    ranked = similar_rows(instructions, 42, 0)
    assert {len(r) for r in ranked} == {SIMILAR_KEEP} and all(i not in r for i, r in enumerate(ranked))
    rows = [{"instruction": f"Explain the sea {i}", "input": "", "output": "Same answer."} for i in range(40)]
    rows += [{"instruction": f"Name a color {i}", "input": "", "output": f"Color {i}."} for i in range(5)]
    examples = mcq_examples(rows, 0, 0, 1.0, lambda p, c: True, lambda t, n: t, options="similar")
    question = next(e for e in examples if e["mcq_row"] == 0)
    assert question["mcq_rotation"] == -1 and len(set(options_of(question["prompt"]))) == 4
