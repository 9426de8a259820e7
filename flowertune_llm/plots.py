"""Every plot of the app in one place: a run's loss.png and the `runs --plot` comparison (matplotlib, Agg)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from flowertune_llm.rundir import PLOT_FILE, read_metrics, writing

if TYPE_CHECKING:
    from flowertune_llm.runs import RunRecord


def plot_loss(run_dir: Path, title: str) -> Path:
    """Draw `loss.png` from metrics.jsonl, atomically: train loss per round, and (when the run
    evaluates) validation MMLU accuracy under the protocol with its letter diagnostics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    metrics = read_metrics(run_dir)
    rows = [m for m in metrics if m.get("train_loss") is not None]
    evals = [m for m in metrics if m.get("val_mmlu_avg") is not None]
    fig, axes = plt.subplots(2 if evals else 1, 1, figsize=(7, 6.5 if evals else 4), sharex=True, squeeze=False)
    ax = axes[0][0]
    ax.plot([m["server_round"] for m in rows], [m["train_loss"] for m in rows], marker=".")
    ax.set_ylabel("train loss (weighted by examples)")
    ax.set_title(title, fontsize=9)
    if evals:
        ax2 = axes[1][0]
        x = [m["server_round"] for m in evals]
        ax2.plot(x, [100 * m["val_mmlu_avg"] for m in evals], marker="o", label="MMLU accuracy (protocol, avg)")
        ax2.plot(x, [100 * m["val_letter_ceiling"] for m in evals], "--", marker=".", label="letter ceiling (diagnostic)")
        ax2.plot(x, [100 * m["val_valid_letter_rate"] for m in evals], ":", marker=".", label="valid letters % (diagnostic)")
        ax2.set_ylabel(f"validation, {evals[-1].get('val_questions', '?')} questions (%)")
        ax2.set_ylim(0, 100)
        ax2.legend(fontsize=8)
    for row in axes:
        row[0].grid(alpha=0.3)
        row[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1][0].set_xlabel("round")
    fig.tight_layout()
    path = Path(run_dir) / PLOT_FILE
    with writing(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return path


def plot_runs(runs: list[RunRecord], path: Path) -> Path:
    """One PNG: validation average (left) and train loss (right) per round, one curve per run, labelled by differing keys."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from flowertune_llm.runs import differing_keys, label

    keys = differing_keys(runs)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in runs:
        name = label(run, keys)
        evals = run.evaluations
        left.plot([m["server_round"] for m in evals], [100 * m["val_mmlu_avg"] for m in evals], marker="o", label=name)
        trained = [m for m in run.trained if m.get("train_loss") is not None and math.isfinite(m["train_loss"])]
        right.plot([m["server_round"] for m in trained], [m["train_loss"] for m in trained], marker=".", label=name)
    left.set_title("validation MMLU average (protocol, %)", fontsize=10)
    right.set_title("train loss", fontsize=10)
    left.set_ylim(0, 100)
    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    with writing(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return path
