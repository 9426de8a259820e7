"""Start Flower processes for tests and stop every one of them (and their children) by PID."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from flowertune_llm.federation import stop_process_tree

BIN = Path(sys.executable).parent


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower CLIs: isolated FLWR_HOME, this venv first on PATH, no uv installs."""
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_DISABLE_UPDATE_CHECK="1",
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def stop_tree(pid: int, timeout: float = 15.0) -> None:
    """Terminate a process and all its descendants, by PID (the product's own helper)."""
    stop_process_tree(pid, timeout)


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Block until something listens on 127.0.0.1:port, failing if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args[0]} exited with {proc.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def start_simulation_superlink(flwr_home: Path, log_file: Path) -> tuple[subprocess.Popen, str]:
    """A SuperLink in simulation mode on a free port, plus a `test` connection in FLWR_HOME."""
    port = free_port()
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    proc = subprocess.Popen(
        [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1",
         "--port", str(port), "--disable-runtime-dependency-installation"],
        env=flower_env(flwr_home),
        stdout=open(log_file, "w"),  # noqa: SIM115 (closed with the process)
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, proc)
    except BaseException:
        stop_tree(proc.pid)
        raise
    return proc, "test"


def start_deployment(flwr_home: Path, logs: Path, num_supernodes: int) -> tuple[list[subprocess.Popen], str]:
    """A SuperLink (deployment mode) and SuperNodes on loopback, insecure, free ports."""
    port = free_port()
    flwr_home.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = flower_env(flwr_home)
    procs: list[subprocess.Popen] = []
    try:
        superlink = subprocess.Popen(
            [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
             "--disable-runtime-dependency-installation"],
            env=env, stdout=open(logs / "superlink.log", "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
        )
        procs.append(superlink)
        wait_for_port(port, superlink)
        for i in range(num_supernodes):
            node = subprocess.Popen(
                [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                 "--port", str(free_port()),
                 "--node-config", f"partition-id={i} num-partitions={num_supernodes}"],
                env=env, stdout=open(logs / f"supernode-{i}.log", "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
            )
            procs.append(node)
    except BaseException:
        for proc in procs:
            stop_tree(proc.pid)
        raise
    return procs, "deploy"
