"""`train.dynamic-data-seed`: which rows a client trains on in each round, and the coverage the server counts."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from flowertune_llm.config import ConfigError, parse_config
from flowertune_llm.schedule import Coverage, planned_coverage, row_order, rows_per_round
from tests.helpers import ROOT, default_run_config, record_training_batches, tiny_run_config


def test_row_order_is_a_function_of_seed_round_and_partition() -> None:
    a = row_order(42, 3, 1, 100, dynamic=True)
    assert sorted(a) == list(range(100))
    assert np.array_equal(a, row_order(42, 3, 1, 100, dynamic=True))
    assert not np.array_equal(a, row_order(42, 4, 1, 100, dynamic=True))  # another round
    assert not np.array_equal(a, row_order(42, 3, 2, 100, dynamic=True))  # another partition
    assert not np.array_equal(a, row_order(7, 3, 1, 100, dynamic=True))  # another seed
    assert all(np.array_equal(row_order(42, r, 1, 100, dynamic=False), row_order(42, 1, 1, 100, dynamic=False))
               for r in range(2, 6))


def test_rows_per_round_counts_steps_batch_and_accumulation_or_the_epochs() -> None:
    assert rows_per_round(2600, max_steps=10, batch_size=16) == 160
    assert rows_per_round(2600, max_steps=10, batch_size=16, grad_accum=2) == 320
    assert rows_per_round(100, max_steps=10, batch_size=16) == 100  # more than one epoch: every row
    assert rows_per_round(100, max_steps=-1, batch_size=16, num_epochs=0.5) == 64  # ceil(0.5 * 7) = 4 steps
    assert rows_per_round(100, max_steps=-1, batch_size=16, num_epochs=3) == 100


def test_coverage_counts_new_rows_and_replays_from_metrics_lines() -> None:
    live = Coverage(seed=1, dynamic=True)
    lines = []
    for rnd, partition in [(1, 0), (2, 0), (3, 1), (4, 0)]:
        new = live.add(rnd, partition, 50, 20)
        lines.append({"server_round": rnd, "client_losses": [
            {"partition": partition, "examples": 50, "rows_trained": 20, "rows_new": new}]})
    assert lines[0]["client_losses"][0]["rows_new"] == 20
    assert all(line["client_losses"][0]["rows_new"] < 20 for line in (lines[1], lines[3]))
    replayed = Coverage.replay(1, True, lines[:2])  # a run resumed after round 2
    assert replayed.add(3, 1, 50, 20) == 20 and replayed.add(4, 0, 50, 20) == lines[3]["client_losses"][0]["rows_new"]
    assert replayed.total == live.total
    fixed = Coverage(seed=1, dynamic=False)
    assert [fixed.add(r, 0, 50, 20) for r in (1, 2, 3)] == [20, 0, 0]


def test_readme_states_the_reference_coverage_computed_by_the_app() -> None:
    """At the reference settings (100 rounds, 2 of 20 SuperNodes, 10 steps x batch 16) the README's figures are
    what the app's own sampling and row orders give, with and without train.dynamic-data-seed."""
    from flowertune_llm import rules

    cfg = parse_config(default_run_config())  # the pyproject's training arguments: 10 steps x batch 16
    figures = {}
    for dynamic in (False, True):
        covered = planned_coverage(rules.DATASET_ROWS, rules.NUM_SUPERNODES, 100, 0.1, 42, cfg.train.rows_per_round,
                                   dynamic)
        figures[dynamic] = f"{covered:,} rows ({100 * covered / rules.DATASET_ROWS:.1f}%)"
    readme = " ".join((ROOT / "README.md").read_text().split())  # line breaks are not the statement
    assert figures[False] == "3,200 rows (6.2%)"
    assert f"same rows every time: {figures[False]}" in readme and f"a new order each round: {figures[True]}" in readme


def test_another_sampling_strategy_with_dynamic_data_seed_is_refused_naming_both_keys() -> None:
    bad = {"train.training-arguments.train-sampling-strategy": "group_by_length"}
    with pytest.raises(ConfigError, match=re.escape("train.training-arguments.train-sampling-strategy='group_by_length'")
                       + ".*train.dynamic-data-seed=false"):
        parse_config(tiny_run_config("unused", **bad))
    parse_config(tiny_run_config("unused", **bad, **{"train.dynamic-data-seed": False}))


# --- real rounds on the tiny 4-bit Llama: the rows the trainer actually consumed -------------------------------------


@pytest.fixture
def consumed(monkeypatch: pytest.MonkeyPatch) -> list[set[tuple[int, ...]]]:
    """Each round's trained rows as token sequences, read from the batches the trainer computes its loss on."""
    rounds: list[set[tuple[int, ...]]] = []
    record_training_batches(monkeypatch, lambda rows: rounds[-1].update(rows))
    return rounds


def train_rounds(cfg, plan: list[tuple[int, int]], consumed: list, fresh_each_round: bool = False) -> list:  # noqa: ANN001
    """Train (round, partition) pairs in order from the initial adapter; each round's RoundResult."""
    from flowertune_llm.models import initial_adapter
    from flowertune_llm.train import ModelCache, TokenizedCache, train_one_round

    start, _ = initial_adapter(cfg.model, cfg.train.seed)
    models, tokenized = ModelCache(), TokenizedCache()
    results = []
    for rnd, partition in plan:
        if fresh_each_round:  # a new process: what a resumed run's clients start from
            models, tokenized = ModelCache(), TokenizedCache()
        consumed.append(set())
        results.append(train_one_round(cfg, start, partition, 20, lr=1e-3, models=models, tokenized=tokenized,
                                       server_round=rnd))
    return results


