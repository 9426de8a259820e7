"""Experiment trackers beside metrics.jsonl: TensorBoard, W&B, MLflow, trackio (`tracking.*` keys).

The ServerApp opens ONE tracker run per Flower run; its id is kept in the run folder (`tracking.json`), so a
resume continues the same tracker run. Rounds reach the trackers when a checkpoint makes them final (the rounds
a resume keeps; a round after the last checkpoint of a killed run is logged once, by the resume). Offline first:
W&B offline (`wandb sync` later), MLflow on a SQLite file in the output folder, trackio's local database.
"""

from __future__ import annotations

import importlib.util
import json
import re
import time
from logging import WARNING
from pathlib import Path
from typing import Any, Protocol

from flwr.common.logger import log

from flowertune_llm.config import Config, ConfigError
from flowertune_llm.rundir import TRACKING_FILE, read_json, write_json

INSTALL = 'pip install "flowertune-llm[tracking]"'
#: metrics.jsonl fields -> tracker names (TRL's `train/loss`, `train/learning_rate`); val_* -> validation/*,
#: mb_* -> comm/*; per client: client/<partition>/loss and /peak_mem_mb.
NAMES = {"train_loss": "train/loss", "lr": "train/learning_rate", "replies": "federation/clients",
         "failures": "federation/failed", "peak_mem_mb": "federation/peak_mem_mb", "wall_time_s": "federation/round_s",
         "rows_new": "data/rows_new", "rows_covered": "data/rows_covered"}


def backends(cfg: Config) -> list[str]:
    """The trackers of a run: `tracking.backends`, plus TensorBoard for `metrics.tensorboard = true`."""
    names = list(cfg.tracking.backends)
    if cfg.comm.tensorboard and "tensorboard" not in names:
        names.append("tensorboard")
    return names


def check_backends(cfg: Config) -> None:
    """Refuse, before anything slow, a tracker whose library is not installed (one line: the key and the fix)."""
    for name in backends(cfg):
        if importlib.util.find_spec(name) is None:  # each backend's module is its name (and TRL's report_to)
            key = f"tracking.backends={name}" if name in cfg.tracking.backends else "metrics.tensorboard=true"
            raise ConfigError(f"{key}: {name} is not installed; {INSTALL} (or pip install {name})")


def mlflow_uri(cfg: Config) -> str:
    """`tracking.uri`, or the SQLite file beside the run folders (`mlflow ui --backend-store-uri <it>`)."""
    return cfg.tracking.uri or f"sqlite:///{Path(cfg.train.output_dir).resolve() / 'mlflow.db'}"


def client_reporting(cfg: Config, run_name: str) -> dict[str, Any]:
    """`tracking.clients = true`: TRL's own `report_to` with the run's backends, set up as the server's (project,
    W&B mode, MLflow store) through the environment variables TRL's integrations read."""
    import os

    for key, value in (("WANDB_MODE", cfg.tracking.wandb_mode), ("WANDB_PROJECT", cfg.tracking.project),
                       ("MLFLOW_TRACKING_URI", mlflow_uri(cfg)), ("MLFLOW_EXPERIMENT_NAME", cfg.tracking.project),
                       ("TRACKIO_PROJECT", cfg.tracking.project)):
        os.environ.setdefault(key, value)
    return {"report_to": backends(cfg), "run_name": run_name}


