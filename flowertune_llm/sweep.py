"""`flowertune-llm sweep`: one `flwr run` per point of a grid, each checked first, each outcome read from Flower.

The real Flower path (the SuperLink of the chosen connection, the app's own pyproject), one run
after another. Every point is validated offline before the first run starts. A run's outcome is
Flower's own status (`flwr ls --run-id`); a failed point is reported and the sweep goes on.
Each run records the sweep's name and the point in its config.json (`sweep.name`, `sweep.point`
run-config keys) with its whole run config: a point counts as done only when a complete run of it
has the very settings asked for now (other settings under the same name are refused). A point
that failed before writing a run folder gets a small folder of its own (config.json +
status.json), so `flowertune-llm runs` lists every point. Ctrl-C or an error at any moment (while
`flwr run` starts, or while `flwr ls` is polled) stops the run the sweep started.
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
from flowertune_llm.rundir import CONFIG_FILE, STATUS_FILE, new_run_dir, status_record, write_folder
from flowertune_llm.runs import BOOKKEEPING_KEYS, RunRecord, find_runs

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


def flwr_json(out: str, key: str) -> dict[str, Any]:
    """The JSON object holding `key` in a `flwr ... --format json` output, whatever lines surround it."""
    decoder = json.JSONDecoder()
    for start in (i for i, c in enumerate(out) if c == "{"):
        try:
            value, _ = decoder.raw_decode(out, start)
        except ValueError:
            continue
        if isinstance(value, dict) and key in value:
            return value
    raise RuntimeError(f"flwr printed no JSON object with '{key}': {out.strip()[-300:]!r}")


class FlowerCli:
    """The `flwr` commands a sweep needs, on one SuperLink connection."""

    def __init__(self, app: Path, connection: str | None, env: dict[str, str] | None = None) -> None:
        local = Path(sys.executable).parent / "flwr"
        self.flwr = str(local) if local.exists() else (shutil.which("flwr") or "flwr")
        self.app = str(app)
        self.connection = [connection] if connection else []
        self.env = env

    def _run(self, args: list[str], timeout: float = 300) -> str:
        try:
            proc = subprocess.run([self.flwr, *args], capture_output=True, text=True, env=self.env, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"flwr {args[0]} did not answer within {timeout:.0f} s") from None
        if proc.returncode != 0:
            raise RuntimeError(f"flwr {args[0]} failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()[-500:]}")
        return proc.stdout

    def start(self, run_config: str, federation_config: str | None) -> str:
        """`flwr run --format json`: the new run's id."""
        args = ["run", self.app, *self.connection, "--format", "json", "--run-config", run_config]
        if federation_config:
            args += ["--federation-config", federation_config]
        payload = flwr_json(self._run(args), "run-id")
        if not payload.get("success"):
            raise RuntimeError(f"flwr run did not start the run: {payload}")
        return str(payload["run-id"])

    def status(self, run_id: str) -> tuple[str, str]:
        """(status, details) from `flwr ls --run-id --format json`."""
        out = self._run(["ls", *self.connection, "--run-id", run_id, "--format", "json"], timeout=60)
        (run,) = flwr_json(out, "runs")["runs"]
        return str(run.get("status", "")), str(run.get("status-details", ""))

    def runs(self) -> dict[str, str]:
        """Every run on the SuperLink: run id -> status (`flwr ls --format json`)."""
        out = self._run(["ls", *self.connection, "--format", "json"], timeout=60)
        return {str(r["run-id"]): str(r.get("status", "")) for r in flwr_json(out, "runs")["runs"]}

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
    return [r for r in find_runs([output_dir], problems=[]) if r.sweep[0] == name]  # unreadable folders: not ours


def _run_dir_of(output_dir: Path, run_id: str) -> Path | None:
    for run in find_runs([output_dir], problems=[]) if output_dir.is_dir() else []:
        if str((run.config.get("run") or {}).get("flower_run_id", "")) == run_id:
            return run.path
    return None


