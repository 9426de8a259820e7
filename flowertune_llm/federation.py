"""The local federation: 20 simulated SuperNodes for plain `flwr run .`, and stopping its SuperLink."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from flowertune_llm.rules import NUM_SUPERNODES


def configure_local_federation(
    num_supernodes: int = NUM_SUPERNODES,
    num_cpus: int = 4,
    num_gpus: float = 0.0,
    connection: str = "local",
) -> Path:
    """Write simulation options into a SuperLink connection of `$FLWR_HOME/config.toml`."""
    from flwr.cli.flower_config import read_flower_config, write_flower_config

    if num_supernodes < 1 or num_cpus < 1 or num_gpus < 0:
        raise ValueError(
            f"num_supernodes={num_supernodes}, num_cpus={num_cpus}, num_gpus={num_gpus}: "
            "need >= 1, >= 1 and >= 0"
        )
    config, _ = read_flower_config()
    conn = config.setdefault("superlink", {}).setdefault(connection, {})
    conn.setdefault("address", ":local:")
    conn["options"] = {
        "num-supernodes": num_supernodes,
        "backend": {"client-resources": {"num-cpus": num_cpus, "num-gpus": num_gpus}},
    }
    return write_flower_config(config)


#: GPU memory one 135M client needs at batch 16 x 512 with headroom (the seed reports 8.03 GB; not yet measured here).
CLIENT_GPU_MEMORY_BYTES = 10 * 10**9
#: Clients trained per round at the defaults (strategy.fraction-train 0.1 of 20 SuperNodes).
CLIENTS_PER_ROUND = 2


def detected_gpu_memory() -> list[int]:
    """Total memory of each GPU this process can see (empty without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]


def default_gpu_share(gpu_memory: list[int]) -> tuple[float, str]:
    """The GPU share per ClientApp for this machine, and why.

    A round trains 2 clients by default. Several GPUs: one GPU each (1.0), so Ray spreads them
    over the devices. One GPU with room for both clients of a round: 0.5 each, so they train at
    once. Otherwise 1.0: one client at a time. No GPU: 0 (clients train on CPU).
    """
    if not gpu_memory:
        return 0.0, "no GPU found: clients train on CPU"
    if len(gpu_memory) > 1:
        return 1.0, f"{len(gpu_memory)} GPUs: one GPU per client, so a round's clients train on different GPUs"
    room = gpu_memory[0] // CLIENT_GPU_MEMORY_BYTES
    if room >= CLIENTS_PER_ROUND:
        return 1.0 / CLIENTS_PER_ROUND, (
            f"one GPU with {gpu_memory[0] / 1e9:.0f} GB: 0.5 per client, so both clients of a round train at once "
            f"(~{CLIENT_GPU_MEMORY_BYTES // 10**9} GB each at batch 16)"
        )
    return 1.0, f"one GPU with {gpu_memory[0] / 1e9:.0f} GB: one client at a time"


def local_superlink_processes(flwr_home: Path | None = None) -> list[Any]:
    """This user's `flower-superlink` processes that `flwr run` started for this FLWR_HOME."""
    import getpass

    import psutil
    from flwr.supercore.utils import get_flwr_home

    log_file = str(Path(flwr_home or get_flwr_home()) / "local-superlink" / "superlink.log")
    found = []
    for proc in psutil.process_iter(["cmdline", "username"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["username"] != getpass.getuser() or not any("flower-superlink" in c for c in cmdline[:2]):
            continue
        if "--log-file" in cmdline and cmdline[cmdline.index("--log-file") + 1 :][:1] == [log_file]:
            found.append(proc)
    return found


def stop_process_tree(pid: int, timeout: float = 15.0, graceful: bool = True) -> None:
    """Terminate a process and all its descendants (collected first), then kill stragglers; `graceful=False`:
    SIGKILL them all at once (a machine lost: no chance to say goodbye)."""
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = [root, *root.children(recursive=True)]
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate() if graceful else proc.kill()
    _, alive = psutil.wait_procs(procs, timeout=timeout if graceful else 10)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)


def stop_local_superlink(flwr_home: Path | None = None, timeout: float = 15.0) -> list[int]:
    """Stop the local SuperLink of this FLWR_HOME and everything it started; the PIDs stopped."""
    stopped = []
    for root in local_superlink_processes(flwr_home):
        stop_process_tree(root.pid, timeout)
        stopped.append(root.pid)
    return stopped
