"""Run folders read back: one typed record per `results/<run>/`, the table of several, their curves.

Used by `flowertune-llm runs`, `sweep` and `submission` alike. Reads only what the ServerApp
writes (config.json, metrics.jsonl, status.json, peft_<N>/; names and tolerant readers in
rundir.py); runs from before a field existed still read, with empty cells, and a folder that
cannot be read is named while the others are listed. Light: no torch, no flwr.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowertune_llm import rules
from flowertune_llm.rundir import (
    CONFIG_FILE,
    STATUS_FILE,
    checkpoint_folders,
    live_status,
    read_json,
    read_metrics,
    recorded_segments,
)

def format_duration(seconds: float) -> str:
    """'1h02m', '3m05s', '42s'."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


#: Run-config keys that say where a run belongs or writes, not how it trains: never "differing keys".
BOOKKEEPING_KEYS = ("sweep.name", "sweep.point", "train.output-dir", "train.resume-from")


class RunsError(ValueError):
    """A path given to `runs`/`submission` is not a run folder (the message names it)."""


@dataclass
class RunRecord:
    """One run folder: its configuration, its metrics lines, its checkpoints and its status file."""

    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)
    status_file: dict[str, Any] = field(default_factory=dict)
    checkpoints: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # what the reader skipped (a cut metrics line, ...)

    @property
    def name(self) -> str:
        """The folder's name (a timestamp)."""
        return self.path.name

    @property
    def run_config(self) -> dict[str, Any]:
        """The flat run_config the run was started with ({} for runs from before it was recorded)."""
        return dict((self.config.get("run") or {}).get("run_config") or {})

    @property
    def segments(self) -> list[dict[str, Any]]:
        """The processes that trained the run, in order (the first, then each resume): `first_round`, `last_round`,
        `num_nodes`, `flower_run_id`, `started` (and `ended` once a later one took over). A run from before segments
        were recorded is one segment, read from its `run` record."""
        recorded = recorded_segments(self.config, self.status_file)
        out = []
        for i, segment in enumerate(recorded):
            nxt = recorded[i + 1]["first_round"] if i + 1 < len(recorded) else (self.num_rounds or 0) + 1
            out.append({**segment, "last_round": int(nxt) - 1})
        return out

    @property
    def num_nodes(self) -> int | None:
        """How many SuperNodes the ServerApp saw, when every segment saw the same (None: not recorded, or they
        differ: `segments` has each)."""
        counts = {s.get("num_nodes") for s in self.segments}
        return counts.pop() if len(counts) == 1 else None

    @property
    def num_rounds(self) -> int | None:
        """The rounds the run was configured for."""
        value = self.config.get("num_server_rounds", self.run_config.get("num-server-rounds"))
        return int(value) if value is not None else None

    @property
    def base_model(self) -> str:
        """`model.name` of the run."""
        return str((self.config.get("model") or {}).get("name") or self.run_config.get("model.name", ""))

    @property
    def sweep(self) -> tuple[str, str]:
        """(sweep name, point) when `flowertune-llm sweep` started the run, else ("", "")."""
        rc = self.run_config
        return str(rc.get("sweep.name", "") or ""), str(rc.get("sweep.point", "") or "")

    @property
    def trained(self) -> list[dict[str, Any]]:
        """The metrics lines of trained rounds (round 0 is the baseline evaluation only)."""
        return [m for m in self.metrics if m.get("server_round", 0) > 0]

    @property
    def rounds_done(self) -> int:
        """The last round with a metrics line."""
        return max((m["server_round"] for m in self.trained), default=0)

    @property
    def status(self) -> str:
        """complete / running at round k of n / stopped at round k of n / failed (status.json, its writer's process
        checked while it says running; else from the metrics)."""
        written = live_status(self.status_file)
        if written == "failed":
            return "failed"
        if written == "complete" or (self.num_rounds is not None and self.rounds_done >= self.num_rounds > 0):
            return "complete"
        where = f"round {self.rounds_done} of {self.num_rounds if self.num_rounds is not None else '?'}"
        return f"running at {where}" if written == "running" else f"stopped at {where}"

    @property
    def last_train_loss(self) -> float | None:
        """Train loss of the last trained round."""
        losses = [m["train_loss"] for m in self.trained if m.get("train_loss") is not None]
        return losses[-1] if losses else None

    @property
    def evaluations(self) -> list[dict[str, Any]]:
        """The metrics lines with validation figures (round 0 included)."""
        return [m for m in self.metrics if m.get("val_mmlu_avg") is not None]

    @property
    def best_validation(self) -> dict[str, Any] | None:
        """The line with the highest validation average (the earliest such round on ties)."""
        evals = self.evaluations
        return max(evals, key=lambda m: (m["val_mmlu_avg"], -m["server_round"])) if evals else None

    def _last(self, key: str) -> Any:
        """The last trained round's value of a running total (None where no line recorded it)."""
        values = [m[key] for m in self.trained if m.get(key) is not None]
        return values[-1] if values else None

    @property
    def comm_total_mb(self) -> float | None:
        """Communication of the run so far, payload MiB (1024² bytes, the leaderboard's MB), as the server logs it."""
        return self._last("mb_total")

    @property
    def comm_total_with_keys_mb(self) -> float | None:
        """The same counting key strings, as `ArrayRecord.count_bytes()` does (the budget warning's figure)."""
        return self._last("mb_total_with_keys")

    @property
    def peak_mem_mb(self) -> float | None:
        """The largest client peak memory of the run (None where not recorded)."""
        peaks = [m["peak_mem_mb"] for m in self.trained if m.get("peak_mem_mb") is not None]
        return max(peaks) if peaks else None

    @property
    def dataset(self) -> str:
        """The static dataset the run trained on."""
        return str(self.run_config.get("static.dataset.name", self.config.get("dataset_name", "")))

    @property
    def rule_violations(self) -> list[str]:
        """The leaderboard rules (rules.py) this run breaks, as far as its folder tells; the node count of every
        segment (a run resumed on another federation names the segment)."""
        lines = rules.run_violations(self.dataset, self.base_model, None, self.comm_total_with_keys_mb)
        segments = self.segments
        for i, segment in enumerate(segments, 1):
            for line in rules.run_violations(self.dataset, self.base_model, segment.get("num_nodes")):
                if line.startswith("num_nodes="):
                    where = (f"segment {i} of {len(segments)} (rounds {segment['first_round']}-{segment['last_round']}, "
                             f"Flower run {segment.get('flower_run_id')}): ") if len(segments) > 1 else ""
                    lines.append(where + line)
        return lines

    @property
    def rows_covered(self) -> int | None:
        """Distinct dataset rows trained on so far (None for runs from before it was recorded)."""
        return self._last("rows_covered")

    @property
    def coverage(self) -> float | None:
        """`rows_covered` as a share of the training dataset's rows (None where either is unknown)."""
        total = (self.config.get("run") or {}).get("dataset_rows")
        return self.rows_covered / total if self.rows_covered is not None and total else None

    @property
    def wall_time_s(self) -> float | None:
        """Every segment's start to end (the last one's end: status.json's last update), else the rounds' and
        evaluations' own times added up."""
        if "started" in self.status_file and "updated" in self.status_file:
            closed = [s for s in self.segments[:-1] if s.get("started") is not None and s.get("ended") is not None]
            earlier = sum(float(s["ended"]) - float(s["started"]) for s in closed)
            return earlier + float(self.status_file["updated"]) - float(self.status_file["started"])
        times = [float(m.get("wall_time_s") or 0) + float(m.get("val_eval_s") or 0) for m in self.metrics]
        return sum(times) if times else None

    @property
    def final_checkpoint(self) -> Path | None:
        """peft_<num rounds>/ when complete on disk (or, after a crash mid-replacement, the copy set aside)."""
        if self.num_rounds is None:
            return None
        return checkpoint_folders(self.path).get(self.num_rounds)


