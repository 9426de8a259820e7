"""The run's logs, written into its folder (rundir.py owns the names and the writes): config.json, status.json,
metrics.jsonl (one line per round), loss.png, experiment trackers (tracking.py)."""

from __future__ import annotations

import json
import time
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.common.logger import log

from flowertune_llm.config import Config
from flowertune_llm.rundir import (
    CONFIG_FILE,
    METRICS_FILE,
    STATUS_FILE,
    read_json,
    read_metrics,
    recorded_segments,
    status_record,
    write_json,
    write_text,
)
from flowertune_llm.runs import format_duration
from flowertune_llm.strategy import RoundLog, failures_text
from flowertune_llm.tracking import Trackers


def log_validation(server_round: int, num_rounds: int, metrics: dict[str, Any]) -> None:
    """One line with the round's validation figures, the diagnostics labelled as such."""
    log(
        INFO,
        "[round %d/%d] validation MMLU (protocol, %d q): avg %.2f (stem %.2f, social %.2f, humanities %.2f) "
        "| diagnostics: letters %.1f%%, letter ceiling %.2f, largest letter %.1f%%, mean P(A/B/C/D) %s | %.1fs",
        server_round,
        num_rounds,
        metrics["val_questions"],
        100 * metrics["val_mmlu_avg"],
        100 * metrics["val_mmlu_stem"],
        100 * metrics["val_mmlu_social_sciences"],
        100 * metrics["val_mmlu_humanities"],
        100 * metrics["val_valid_letter_rate"],
        100 * metrics["val_letter_ceiling"],
        100 * (metrics.get("val_largest_letter_share") or 0.0),
        "/".join(f"{100 * v:.0f}" for v in (metrics.get("val_letter_probability") or {}).values()) or "-",
        metrics["val_eval_s"],
    )


def round_compute(clients: list[dict[str, Any]]) -> str:
    """What the round's clients computed in and why (devices.describe_compute), each distinct answer once."""
    from flowertune_llm.devices import describe_compute

    texts = sorted({describe_compute(bool(c["compute_bf16"]), int(c.get("compute_source", 0)),
                                     float(c.get("bf16_matmul_speedup", 0.0)))
                    + ("" if c.get("padding_free", 1.0) else ", padded")
                    for c in clients if "compute_bf16" in c})
    return "; ".join(texts) or "compute n/a"


def previous_segments(run_dir: Path, last_round: int) -> list[dict[str, Any]]:
    """The segments of a run folder that a resume from `last_round` continues (config.json's, each closed with its
    process's last status time); [] for a new run. A run from before segments were recorded is one segment."""
    problems: list[str] = []
    old = read_json(Path(run_dir) / CONFIG_FILE, problems) if last_round > 0 else None
    if not old:
        return []
    status = read_json(Path(run_dir) / STATUS_FILE, problems) or {}
    segments = recorded_segments(old, status)
    kept = [dict(s) for s in segments if int(s.get("first_round", 1)) <= last_round]  # a replaced continuation goes
    if kept and "ended" not in kept[-1] and status.get("updated") is not None:
        kept[-1]["ended"] = status["updated"]
    return kept


class RunLog:
    """Writes a run's config and per-round metrics; refreshes the loss plot on request."""

    def __init__(self, run_dir: Path, cfg: Config, last_round: int = 0, run_info: dict[str, Any] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # run_info: the flat run_config as Flower passed it, the node count the ServerApp saw, Flower's run id.
        # Each process that trains the run (the first, then every resume) adds a segment: which rounds it trained,
        # on how many SuperNodes, under which Flower run, from when to when; the rules judge every one.
        self._started = time.time()
        info = dict(run_info or {})
        segments = previous_segments(self.run_dir, last_round)
        segments.append({"first_round": last_round + 1, "num_nodes": info.get("num_nodes"),
                         "flower_run_id": info.get("flower_run_id"), "started": self._started})
        config = {**cfg.to_dict(), "run": {**info, "started": segments[0]["started"]}, "segments": segments}
        write_json(self.run_dir / CONFIG_FILE, config)
        # A resumed run drops lines of rounds after its checkpoint (the killed run may have more), and
        # a last line a kill cut short.
        kept = [m for m in read_metrics(self.run_dir) if m["server_round"] <= last_round]
        write_text(self.run_dir / METRICS_FILE, "".join(json.dumps(m) + "\n" for m in kept))
        self._round_times: list[float] = []
        self.trackers = Trackers(self.run_dir, cfg)

    def _write(self, record: dict[str, Any]) -> None:
        with open(self.run_dir / METRICS_FILE, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def append_baseline(self, validation: dict[str, Any]) -> None:
        """Round 0: the untrained global adapter's validation figures (the curve's first point)."""
        self._write({"server_round": 0, **validation})
        self.trackers.add({"server_round": 0, **validation})
        log_validation(0, self.cfg.num_server_rounds, validation)

    def append(self, round_log: RoundLog) -> None:
        """Add the round's line to metrics.jsonl (and the trackers' queue), log one line with an ETA."""
        record = round_log.to_record()
        self._write(record)
        self.trackers.add(record)
        self._round_times.append(round_log.wall_time_s + float(round_log.validation.get("val_eval_s", 0.0)))
        remaining = self.cfg.num_server_rounds - round_log.server_round
        eta = sum(self._round_times) / len(self._round_times) * remaining
        loss = "n/a" if round_log.train_loss is None else f"{round_log.train_loss:.4f}"
        log(
            INFO,
            "[round %d/%d] train_loss=%s lr=%.3g clients=%d failed=%s | comm %.2f MiB "
            "(total %.2f MiB, %.2f MiB with keys) | peak memory per client %s | rows %s | %s | %.1fs, ETA %s",
            round_log.server_round,
            self.cfg.num_server_rounds,
            loss,
            round_log.lr,
            round_log.replies,
            failures_text(round_log.rejected),
            record["mb_round"],
            record["mb_total"],
            record["mb_total_with_keys"],
            "n/a" if round_log.peak_mem_mb is None else f"{round_log.peak_mem_mb:,.0f} MiB",
            "n/a" if round_log.rows_new is None else f"{round_log.rows_new:,} new, {round_log.rows_covered:,} covered",
            round_compute(round_log.client_losses),
            round_log.wall_time_s,
            format_duration(eta),
        )
        if round_log.validation:
            log_validation(round_log.server_round, self.cfg.num_server_rounds, round_log.validation)

    def set_status(self, status: str, **details: Any) -> None:
        """status.json: "running" (with this process's id), "complete" or "failed" (with the error), and when."""
        write_json(self.run_dir / STATUS_FILE, status_record(status, self._started, **details))

    def checkpointed(self) -> None:
        """A checkpoint made the rounds so far final: they go to the trackers (a resume starts after them)."""
        self.trackers.flush()

    def finish(self, status: str, error: str | None = None, checkpoint: Path | None = None) -> None:
        """The run's end: status.json, then each tracker run's status (with the final checkpoint if complete)."""
        self.set_status(status, **({"error": error} if error else {}))
        self.trackers.finish(status, error, checkpoint)

    def plot(self) -> Path:
        """Redraw loss.png from metrics.jsonl."""
        from flowertune_llm.plots import plot_loss

        return plot_loss(self.run_dir, f"{Path(self.cfg.model.name).name} ({self.cfg.num_server_rounds} rounds)")
