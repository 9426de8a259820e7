"""`flowertune-llm sweep`: one `flwr run` per point of a grid, each checked first, each outcome read from Flower.

The real Flower path (the SuperLink of the chosen connection, the app's own pyproject), one run
after another. Every point is validated offline before the first run starts. A run's outcome is
Flower's own status (`flwr ls --run-id`); a failed point is reported and the sweep goes on.
Each run records the sweep's name and the point in its config.json (`sweep.name`, `sweep.point`
run-config keys); a point that failed before writing a run folder gets a small folder of its
own (config.json + status.json), so `flowertune-llm runs` lists every point.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from flowertune_llm.config import ConfigError, check_overrides, run_config_arg
from flowertune_llm.metrics import CONFIG_FILE, STATUS_FILE
from flowertune_llm.runs import RunRecord, find_runs

FINISHED = "finished:"


@dataclass(frozen=True)
class Point:
    """One point of a sweep: its overrides and their canonical text (its identity across resumes)."""

    overrides: tuple[tuple[str, Any], ...]

    @property
    def label(self) -> str:
        """`key=value ...` in run-config syntax."""
        return run_config_arg(dict(self.overrides))


@dataclass
class Outcome:
    """What happened to one point."""

    point: Point
    status: str  # finished:completed / finished:failed / finished:stopped / skipped (already complete)
    run_id: str = ""
    details: str = ""
    run_dir: str = ""


def parse_value(text: str) -> Any:
    """A TOML scalar (5e-5, 3, true, 'qa'), or the bare text as a string (qa)."""
    try:
        return tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        return text.strip()


def grid_points(grids: list[str]) -> list[Point]:
    """`--grid "key=v1,v2"` options -> the product of their values, in the order given."""
    axes = []
    for grid in grids:
        key, sep, values = grid.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise ConfigError(f"--grid {grid!r}: expected key=value1,value2,...")
        axes.append([(key.strip(), parse_value(v)) for v in values.split(",")])
    return [Point(tuple(combo)) for combo in itertools.product(*axes)] if axes else []


def file_points(path: Path) -> list[Point]:
    """A TOML file of points: `[grid]` (key = [values], producted) and/or `[[point]]` tables (one point each)."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"--points {path}: {exc}") from exc
    points = []
    if "grid" in data:
        axes = [[(k, v) for v in (values if isinstance(values, list) else [values])] for k, values in data["grid"].items()]
        points += [Point(tuple(combo)) for combo in itertools.product(*axes)]
    for table in data.get("point", []):
        points.append(Point(tuple(table.items())))
    if not points:
        raise ConfigError(f"--points {path}: no [grid] table and no [[point]] tables")
    return points


def check_points(points: list[Point], fixed: dict[str, Any], defaults: dict[str, Any]) -> None:
    """`flowertune-llm check` of every point before any run: the first bad one fails the whole sweep."""
    if not points:
        raise ConfigError("no points: give --grid key=v1,v2 (repeatable) or --points FILE.toml")
    labels = [p.label for p in points]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ConfigError(f"the same point twice: {duplicates[0]}")
    for i, point in enumerate(points, 1):
        try:
            check_overrides({**fixed, **dict(point.overrides)}, defaults)
        except ConfigError as exc:
            raise ConfigError(f"point {i} ({point.label}): {exc}") from exc


class FlowerCli:
    """The `flwr` commands a sweep needs, on one SuperLink connection."""

    def __init__(self, app: Path, connection: str | None, env: dict[str, str] | None = None) -> None:
        local = Path(sys.executable).parent / "flwr"
        self.flwr = str(local) if local.exists() else (shutil.which("flwr") or "flwr")
        self.app = str(app)
        self.connection = [connection] if connection else []
        self.env = env

    def _run(self, args: list[str], timeout: float = 300) -> str:
        proc = subprocess.run([self.flwr, *args], capture_output=True, text=True, env=self.env, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"flwr {args[0]} failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()[-500:]}")
        return proc.stdout

    def start(self, run_config: str, federation_config: str | None) -> str:
        """`flwr run --format json`: the new run's id."""
        args = ["run", self.app, *self.connection, "--format", "json", "--run-config", run_config]
        if federation_config:
            args += ["--federation-config", federation_config]
        out = self._run(args)
        payload = json.loads(out[out.index("{"):])
        if not payload.get("success"):
            raise RuntimeError(f"flwr run did not start the run: {payload}")
        return str(payload["run-id"])

    def status(self, run_id: str) -> tuple[str, str]:
        """(status, details) from `flwr ls --run-id --format json`."""
        out = self._run(["ls", *self.connection, "--run-id", run_id, "--format", "json"], timeout=60)
        (run,) = json.loads(out[out.index("{"):])["runs"]
        return str(run.get("status", "")), str(run.get("status-details", ""))

    def stop(self, run_id: str) -> None:
        """`flwr stop`: ends the run on the SuperLink (its finished rounds and checkpoints stay)."""
        self._run(["stop", run_id, *self.connection], timeout=60)


