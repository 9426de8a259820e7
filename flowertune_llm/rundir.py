"""The run folder, owned in one place: its file names, its atomic writes, its statuses and a reader that survives.

A run folder is `results/<timestamp>/` with config.json, status.json, metrics.jsonl, loss.png and
`peft_<N>/` checkpoints. Files are written whole (temp file, fsync, rename, fsync of the folder)
and folders too (temp sibling, rename; a replaced folder is swapped in one step), so a crash or a
power loss leaves the old version or the new one, never a mixture; both get the permissions an
ordinary write would (the umask's), not the owner-only ones of a temp file. Reading tolerates
what a kill can leave (a half-written last metrics line) and names what it cannot use, so one
bad run never hides the others. Light: no torch, no flwr.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.json"
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
#: The run's experiment-tracker run ids (tracking.py): a resume continues the same tracker runs.
TRACKING_FILE = "tracking.json"
CHECKPOINT_NAME = re.compile(r"^peft_(\d+)$")
#: What resume needs beside the PEFT files of a checkpoint.
METADATA_FILE = "flowertune_state.json"
#: PEFT's two files of an adapter folder.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: The files of a complete checkpoint folder.
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, METADATA_FILE)
#: What `flowertune-eval` writes beside the official files, and an entry carries.
RESULTS_FILE = "results.json"
#: Where resume moves the checkpoints of rounds after the one it continues from.
ABANDONED_DIR = "abandoned"
#: A folder set aside while it is being replaced (the fallback where the swap is not available).
_PREVIOUS = ".{name}.previous"

#: What status.json can say, and what the reader makes of "running" when the process is gone.
STATUSES = ("running", "complete", "stopped", "failed")


def umask() -> int:
    """This process's umask, read without changing it where Linux tells it (os.umask's set-and-restore races threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _ordinary_mode(path: Path, mask: int) -> None:
    """Give a temp file or folder the mode an ordinary open()/mkdir() would have under umask `mask` (mkstemp/mkdtemp
    make it 0600/0700)."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's entries to disk (a folder: where the file system allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def writing(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path` (same suffix) to write; on success it becomes `path` in one rename, with an
    ordinary file's permissions, flushed to disk before the rename and the folder's entry after it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _ordinary_mode(tmp, umask())
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_text(path: Path, text: str) -> None:
    """Write a text file whole (`writing`)."""
    with writing(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, data: Any) -> None:
    """`write_text` of indented JSON."""
    write_text(path, json.dumps(data, indent=2, default=str))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    return False  # EINVAL/ENOSYS: the file system cannot swap; the caller falls back


def recover(folder: Path) -> None:
    """Put back a folder that a replacement set aside and a crash left there (the fallback's one gap)."""
    folder = Path(folder)
    previous = folder.with_name(_PREVIOUS.format(name=folder.name))
    if previous.is_dir() and not folder.exists():
        previous.rename(folder)


@contextlib.contextmanager
def write_folder(dest: Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temp sibling of `dest` to fill; on success it becomes `dest` in one rename, on failure it is removed.

    `replace=True` replaces an existing `dest` by swapping the two in one step, so there is never a
    moment without a complete `dest` (where the file system cannot swap: set aside, rename, and
    `recover` puts the old one back after a crash in between). `replace=False` refuses an existing one.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        mask = umask()
        _ordinary_mode(tmp, mask)
        for inner in sorted(tmp.rglob("*"), reverse=True):  # every file, then its folders, on disk before the rename
            _ordinary_mode(inner, mask)  # copies (shutil.copy2) of owner-only files too
            _fsync(inner)
        _fsync(tmp)
        if not dest.exists():
            tmp.rename(dest)
            _fsync(dest.parent)
            return
        if not replace:
            raise FileExistsError(f"{dest} exists; not overwriting it")
        if _exchange(tmp, dest):  # tmp now holds the old folder
            _fsync(dest.parent)
            shutil.rmtree(tmp, ignore_errors=True)
            return
        previous = dest.with_name(_PREVIOUS.format(name=dest.name))
        shutil.rmtree(previous, ignore_errors=True)
        dest.rename(previous)
        tmp.rename(dest)
        _fsync(dest.parent)
        shutil.rmtree(previous, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def new_run_dir(output_dir: str | Path, suffix: str = "") -> Path:
    """`<output_dir>/<timestamp>[_<suffix>]` (not created yet: nothing is written before the run starts)."""
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S") + (f"_{suffix}" if suffix else "")
    path = Path(output_dir).expanduser().resolve() / stamp
    suffix = 1
    while path.exists():
        path = path.with_name(f"{stamp}_{suffix}")
        suffix += 1
    return path


def checkpoint_name(server_round: int) -> str:
    """`peft_<N>`: the folder name of the checkpoint after round N (CHECKPOINT_NAME reads it back)."""
    return f"peft_{server_round}"


def checkpoint_round(folder: Path) -> int | None:
    """N of a `peft_<N>` folder, else None."""
    match = CHECKPOINT_NAME.match(Path(folder).name)
    return int(match.group(1)) if match else None


def is_complete(folder: Path) -> bool:
    """A checkpoint folder with all its files (a temp folder from a crash never is)."""
    return checkpoint_round(folder) is not None and is_complete_files(folder)


def checkpoint_folders(run_dir: Path) -> dict[int, Path]:
    """Round -> complete checkpoint folder of a run, without changing anything: a `peft_<N>` that a replacement
    set aside (and a crash left there, `recover`) counts where `peft_<N>` itself is missing."""
    found: dict[int, Path] = {}
    for folder in Path(run_dir).iterdir():
        name = folder.name
        if name.startswith(".") and name.endswith(".previous"):
            name = name[1:].removesuffix(".previous")
        server_round = checkpoint_round(Path(name))
        if server_round is None or not folder.is_dir() or not is_complete_files(folder):
            continue
        if folder.name == name or server_round not in found:
            found[server_round] = folder
    return found


def is_complete_files(folder: Path) -> bool:
    """A folder holding every file of a checkpoint (whatever its name)."""
    return all((Path(folder) / f).is_file() for f in ADAPTER_FILES)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete `peft_<N>` with the highest N in a run folder, if any (after `recover`ing any set aside)."""
    for previous in Path(run_dir).glob(_PREVIOUS.format(name="peft_*")):
        recover(previous.with_name(previous.name[1:].removesuffix(".previous")))
    done = [p for p in Path(run_dir).iterdir() if p.is_dir() and is_complete(p)]
    return max(done, key=lambda p: checkpoint_round(p) or 0, default=None)


def set_aside_checkpoints_after(run_dir: Path, server_round: int) -> Path | None:
    """Move `peft_<N>` with N > `server_round` into `abandoned/<timestamp>/` (what a resume from that round does,
    so the run's checkpoints are all of this continuation); the folder they went to, or None if there were none."""
    later = [p for p in Path(run_dir).iterdir() if p.is_dir() and (checkpoint_round(p) or 0) > server_round]
    if not later:
        return None
    target = Path(run_dir) / ABANDONED_DIR / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    target.mkdir(parents=True, exist_ok=True)
    for folder in later:
        folder.rename(target / folder.name)
    return target


def recorded_segments(config: dict[str, Any], status: dict[str, Any]) -> list[dict[str, Any]]:
    """The segments a run's config.json records (each process that trained it); a run from before segments were
    recorded is one segment, from its `run` record and status.json's start."""
    info = config.get("run") or {}
    return config.get("segments") or [{"first_round": 1, "num_nodes": info.get("num_nodes"),
                                       "flower_run_id": info.get("flower_run_id"), "started": status.get("started")}]


def status_record(status: str, started: float, **details: Any) -> dict[str, Any]:
    """What status.json holds: the status, when, and which process on which host writes it."""
    if status not in STATUSES:
        raise ValueError(f"status {status!r}: expected one of {STATUSES}")
    return {"status": status, "started": started, "updated": time.time(), "pid": os.getpid(),
            "host": socket.gethostname(), **details}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def live_status(record: dict[str, Any]) -> str | None:
    """The status a status.json stands for now: "running" only while its writer lives (checked on the same host;
    a run on another host is taken at its word); "stopped" for a run whose process is gone; None if unwritten."""
    written = record.get("status")
    if written != "running":
        return written
    pid, host = record.get("pid"), record.get("host")
    if pid is None or host is None:  # written before pids were recorded: nothing says it still runs
        return "stopped"
    if host != socket.gethostname():
        return "running"
    return "running" if _alive(int(pid)) else "stopped"


def read_json(path: Path, problems: list[str]) -> dict[str, Any] | None:
    """A JSON file's object, or None with the reason added to `problems` (missing files are not problems)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        problems.append(f"{path}: unreadable ({type(exc).__name__}: {exc}); skipped")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path}: not a JSON object; skipped")
        return None
    return data


def read_metrics(run_dir: Path, problems: list[str] | None = None) -> list[dict[str, Any]]:
    """The lines of a run's metrics.jsonl; a line a kill cut short (or any unreadable one) is left out and named."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    out = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if problems is not None:
                problems.append(f"{path}:{number}: not a complete JSON line (a run killed while writing?); left out")
            continue
        if isinstance(record, dict) and "server_round" in record:
            out.append(record)
    return out