def tiny_cfg(tiny_llama_dir: Path, dynamic: bool):  # noqa: ANN201
    """4-bit tiny Llama, 3 steps of batch 4 per round (12 of a partition's ~50 rows)."""
    return parse_config(tiny_run_config(tiny_llama_dir, **{
        "model.quantization": 4, "train.dynamic-data-seed": dynamic, "train.training-arguments.max-steps": 3}))


def test_two_rounds_of_a_partition_train_other_rows_with_the_option_and_the_same_rows_without(
    tiny_llama_dir: Path, consumed: list
) -> None:
    for dynamic in (True, False):
        consumed.clear()
        results = train_rounds(tiny_cfg(tiny_llama_dir, dynamic), [(1, 0), (2, 0)], consumed)
        assert [len(c) for c in consumed] == [r.rows_trained for r in results] == [12, 12]
        assert (consumed[0] != consumed[1]) is dynamic, f"dynamic-data-seed={dynamic}"


def test_a_resumed_run_trains_the_next_round_on_the_rows_an_uninterrupted_run_does(
    tiny_llama_dir: Path, consumed: list
) -> None:
    cfg = tiny_cfg(tiny_llama_dir, True)
    train_rounds(cfg, [(1, 0), (2, 0), (3, 0)], consumed)  # uninterrupted: one process through rounds 1-3
    uninterrupted = consumed[2]
    consumed.clear()
    train_rounds(cfg, [(3, 0)], consumed, fresh_each_round=True)  # resumed after round 2: a fresh process
    assert consumed[0] == uninterrupted


@pytest.mark.parametrize("dynamic", [True, False])
def test_coverage_counts_equal_a_direct_count_of_the_rows_trained(
    tiny_llama_dir: Path, consumed: list, dynamic: bool
) -> None:
    plan = [(1, 0), (1, 1), (2, 0), (3, 0), (3, 1), (4, 1)]
    results = train_rounds(tiny_cfg(tiny_llama_dir, dynamic), plan, consumed)
    coverage, seen = Coverage(42, dynamic), {0: set(), 1: set()}
    for (rnd, partition), result, rows in zip(plan, results, consumed):
        reported_new = coverage.add(rnd, partition, result.num_examples, result.rows_trained)
        assert reported_new == len(rows - seen[partition]), (rnd, partition)
        seen[partition] |= rows
        assert coverage.total == len(seen[0]) + len(seen[1])
    assert coverage.total > 24 if dynamic else coverage.total == 24  # fixed: the same 12 rows of each partition


def test_a_round_by_epochs_gives_each_epoch_its_own_order(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """max-steps = -1 and 2 epochs with a new order each round: the trainer reads every row once per epoch, epoch 1
    in its own order (schedule.row_order of epoch 1), not epoch 0's again."""
    from flowertune_llm.models import initial_adapter
    from flowertune_llm.train import ModelCache, TokenizedCache, train_one_round

    seen: list[tuple[int, ...]] = []
    record_training_batches(monkeypatch, seen.extend)
    cfg = parse_config(tiny_run_config(tiny_llama_dir, **{
        "train.training-arguments.max-steps": -1, "train.training-arguments.num-train-epochs": 2,
        "train.training-arguments.per-device-train-batch-size": 5}))
    start, _ = initial_adapter(cfg.model, cfg.train.seed)
    result = train_one_round(cfg, start, 3, 20, 1e-3, models=ModelCache(), tokenized=TokenizedCache(), server_round=2)
    n = result.num_examples
    assert len(seen) == 2 * n and result.rows_trained == n
    first, second = seen[:n], seen[n:]
    assert set(first) == set(second) and len(set(first)) == n  # every row once per epoch
    assert first != second  # ... each epoch in its own order


def test_rotations_by_epochs_give_each_epoch_its_own_order_in_whole_blocks() -> None:
    """mcq rotations, max-steps = -1, 2 epochs: each epoch every row once in its own order (row_order of the epoch),
    its examples in blocks of 4 that a batch (a multiple of 4) never splits, the epochs end to end."""
    from datasets import Dataset

    from flowertune_llm.train import round_examples

    example_rows, rotations = [], []
    for row in range(7):  # rows 0, 2, 4, 6 are questions (4 rotations), the others single qa rows
        for rotation in (range(4) if row % 2 == 0 else [-1]):
            example_rows.append(row)
            rotations.append(rotation)
    data = Dataset.from_dict({"mcq_row": example_rows, "mcq_rotation": rotations, "i": list(range(len(example_rows)))})
    cfg = parse_config(default_run_config(**{
        "train.prompt-template": "mcq", "train.mcq-rotations": True, "train.training-arguments.max-steps": -1,
        "train.training-arguments.num-train-epochs": 2, "train.training-arguments.per-device-train-batch-size": 4}))
    out, rows_trained, rows = round_examples(cfg, data, server_round=3, partition_id=5)
    assert (rows_trained, rows) == (7, 7)
    per_epoch = len(out) // 2
    assert per_epoch % 4 == 0 and per_epoch >= len(example_rows)  # the last block completed by a repeated single
    epochs = [out.select(range(k * per_epoch, (k + 1) * per_epoch)) for k in range(2)]
    orders = []
    for epoch in epochs:
        assert set(epoch["mcq_row"]) == set(range(7))
        for start in range(0, per_epoch, 4):  # a question's four rotations always share a block
            block = epoch.select(range(start, start + 4))
            assert block["mcq_rotation"] == [0, 1, 2, 3] or -1 in block["mcq_rotation"]
        orders.append(list(dict.fromkeys(epoch["mcq_row"])))
    assert orders[0] != orders[1]