def sweep_output_dir(fixed: dict[str, Any], defaults: dict[str, Any]) -> Path:
    """Where the sweep's runs write: `train.output-dir` (fixed value, else the app's default), made absolute here."""
    return Path(str(fixed.get("train.output-dir") or defaults.get("train.output-dir", "results"))).expanduser().resolve()


def sweep_runs(output_dir: Path, name: str) -> list[RunRecord]:
    """The run folders of this sweep under `output_dir`."""
    if not output_dir.is_dir():
        return []
    return [r for r in find_runs([output_dir]) if r.sweep[0] == name]


def _run_dir_of(output_dir: Path, run_id: str) -> Path | None:
    for run in find_runs([output_dir]) if output_dir.is_dir() else []:
        if str((run.config.get("run") or {}).get("flower_run_id", "")) == run_id:
            return run.path
    return None


def record_failed_point(output_dir: Path, run_config: dict[str, Any], run_id: str, details: str) -> Path:
    """A run folder for a point that failed before its ServerApp wrote one: config.json + status.json, atomically."""
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    folder = output_dir / f"{stamp}_failed-{run_id}"
    tmp = output_dir / f".{folder.name}.tmp"
    tmp.mkdir(parents=True)
    rounds = run_config.get("num-server-rounds")
    (tmp / CONFIG_FILE).write_text(json.dumps(
        {"num_server_rounds": rounds, "model": {"name": run_config.get("model.name", "")},
         "run": {"run_config": run_config, "flower_run_id": run_id}}, indent=2, default=str))
    now = time.time()
    (tmp / STATUS_FILE).write_text(json.dumps({"status": "failed", "error": details, "started": now, "updated": now}))
    tmp.rename(folder)
    return folder


def run_sweep(
    name: str,
    points: list[Point],
    fixed: dict[str, Any],
    defaults: dict[str, Any],
    cli: FlowerCli,
    federation_config: str | None = None,
    poll_s: float = 2.0,
    say: Callable[[str], None] = print,
) -> list[Outcome]:
    """Check every point, then run them one after another; Ctrl-C stops the running one with `flwr stop`."""
    output_dir = sweep_output_dir(fixed, defaults)
    fixed = {**fixed, "train.output-dir": str(output_dir), "sweep.name": name}
    check_points(points, fixed, defaults)  # before anything runs
    done = {r.sweep[1] for r in sweep_runs(output_dir, name) if r.status == "complete"}
    outcomes: list[Outcome] = []
    for i, point in enumerate(points, 1):
        if point.label in done:
            say(f"[{i}/{len(points)}] {point.label}: already complete in this sweep, skipped")
            outcomes.append(Outcome(point, "skipped"))
            continue
        run_config = {**fixed, **dict(point.overrides), "sweep.point": point.label}
        run_id = cli.start(run_config_arg(run_config), federation_config)
        say(f"[{i}/{len(points)}] {point.label}: run {run_id} started")
        try:
            status, details = cli.status(run_id)
            while not status.startswith(FINISHED):
                time.sleep(poll_s)
                status, details = cli.status(run_id)
        except KeyboardInterrupt:
            say(f"[{i}/{len(points)}] interrupted: stopping run {run_id} (finished points stay as they are)")
            cli.stop(run_id)
            raise
        run_dir = _run_dir_of(output_dir, run_id)
        if status != f"{FINISHED}completed" and run_dir is None:
            run_dir = record_failed_point(output_dir, {**defaults, **run_config}, run_id, details)
        outcomes.append(Outcome(point, status, run_id, details, str(run_dir or "")))
        say(f"[{i}/{len(points)}] {point.label}: {status}" + (f" ({details})" if details and "completed" not in status else ""))
    return outcomes


def default_sweep_name() -> str:
    """sweep-<timestamp>: a new name per invocation unless --name resumes one."""
    return datetime.now().strftime("sweep-%Y-%m-%d_%H-%M-%S")


def flower_env() -> dict[str, str]:
    """This process's environment for the `flwr` calls (the app's dependencies are this environment's)."""
    env = dict(os.environ)
    env.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    return env