def tracker_metrics(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl line as tracker metrics (numbers only)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or key == "server_round":
            continue
        if key in NAMES:
            out[NAMES[key]] = float(value)
        elif key.startswith("val_"):
            out[f"validation/{key.removeprefix('val_')}"] = float(value)
        elif key.startswith("mb_"):
            out[f"comm/{key}"] = float(value)
    for client in record.get("client_losses", []):
        for field in ("loss", "peak_mem_mb"):
            if client.get("partition") is not None and isinstance(client.get(field), int | float):
                out[f"client/{client['partition']}/{field}"] = float(client[field])
    return out


def artifact_name(run_id: str, name: str) -> str:
    """`<run>-<folder>` in the characters W&B and trackio accept in an artifact name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{run_id}-{name}")


def flat_params(cfg: Config) -> dict[str, str]:
    """The resolved config as flat `section.key` strings (a tracker run's parameters)."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = json.dumps(value, default=str) if isinstance(value, list | tuple) else str(value)

    walk("", cfg.to_dict())
    return out


class Tracker(Protocol):
    """One backend's run."""

    run_id: str

    def log(self, rows: list[tuple[dict[str, float], int]]) -> None: ...
    def artifact(self, folder: Path, name: str) -> None: ...
    def finish(self, status: str, error: str | None) -> None: ...


class TensorBoardTracker:
    """`results/<run>/tensorboard`: scalars per round (a resume appends to the same folder)."""

    def __init__(self, run_dir: Path, **_: Any) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.run_id = "tensorboard"
        self._writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, rows: list[tuple[dict[str, float], int]]) -> None:
        for metrics, step in rows:
            for key, value in metrics.items():
                self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def artifact(self, folder: Path, name: str) -> None:
        """TensorBoard keeps no files."""

    def finish(self, status: str, error: str | None) -> None:
        self._writer.close()


class WandbTracker:
    """A W&B run in `results/<run>/wandb`, resumed by id. Offline (`tracking.wandb-mode`, the default), W&B writes a
    run's file only when the run finishes, so a killed process would lose every round: the run is finished after
    each batch of rounds and resumed for the next (one `offline-run-*` folder each; `wandb sync` takes them all)."""

    def __init__(self, run_dir: Path, cfg: Config, run_id: str | None, name: str, params: dict[str, str]) -> None:
        import wandb
        from wandb.sdk.lib.runid import generate_id

        self._wandb = wandb
        tracking = cfg.tracking
        self._init = dict(
            project=tracking.project, id=run_id or generate_id(), resume="allow", name=name,
            group=tracking.sweep_name or None, tags=[t for t in (tracking.sweep_name, tracking.sweep_point) if t] or None,
            dir=str(run_dir), mode=tracking.wandb_mode, reinit="create_new", allow_val_change=True,
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
        )
        self._per_batch = tracking.wandb_mode == "offline"
        self.run = wandb.init(config=params, **self._init)
        self.run_id = self.run.id
        self._done()

    def _active(self) -> Any:
        if self.run is None:
            self.run = self._wandb.init(**self._init)
        return self.run

    def _done(self, exit_code: int = 0) -> None:
        if self._per_batch and self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None

    def log(self, rows: list[tuple[dict[str, float], int]]) -> None:
        run = self._active()
        for metrics, step in rows:
            run.log(metrics, step=step)
        self._done()

    def artifact(self, folder: Path, name: str) -> None:
        art = self._wandb.Artifact(name=artifact_name(self.run_id, name), type="model")
        art.add_dir(str(folder))
        self._active().log_artifact(art)

    def summary(self, values: dict[str, float]) -> None:
        """Figures of the whole run (W&B's steps only grow: the entry's scores go to the summary)."""
        self._active().summary.update(values)

    def finish(self, status: str, error: str | None) -> None:
        run = self._active()
        run.summary["status"] = status
        run.summary["error"] = error or ""  # a resume that completes clears the failed process's error
        run.finish(exit_code=0 if status == "complete" else 1)
        self.run = None


class MlflowTracker:
    """An MLflow run (`tracking.uri`; default a SQLite file beside the run folders, artifacts in mlartifacts/)."""

    def __init__(self, run_dir: Path, cfg: Config, run_id: str | None, name: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        output = Path(cfg.train.output_dir).resolve()
        self.client = MlflowClient(tracking_uri=mlflow_uri(cfg))
        experiment = self.client.get_experiment_by_name(cfg.tracking.project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            cfg.tracking.project, artifact_location=(output / "mlartifacts").as_uri())
        if run_id is None:
            tags = {"mlflow.runName": name, "run_dir": str(run_dir.resolve())}
            tags.update({f"sweep.{k}": v for k, v in (("name", cfg.tracking.sweep_name),
                                                       ("point", cfg.tracking.sweep_point)) if v})
            run_id = self.client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        logged = self.client.get_run(run_id).data.params
        changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v[:6000])
        new = [Param(k, v[:6000]) for k, v in params.items() if k not in logged]
        for i in range(0, len(new), 100):
            self.client.log_batch(run_id, params=new[i:i + 100])
        if changed:  # MLflow keeps a parameter's first value: a resume's changes go to a tag
            self.client.set_tag(run_id, f"resumed.changed.{int(time.time())}", ", ".join(changed)[:5000])

    def log(self, rows: list[tuple[dict[str, float], int]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for metrics, step in rows for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])

    def artifact(self, folder: Path, name: str) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path=name)

    def finish(self, status: str, error: str | None) -> None:
        self.client.set_tag(self.run_id, "status", status)
        if error:
            self.client.set_tag(self.run_id, "error", error[:5000])
        elif "error" in self.client.get_run(self.run_id).data.tags:  # a resume that completes clears it
            self.client.delete_tag(self.run_id, "error")
        self.client.set_terminated(self.run_id, status="FINISHED" if status == "complete" else "FAILED")


