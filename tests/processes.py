"""Start Flower processes for tests and stop every one of them (and their children) by PID."""

from __future__ import annotations

import os
import re
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


def round_lines(log: str) -> list[tuple[str, str, str, str]]:
    """(round, clients, failed, loss) from the server's per-round log lines."""
    found = re.findall(r"\[round (\d+)/\d+\] train_loss=(\S+) lr=\S+ clients=(\d+) failed=(\d+)", log)
    return [(rnd, clients, failed, loss) for rnd, loss, clients, failed in found]


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
    flwr_home.mkdir(parents=True, exist_ok=True)
    proc, port = start_superlink(flower_env(flwr_home), log_file, certs=None, simulation=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    return proc, "test"


def spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start a command with stdout+stderr into `log`."""
    return subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)  # noqa: SIM115


def start_superlink(
    env: dict[str, str], log: Path, certs: Path | None, simulation: bool = False
) -> tuple[subprocess.Popen, int]:
    """A SuperLink on a free loopback port: TLS + SuperNode auth from `certs`, else insecure; deployment or simulation."""
    port = free_port()
    security = (
        ["--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.pem"),
         "--ssl-keyfile", str(certs / "server.key"), "--enable-supernode-auth"]
        if certs else ["--insecure"]
    )
    proc = spawn([str(BIN / "flower-superlink"), *security, *["--simulation"] * simulation, "--host", "127.0.0.1",
                  "--port", str(port), "--disable-runtime-dependency-installation"], env, log)
    try:
        wait_for_port(port, proc)
    except BaseException:
        stop_tree(proc.pid)
        raise
    return proc, port


def start_supernode(
    env: dict[str, str], superlink_port: int, log: Path, partition: int, num_partitions: int,
    root_ca: Path | None = None, key: Path | None = None,
) -> subprocess.Popen:
    """A SuperNode for one IID partition: trusting `root_ca` and authenticating with `key`, else insecure."""
    security = ["--root-certificates", str(root_ca)] if root_ca else ["--insecure"]
    if key:
        security += ["--auth-supernode-private-key", str(key)]
    return spawn(
        [str(BIN / "flower-supernode"), *security, "--superlink", f"127.0.0.1:{superlink_port}",
         "--port", str(free_port()), "--node-config", f"partition-id={partition} num-partitions={num_partitions}"],
        env, log,
    )