def read_run(path: Path) -> RunRecord:
    """One run folder; a folder without a readable config.json is refused, naming it and why."""
    path = Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise RunsError(f"{path}: not a run folder (no {CONFIG_FILE})")
    problems: list[str] = []
    config = read_json(config_file, problems)
    if config is None:
        raise RunsError(problems[0].removesuffix("; skipped"))
    status = read_json(path / STATUS_FILE, problems) or {}
    rounds = sorted(checkpoint_folders(path))
    return RunRecord(path, config, read_metrics(path, problems), status, rounds, problems)


def find_runs(paths: list[Path], problems: list[str] | None = None) -> list[RunRecord]:
    """Run folders among `paths`: each is a run folder, or a folder whose subfolders are (e.g. results/).

    A subfolder that cannot be read is named in `problems` (when given) and the others are still
    listed; so is what the reader skipped inside a run (a metrics line a kill cut short).
    """
    runs = []
    for path in paths:
        path = Path(path)
        if not path.is_dir():
            raise RunsError(f"{path}: no such folder")
        folders = [path] if (path / CONFIG_FILE).is_file() else \
            [p for p in sorted(path.iterdir()) if p.is_dir() and (p / CONFIG_FILE).is_file()]
        for folder in folders:
            try:
                runs.append(read_run(folder))
            except RunsError as exc:
                if problems is None or folder == path:
                    raise
                problems.append(f"{exc}; not listed")
    if problems is not None:
        problems.extend(p for run in runs for p in run.problems)
    return runs