class TrackioTracker:
    """A trackio run in trackio's local database (`TRACKIO_DIR`), resumed by name."""

    def __init__(self, run_dir: Path, cfg: Config, run_id: str | None, name: str, params: dict[str, str]) -> None:
        import trackio

        self._trackio = trackio
        self.run_id = run_id or name
        self.run = trackio.init(project=cfg.tracking.project, name=self.run_id, group=cfg.tracking.sweep_name or None,
                                config=params, resume="allow" if run_id else "never",
                                auto_log_cpu=False, auto_log_gpu=False)

    def log(self, rows: list[tuple[dict[str, float], int]]) -> None:
        for metrics, step in rows:
            self.run.log(metrics, step=step)

    def artifact(self, folder: Path, name: str) -> None:
        self.run.log_artifact(str(folder), name=artifact_name(self.run_id, name), type="model")

    def finish(self, status: str, error: str | None) -> None:
        self.run.finish()


TRACKERS: dict[str, Any] = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker,
                            "trackio": TrackioTracker}


class Trackers:
    """The run's trackers: opened (or resumed) once per process, fed whole rounds, closed with the run's status."""

    def __init__(self, run_dir: Path, cfg: Config) -> None:
        self.run_dir = Path(run_dir)
        self.names = backends(cfg)
        self._pending: list[dict[str, Any]] = []
        self.trackers: dict[str, Tracker] = {}
        if not self.names:
            return
        problems: list[str] = []
        ids: dict[str, str] = (read_json(self.run_dir / TRACKING_FILE, problems) or {}).get("runs", {})
        # the run folder's name is unique in its output folder (trackio knows a run by its name alone)
        name = f"{cfg.tracking.sweep_point} {self.run_dir.name}" if cfg.tracking.sweep_point else self.run_dir.name
        params = flat_params(cfg)
        for backend in self.names:
            self.trackers[backend] = TRACKERS[backend](run_dir=self.run_dir, cfg=cfg, run_id=ids.get(backend),
                                                       name=name, params=params)
            ids[backend] = self.trackers[backend].run_id
        write_json(self.run_dir / TRACKING_FILE, {"runs": ids})

    def add(self, record: dict[str, Any]) -> None:
        """A metrics.jsonl line; it reaches the trackers at the next `flush` (a checkpoint)."""
        if self.trackers:
            self._pending.append(record)

    def flush(self) -> None:
        """Log the rounds a checkpoint has made final, `server_round` as the step."""
        rows = [(tracker_metrics(record), int(record["server_round"])) for record in self._pending]
        self._pending = []
        for backend, tracker in self.trackers.items() if rows else ():
            try:
                tracker.log(rows)
            except Exception as exc:  # noqa: BLE001  a tracker's trouble must not stop the training
                log(WARNING, "tracking: %s could not log rounds %d-%d: %s", backend, rows[0][1], rows[-1][1], exc)

    def finish(self, status: str, error: str | None = None, checkpoint: Path | None = None) -> None:
        """The final checkpoint as an artifact, then each run's status (complete / failed with the error)."""
        for backend, tracker in self.trackers.items():
            try:
                if checkpoint is not None:
                    tracker.artifact(checkpoint, checkpoint.name)
                tracker.finish(status, error)
            except Exception as exc:  # noqa: BLE001  a tracker must not turn a finished run into a failed one
                log(WARNING, "tracking: %s could not close its run: %s", backend, exc)
        self.trackers = {}


def log_entry(run_dir: Path, cfg: Config, entry: Path, scores: dict[str, float]) -> list[str]:
    """`submission`: the entry folder and its scores into the run's tracker runs (resumed by id); the backends."""
    trackers = Trackers(run_dir, cfg)
    for tracker in trackers.trackers.values():
        values = {f"entry/{k}": float(v) for k, v in scores.items()}
        if isinstance(tracker, WandbTracker):
            tracker.summary(values)
        else:
            tracker.log([(values, cfg.num_server_rounds)])
        tracker.artifact(entry, "entry")
    names = list(trackers.trackers)
    trackers.finish("complete")
    return names