def record_failed_point(output_dir: Path, run_config: dict[str, Any], run_id: str, details: str) -> Path:
    """A run folder for a point that failed before its ServerApp wrote one: config.json + status.json, atomically."""
    folder = new_run_dir(output_dir, suffix=f"failed-{run_id}")
    rounds = run_config.get("num-server-rounds")
    with write_folder(folder) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(
            {"num_server_rounds": rounds, "model": {"name": run_config.get("model.name", "")},
             "run": {"run_config": run_config, "flower_run_id": run_id}}, indent=2, default=str))
        (tmp / STATUS_FILE).write_text(json.dumps(status_record("failed", time.time(), error=details)))
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
    done = completed_points(points, sweep_runs(output_dir, name), fixed, defaults)  # refuses other settings
    outcomes: list[Outcome] = []
    for i, point in enumerate(points, 1):
        if point.label in done:
            say(f"[{i}/{len(points)}] {point.label}: already complete in this sweep, skipped")
            outcomes.append(Outcome(point, "skipped"))
            continue
        run_config = {**fixed, **dict(point.overrides), "sweep.point": point.label}
        run_id = start_run(cli, run_config, federation_config, say)
        say(f"[{i}/{len(points)}] {point.label}: run {run_id} started")
        try:
            status, details = cli.status(run_id)
            while not status.startswith(FINISHED):
                time.sleep(poll_s)
                status, details = cli.status(run_id)
        except BaseException as exc:  # Ctrl-C, or flwr ls failing: the run must not go on unwatched
            reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"{exc}"
            say(f"[{i}/{len(points)}] {reason}: stopping run {run_id} (finished points stay as they are)")
            stop_quietly(cli, run_id, say)
            raise
        run_dir = _run_dir_of(output_dir, run_id)
        if status != f"{FINISHED}completed" and run_dir is None:
            run_dir = record_failed_point(output_dir, {**defaults, **run_config}, run_id, details)
        outcomes.append(Outcome(point, status, run_id, details, str(run_dir or "")))
        say(f"[{i}/{len(points)}] {point.label}: {status}" + (f" ({details})" if details and "completed" not in status else ""))
    return outcomes


def completed_points(
    points: list[Point], runs: list[RunRecord], fixed: dict[str, Any], defaults: dict[str, Any]
) -> set[str]:
    """Labels of the points this sweep already completed with these very settings; a point that was run with
    other settings (another --run-config under the same --name) is refused, naming the differences."""
    done = set()
    for point in points:
        resolved = {**defaults, **fixed, **dict(point.overrides)}
        for run in (r for r in runs if r.sweep[1] == point.label and r.run_config):
            diffs = [f"{k}: {run.run_config.get(k)!r} -> {resolved.get(k)!r}" for k in sorted(set(resolved) | set(run.run_config))
                     if k not in BOOKKEEPING_KEYS and run.run_config.get(k) != resolved.get(k)]
            if diffs:
                raise ConfigError(f"sweep {fixed['sweep.name']!r} ran {point.label} with other settings "
                                  f"({'; '.join(diffs)}); give this sweep another --name")
            if run.status == "complete":
                done.add(point.label)
    return done


def start_run(cli: FlowerCli, run_config: dict[str, Any], federation_config: str | None,
              say: Callable[[str], None]) -> str:
    """`flwr run` of one point; interrupted or failing while it starts, any run it submitted is stopped.

    flwr lists no run config, so the run is found as the one that was not on the SuperLink before
    (the sweep starts one run at a time on its connection).
    """
    before = set(cli.runs())
    try:
        return cli.start(run_config_arg(run_config), federation_config)
    except BaseException:
        try:
            started = {rid: s for rid, s in cli.runs().items() if rid not in before and not s.startswith(FINISHED)}
        except Exception as exc:  # noqa: BLE001 - the original error is the one to report
            say(f"could not list the runs to stop one submitted while starting: {exc}")
            raise
        for run_id in started:
            say(f"stopping run {run_id}, submitted while `flwr run` was interrupted")
            stop_quietly(cli, run_id, say)
        raise


def stop_quietly(cli: FlowerCli, run_id: str, say: Callable[[str], None]) -> None:
    """`flwr stop`, saying (not raising) when even that fails: the original error is the one to report."""
    try:
        cli.stop(run_id)
    except Exception as exc:  # noqa: BLE001
        say(f"could not stop run {run_id} ({exc}); stop it with `flwr stop {run_id}`")


def default_sweep_name() -> str:
    """sweep-<timestamp>: a new name per invocation unless --name resumes one."""
    return datetime.now().strftime("sweep-%Y-%m-%d_%H-%M-%S")


def flower_env() -> dict[str, str]:
    """This process's environment for the `flwr` calls (the app's dependencies are this environment's)."""
    env = dict(os.environ)
    env.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    return env
