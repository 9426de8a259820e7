"""Benchmark: `train.mcq-options = "similar"` on a partition the size of the real dataset's (time, peak memory).

Run by hand:

    python -m tests.benchmarks.bench_similar                # 26,000 rows (a 2-node partition of the 52,002)
    python -m tests.benchmarks.bench_similar --rows 2600    # a 20-node partition

The offline alpaca sample has 985 rows; a partition of N rows is made of its instructions, each copy
given a distinct number and one word of another row (so copies are near, not equal, neighbours: every
word is ~N/985 times as common as in real data, a worst case for the posting lists). Printed: the
seconds and the peak of Python's allocations (tracemalloc) of `prompts.similar_rows`, and the
candidates kept per row.
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc

from flowertune_llm.prompts import SIMILAR_KEEP, similar_rows
from tests.helpers import ALPACA_SUBSET


def partition(rows: int) -> list[str]:
    """`rows` instructions built from the offline sample (see the module docstring)."""
    sample = [json.loads(line)["instruction"] for line in ALPACA_SUBSET.read_text().splitlines() if line.strip()]
    out = []
    for i in range(rows):
        base, other = sample[i % len(sample)], sample[(7 * i + 3) % len(sample)].split()
        out.append(f"{base} (variant {i // len(sample)}) {other[len(other) // 2] if other else ''}")
    return out


def main() -> None:
    """Time and measure one `similar_rows` call."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=26_000)
    args = parser.parse_args()
    from tests.benchmarks import machine

    instructions = partition(args.rows)
    tracemalloc.start()
    start = time.perf_counter()
    ranked = similar_rows(instructions, 42, 0)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"machine: {machine()}")
    print(f"{args.rows:,} rows: {seconds:.1f} s, peak traced memory {peak / 2**20:,.0f} MiB, "
          f"{max(len(r) for r in ranked)} candidates kept per row (SIMILAR_KEEP={SIMILAR_KEEP})")


if __name__ == "__main__":
    main()
