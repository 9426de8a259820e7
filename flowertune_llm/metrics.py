"""The run folder's logs: config.json, metrics.jsonl (one line per round), loss.png, TensorBoard."""

from __future__ import annotations

import json
import os
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.common.logger import log

from flowertune_llm.config import Config, ConfigError
from flowertune_llm.strategy import RoundLog

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
PLOT_FILE = "loss.png"


def check_tensorboard(cfg: Config) -> None:
    """Refuse `metrics.tensorboard = true` early when TensorBoard is not installed."""
    if cfg.comm.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError("metrics.tensorboard=True: `pip install tensorboard` first") from None


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """All lines of a run's metrics.jsonl (empty if none)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def format_duration(seconds: float) -> str:
    """'1h02m', '3m05s', '42s'."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def plot_loss(run_dir: Path, title: str) -> Path:
    """Draw `loss.png` (weighted train loss per round) from a run's metrics.jsonl, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = [m for m in read_metrics(run_dir) if m.get("train_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([m["server_round"] for m in rows], [m["train_loss"] for m in rows], marker=".")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("train loss (weighted by examples)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(run_dir) / PLOT_FILE
    tmp = Path(run_dir) / f".{PLOT_FILE}.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


class RunLog:
    """Writes a run's config and per-round metrics; refreshes the loss plot on request."""

    def __init__(self, run_dir: Path, cfg: Config, last_round: int = 0) -> None:
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.run_dir / CONFIG_FILE, json.dumps(cfg.to_dict(), indent=2, default=str))
        # A resumed run drops lines of rounds after its checkpoint (the killed run may have more).
        kept = [m for m in read_metrics(self.run_dir) if m["server_round"] <= last_round]
        _atomic_write(self.run_dir / METRICS_FILE, "".join(json.dumps(m) + "\n" for m in kept))
        self._round_times: list[float] = []
        self._writer = None
        if cfg.comm.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def append(self, round_log: RoundLog) -> None:
        """Add the round's line to metrics.jsonl, log one line with an ETA, feed TensorBoard."""
        record = round_log.to_record()
        with open(self.run_dir / METRICS_FILE, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        self._round_times.append(round_log.wall_time_s)
        remaining = self.cfg.num_server_rounds - round_log.server_round
        eta = sum(self._round_times) / len(self._round_times) * remaining
        loss = "n/a" if round_log.train_loss is None else f"{round_log.train_loss:.4f}"
        log(
            INFO,
            "[round %d/%d] train_loss=%s lr=%.3g clients=%d failed=%d | comm %.2f MB "
            "(total %.2f MB, %.2f MB with keys) | %.1fs, ETA %s",
            round_log.server_round,
            self.cfg.num_server_rounds,
            loss,
            round_log.lr,
            round_log.replies,
            round_log.failures,
            record["mb_round"],
            record["mb_total"],
            record["mb_total_with_keys"],
            round_log.wall_time_s,
            format_duration(eta),
        )
        if self._writer is not None:
            step = round_log.server_round
            if round_log.train_loss is not None:
                self._writer.add_scalar("train/loss", round_log.train_loss, step)
            self._writer.add_scalar("train/lr", round_log.lr, step)
            self._writer.add_scalar("comm/total_mb", record["mb_total"], step)
            self._writer.flush()

    def plot(self) -> Path:
        """Redraw loss.png from metrics.jsonl."""
        return plot_loss(self.run_dir, f"{Path(self.cfg.model.name).name} ({self.cfg.num_server_rounds} rounds)")

    def close(self) -> None:
        """Flush and close TensorBoard, if used."""
        if self._writer is not None:
            self._writer.close()
