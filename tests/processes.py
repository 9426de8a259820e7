"""Start Flower processes for tests and stop every one of them (and their children) by PID."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from flowertune_llm.federation import stop_process_tree
from tests.helpers import ROOT

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


def stop_tree(pid: int, timeout: float = 15.0, graceful: bool = True) -> None:
    """Terminate (or, not graceful, SIGKILL) a process and all its descendants, by PID (the product's own helper)."""
    stop_process_tree(pid, timeout, graceful)


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


def start_simulation_superlink(
    flwr_home: Path, log_file: Path, extra_env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, str]:
    """A SuperLink in simulation mode on a free port, plus a `test` connection in FLWR_HOME (its ServerApp and
    ClientApps inherit its environment: `extra_env` reaches them)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    proc, port = start_superlink({**flower_env(flwr_home), **(extra_env or {})}, log_file, certs=None,
                                 simulation=True)
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


FAULT_HOOKS = Path(__file__).parent / "faults"  # sitecustomize.py: FLOWERTUNE_TEST_HANG_ROUND


def flwr(env: dict[str, str], *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """One `flwr` CLI call (not checked)."""
    return subprocess.run([str(BIN / "flwr"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def registered_nodes(env: dict[str, str], connection: str) -> dict[str, str]:
    """node id -> status, from `flwr supernode ls --format json`."""
    out = flwr(env, "supernode", "ls", connection, "--format", "json")
    assert out.returncode == 0, out.stdout + out.stderr
    return {n["node-id"]: n["status"] for n in json.loads(out.stdout)["nodes"]}


class Federation:
    """A TLS SuperLink with SuperNode authentication on loopback and registered SuperNodes, as docs/deployment.md
    runs them; `close` stops every process it started, by PID. With `database`, the SuperLink keeps its state
    (registered nodes, runs) in that SQLite file across `restart_superlink`."""

    CONNECTION = "secure"

    def __init__(self, root: Path, max_nodes: int, database: Path | None = None) -> None:
        from flowertune_llm.cli import main as flowertune_cli

        self.root, self.database = root, database
        self.certs, self.home, self.logs = root / "certs", root / "flwr-home", root / "logs"
        self.home.mkdir(parents=True)
        self.logs.mkdir()
        assert flowertune_cli(["certs", "--out", str(self.certs), "--host", "localhost", "--host", "127.0.0.1",
                               "--supernodes", str(max_nodes)]) == 0
        self.env = flower_env(self.home)
        self.port = free_port()
        self.superlink: subprocess.Popen | None = None
        self.nodes: dict[int, subprocess.Popen] = {}  # key index -> SuperNode process
        self.node_ids: dict[int, str] = {}  # key index -> registered node id
        self.others: list[subprocess.Popen] = []
        self._superlinks = 0
        self.start_superlink()
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{self.CONNECTION}"\n\n[superlink.{self.CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{self.certs / "ca.crt"}"\n'
        )

    def start_superlink(self) -> None:
        """(Re)start the SuperLink on the federation's port (one HTTP port serves SuperNodes and the `flwr` CLI)."""
        self._superlinks += 1
        security = ["--ssl-ca-certfile", str(self.certs / "ca.crt"), "--ssl-certfile", str(self.certs / "server.pem"),
                    "--ssl-keyfile", str(self.certs / "server.key"), "--enable-supernode-auth"]
        database = ["--database", str(self.database)] if self.database else []
        self.superlink = spawn([str(BIN / "flower-superlink"), *security, *database, "--host", "127.0.0.1",
                                "--port", str(self.port), "--disable-runtime-dependency-installation"],
                               self.env, self.logs / f"superlink-{self._superlinks}.log")
        wait_for_port(self.port, self.superlink)

    def kill_superlink(self) -> None:
        """SIGKILL the SuperLink and everything it started (its ServerApp): the machine went down."""
        assert self.superlink is not None
        stop_tree(self.superlink.pid, graceful=False)
        self.superlink = None

    def add_node(self, key: int, partition: int, num_partitions: int, hang_round: int | None = None) -> str:
        """Register SuperNode key `key` and start it for `partition`; its node id. `hang_round`: its training step
        blocks in that round (tests/faults/sitecustomize.py)."""
        out = flwr(self.env, "supernode", "register", str(self.certs / f"supernode_{key}.pub"), self.CONNECTION,
                   "--format", "json")
        assert out.returncode == 0, out.stdout + out.stderr
        self.node_ids[key] = str(json.loads(out.stdout)["node-id"])
        env = dict(self.env)
        if hang_round is not None:
            env.update(PYTHONPATH=f"{FAULT_HOOKS}{os.pathsep}{env.get('PYTHONPATH', '')}",
                       FLOWERTUNE_TEST_HANG_ROUND=str(hang_round),
                       FLOWERTUNE_TEST_HANG_MARK=str(self.hang_mark(key)))
        self.nodes[key] = start_supernode(env, self.port, self.logs / f"supernode-{key}.log", partition,
                                          num_partitions, root_ca=self.certs / "ca.crt",
                                          key=self.certs / f"supernode_{key}")
        return self.node_ids[key]

    def start_unregistered(self, key: int, partition: int, num_partitions: int, root_ca: Path, log: str
                           ) -> subprocess.Popen:
        """A SuperNode with key `key` that was not registered here (or that trusts another CA): refused."""
        proc = start_supernode(self.env, self.port, self.logs / f"{log}.log", partition, num_partitions,
                               root_ca=root_ca, key=self.certs / f"supernode_{key}")
        self.others.append(proc)
        return proc

    def add_connection(self, name: str, root_ca: Path) -> None:
        """Another `flwr` connection to this SuperLink in config.toml, trusting `root_ca`."""
        with open(self.home / "config.toml", "a") as toml:
            toml.write(f'\n[superlink.{name}]\naddress = "127.0.0.1:{self.port}"\nroot-certificates = "{root_ca}"\n')

    def stop_node(self, key: int) -> None:
        """Stop SuperNode `key` (SIGTERM, then SIGKILL after 15 s): it leaves the federation."""
        stop_tree(self.nodes[key].pid)

    def kill_node(self, key: int) -> None:
        """SIGKILL SuperNode `key` and its ClientApps: the machine is lost, no goodbye to the SuperLink."""
        stop_tree(self.nodes[key].pid, graceful=False)

    def hang_mark(self, key: int) -> Path:
        """The file a SuperNode's ClientApp writes when its training step blocks."""
        return self.root / f"hanging-{key}"

    def wait_online(self, keys: list[int], timeout: float = 120.0) -> None:
        """Block until these SuperNodes are online at the SuperLink."""
        want = {self.node_ids[k] for k in keys}
        deadline = time.monotonic() + timeout
        while not want <= {n for n, s in registered_nodes(self.env, self.CONNECTION).items() if s == "online"}:
            assert time.monotonic() < deadline, f"SuperNodes {sorted(want)} never came online"
            time.sleep(1)

    def run(self, overrides: dict, log: Path, *args: str) -> subprocess.Popen:
        """`flwr run . secure --stream` of this app with these run-config overrides, output into `log`."""
        from flowertune_llm.config import run_config_arg

        proc = spawn([str(BIN / "flwr"), "run", str(ROOT), self.CONNECTION, "--stream", "--run-config",
                      run_config_arg(overrides), *args], self.env, log)
        self.others.append(proc)
        return proc

    def close(self) -> None:
        """Stop every process this federation started, by PID."""
        for proc in [*self.others, *self.nodes.values(), *([self.superlink] if self.superlink else [])]:
            stop_tree(proc.pid)
