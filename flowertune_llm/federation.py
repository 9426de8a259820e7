"""Make plain `flwr run .` simulate the leaderboard's 20 SuperNodes (flwr >= 1.42 config)."""

from __future__ import annotations

from pathlib import Path

from flowertune_llm.config import LEADERBOARD_NUM_SUPERNODES


def configure_local_federation(
    num_supernodes: int = LEADERBOARD_NUM_SUPERNODES,
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