def differing_keys(runs: list[RunRecord]) -> list[str]:
    """Run-config keys whose values are not the same in every listed run that recorded its run_config."""
    configs = [r.run_config for r in runs if r.run_config]
    keys = sorted({k for c in configs for k in c} - set(BOOKKEEPING_KEYS))
    missing = object()
    return [k for k in keys if len({json.dumps(c.get(k, missing), default=str) for c in configs}) > 1]


def label(run: RunRecord, keys: list[str]) -> str:
    """A run's name in a legend: its values of the keys that differ between the runs shown (else its folder)."""
    rc = run.run_config
    return " ".join(f"{k}={rc.get(k, '-')}" for k in keys) or run.name


def sort_by_best_validation(runs: list[RunRecord]) -> list[RunRecord]:
    """Best validation average first; runs without one last, newest first among them."""
    def key(run: RunRecord) -> tuple:
        best = run.best_validation
        return (best is None, -(best["val_mmlu_avg"] if best else 0.0), run.name)

    return sorted(runs, key=key)


def rows(runs: list[RunRecord]) -> tuple[list[str], list[dict[str, Any]]]:
    """The table's columns and one dict per run (values, not text), sorted by best validation average."""
    keys = differing_keys(runs)
    out = []
    for run in sort_by_best_validation(runs):
        best, evals = run.best_validation, run.evaluations
        out.append({
            "run": str(run.path),
            "status": run.status,
            "base_model": Path(run.base_model).name if rules.is_local_model(run.base_model) else run.base_model,
            **{k: run.run_config.get(k) for k in keys},
            "rounds": run.rounds_done,
            "rules": run.rule_violations,
            "last_train_loss": run.last_train_loss,
            "best_val_avg": best["val_mmlu_avg"] if best else None,
            "best_round": best["server_round"] if best else None,
            "last_val_avg": evals[-1]["val_mmlu_avg"] if evals else None,
            "valid_letters_at_best": best.get("val_valid_letter_rate") if best else None,
            "letter_ceiling_at_best": best.get("val_letter_ceiling") if best else None,
            "rows_covered": run.rows_covered,
            "coverage": run.coverage,
            "comm_mb": run.comm_total_mb,
            "peak_mem_mb": run.peak_mem_mb,
            "wall_s": run.wall_time_s,
        })
    columns = ["run", "status", "base_model", *keys, "rounds", "rules", "last_train_loss", "best_val_avg", "best_round",
               "last_val_avg", "valid_letters_at_best", "letter_ceiling_at_best", "rows_covered", "coverage", "comm_mb",
               "peak_mem_mb", "wall_s"]
    return columns, out


_PERCENT = {"best_val_avg", "last_val_avg", "valid_letters_at_best", "letter_ceiling_at_best", "coverage"}


def _cell(column: str, value: Any) -> str:
    if value is None:
        return ""
    if column in _PERCENT:
        return f"{100 * value:.2f}"
    if column == "last_train_loss":
        return f"{value:.4f}"
    if column in ("comm_mb", "peak_mem_mb"):
        return f"{value:,.1f}"
    if column == "rules":
        return "ok" if not value else f"{len(value)} broken"
    if column == "rows_covered":
        return f"{value:,}"
    if column == "wall_s":
        return format_duration(value)
    if column == "run":
        return Path(value).name
    return str(value)


def format_table(runs: list[RunRecord], fmt: str = "table") -> str:
    """The runs as an aligned text table (percentages for accuracies), or as json / csv with raw values."""
    columns, table = rows(runs)
    if fmt == "json":
        return json.dumps(table, indent=1, default=str)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: "; ".join(v) if isinstance(v, list) else v for k, v in row.items()} for row in table)
        return buffer.getvalue()
    headers = {"best_val_avg": "best val %", "best_round": "@round", "last_val_avg": "last val %",
               "valid_letters_at_best": "letters %", "letter_ceiling_at_best": "ceiling %", "rows_covered": "rows",
               "coverage": "rows %", "comm_mb": "comm MiB",
               "peak_mem_mb": "peak MiB", "wall_s": "wall", "last_train_loss": "loss", "base_model": "base model"}
    text = [[headers.get(c, c) for c in columns]] + [[_cell(c, row[c]) for c in columns] for row in table]
    widths = [max(len(r[i]) for r in text) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in text]
    note = ("letters % and ceiling % at the best round: diagnostics, not leaderboard figures; rules: the leaderboard "
            "rules the run breaks (`--format json` lists them)")
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:], note])
