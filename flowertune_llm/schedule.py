"""Which rows train when: the seeded client sample of a round, a partition's row order in a round, the coverage.

Everything here is a pure function of (seed, round, partition, sizes), so a resumed run samples
and orders exactly as an uninterrupted one, and the server can count the rows a run has trained
on without the clients keeping any state. Light on purpose (numpy only): `flowertune-llm check`
uses it to print the coverage a configuration will reach.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

#: Flower's FedAvg samples at least this many nodes for training (`min_train_nodes`).
MIN_TRAIN_NODES = 2


def sample_round(
    node_ids: list[int], partitions: Mapping[int, int], k: int, seed: int, server_round: int
) -> list[int]:
    """Seeded sample of k nodes, reproducible across restarts (ordered by partition id)."""
    ordered = sorted(node_ids, key=lambda n: (partitions.get(n, 1 << 62), n))
    return random.Random(f"{seed}:{server_round}").sample(ordered, k)


def nodes_per_round(num_nodes: int, fraction_train: float) -> int:
    """How many nodes Flower's FedAvg samples for training from `num_nodes` (at least 2, at most all)."""
    return min(num_nodes, max(int(num_nodes * fraction_train), MIN_TRAIN_NODES))


def row_order(
    seed: int, server_round: int, partition_id: int, num_rows: int, dynamic: bool, epoch: int = 0
) -> np.ndarray:
    """The order in which a partition's rows are trained in a round (`train.dynamic-data-seed`).

    A permutation of range(num_rows) drawn from (seed, partition, round); with `dynamic=False`
    the round is left out, so every round gives the same order (what a fixed trainer seed gives).
    A round that trains by epochs draws each later epoch's own order from (..., epoch) too.
    """
    key = [seed, partition_id, server_round if dynamic else 0, 0x6F72] + ([epoch] if epoch else [])
    return np.random.default_rng(key).permutation(num_rows)


def epoch_orders(seed: int, server_round: int, partition_id: int, num_rows: int, passes: int) -> list[np.ndarray]:
    """A round that trains by epochs in the round's own order: each of its `passes` epochs its own order
    (`row_order` of epoch 0, 1, ...)."""
    return [row_order(seed, server_round, partition_id, num_rows, True, epoch=e) for e in range(passes)]


def rows_per_round(
    num_rows: int, max_steps: int, batch_size: int, grad_accum: int = 1, num_epochs: float = 1.0
) -> int:
    """Distinct rows one local round trains on: max_steps x batch x accumulation, or the epochs' worth."""
    per_step = batch_size * grad_accum
    if max_steps > 0:
        return min(num_rows, max_steps * per_step)
    steps = math.ceil(num_epochs * math.ceil(num_rows / per_step))
    return min(num_rows, steps * per_step)


#: A question's rotations (and a run of single examples) form a block of this many examples.
BLOCK = 4


def rotation_order(
    order: Sequence[int], example_rows: Sequence[int], budget: int | None
) -> tuple[list[int], int]:
    """A round's examples when questions come in four rotations: their indices, and how many rows they train.

    `order` is the round's row order (`row_order`), `example_rows[e]` the row (0..rows-1) of
    example e; a row's examples (1, or 4 rotations) stay together. Rows are taken in order while
    their examples fit `budget` (max_steps x batch x accumulation; None: every row), so the rows
    trained are the first k of `order`, what `Coverage` counts. The examples are laid out in blocks of
    four, each a question's rotations or four single rows, so with a batch that is a multiple of 4 no
    question is split across batches; the last block of single rows is completed by repeating
    single rows of the round (at most 3 repeats), so the round has exactly `budget` examples
    whenever the rows allow it, and each letter is the gold letter equally often.
    """
    by_row: dict[int, list[int]] = {}
    for e, r in enumerate(example_rows):
        by_row.setdefault(int(r), []).append(e)
    blocks: list[list[int]] = []
    pending: list[int] = []
    singles: list[int] = []
    used = taken = 0
    for r in order:
        examples = by_row.get(int(r), [])
        if budget is not None and used + len(examples) > budget:
            break
        used += len(examples)
        taken += 1
        if len(examples) not in (0, 1, BLOCK):
            raise ValueError(f"row {int(r)} has {len(examples)} examples: a row is one example or a question's "
                             f"{BLOCK} rotations (was one dropped?)")
        if len(examples) == 1:
            pending.append(examples[0])
            singles.append(examples[0])
            if len(pending) == BLOCK:
                blocks.append(pending)
                pending = []
        elif examples:
            blocks.append(examples)
    if pending and budget is not None and singles:
        gap = min(budget - used, BLOCK - len(pending))
        pending += [singles[i % len(singles)] for i in range(gap)]
    out = [e for block in blocks for e in block] + pending
    return out, taken


@dataclass
class Coverage:
    """Which rows of each partition a run has trained on so far (recomputed, never reported by clients)."""

    seed: int
    dynamic: bool
    seen: dict[int, np.ndarray] = field(default_factory=dict)  # partition -> trained-on mask

    def add(self, server_round: int, partition_id: int, num_rows: int, rows_trained: int) -> int:
        """Record one client's round; return how many of its rows it had never trained on before."""
        mask = self.seen.get(partition_id)
        if mask is None or len(mask) != num_rows:
            mask = self.seen[partition_id] = np.zeros(num_rows, dtype=bool)
        rows = row_order(self.seed, server_round, partition_id, num_rows, self.dynamic)[:rows_trained]
        new = int((~mask[rows]).sum())
        mask[rows] = True
        return new

    @property
    def total(self) -> int:
        """Distinct rows trained on over the run so far, all partitions together."""
        return int(sum(int(m.sum()) for m in self.seen.values()))

    @classmethod
    def replay(cls, seed: int, dynamic: bool, metrics: Iterable[Mapping]) -> Coverage:
        """The coverage after the rounds of these metrics.jsonl lines (what a resumed run starts from)."""
        coverage = cls(seed, dynamic)
        for line in sorted(metrics, key=lambda m: m.get("server_round", 0)):
            for client in line.get("client_losses") or []:
                if client.get("rows_trained") is not None and client.get("partition") is not None:
                    coverage.add(line["server_round"], client["partition"], client.get("rows", client["examples"]),
                                 client["rows_trained"])
        return coverage


def planned_coverage(
    dataset_rows: int,
    num_nodes: int,
    num_rounds: int,
    fraction_train: float,
    seed: int,
    rows_trained: Callable[[int], int],
    dynamic: bool,
) -> int:
    """Distinct rows a whole run trains on, by the server's own sampling and row orders (IID partitions).

    `rows_trained(partition size)` is one client's rows in one round (`TrainSettings.rows_per_round`); partitions are the
    IID split's sizes (numpy's array_split, as Flower Datasets' IidPartitioner makes them).
    """
    sizes = [len(part) for part in np.array_split(np.arange(dataset_rows), num_nodes)]
    partitions = {p: p for p in range(num_nodes)}
    k = nodes_per_round(num_nodes, fraction_train)
    coverage = Coverage(seed, dynamic)
    for rnd in range(1, num_rounds + 1):
        for p in sample_round(list(partitions), partitions, k, seed, rnd):
            coverage.add(rnd, p, sizes[p], rows_trained(sizes[p]))
    return coverage.total
