"""Deployment Engine with TLS and SuperNode authentication on loopback, as docs/deployment.md says to run it.

One SuperLink (TLS + `--enable-supernode-auth`), two registered SuperNodes, 2 rounds of the app via
`flwr run . <connection>`; beside them a SuperNode whose key was never registered, a SuperNode that
does not trust the CA, and a `flwr` client that does not trust it. Every process is stopped by PID.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx
import psutil
import pytest
from flwr.cli.flower_config import read_superlink_connection
from flwr.cli.utils import init_http_client_from_connection
from flwr.proto.control_pb2 import ListRunsRequest  # pylint: disable=no-name-in-module
from peft import PeftModel
from transformers import AutoModelForCausalLM

from flowertune_llm.cli import main as flowertune_cli
from flowertune_llm.config import parse_config, run_config_arg
from flowertune_llm.models import adapter_state, initial_adapter
from flowertune_llm.rundir import read_metrics
from tests.helpers import ROOT, tiny_overrides, tiny_run_config
from tests.processes import (
    BIN,
    flower_env,
    round_lines,
    start_superlink,
    start_supernode,
    stop_tree,
)

pytestmark = pytest.mark.e2e


def flwr(env: dict[str, str], *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """One `flwr` CLI call (not checked)."""
    return subprocess.run([str(BIN / "flwr"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def registered_nodes(env: dict[str, str], connection: str) -> dict[str, str]:
    """node id -> status, from `flwr supernode ls --format json`."""
    out = flwr(env, "supernode", "ls", connection, "--format", "json")
    assert out.returncode == 0, out.stdout + out.stderr
    return {n["node-id"]: n["status"] for n in json.loads(out.stdout)["nodes"]}


def test_tls_supernode_auth_two_rounds_and_unregistered_or_untrusting_parties_are_refused(
    tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    certs, other_ca = tmp_path / "certs", tmp_path / "other-ca"
    assert flowertune_cli(["certs", "--out", str(certs), "--host", "localhost", "--host", "127.0.0.1",
                           "--supernodes", "3"]) == 0
    assert flowertune_cli(["certs", "--out", str(other_ca), "--host", "127.0.0.1"]) == 0
    home, logs = tmp_path / "flwr-home", tmp_path / "logs"
    home.mkdir()
    logs.mkdir()
    env = flower_env(home)
    procs: list[subprocess.Popen] = []
    try:
        superlink, port = start_superlink(env, logs / "superlink.log", certs)
        procs.append(superlink)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "secure"\n\n'
            f'[superlink.secure]\naddress = "127.0.0.1:{port}"\nroot-certificates = "{certs / "ca.crt"}"\n\n'
            f'[superlink.untrusted]\naddress = "127.0.0.1:{port}"\nroot-certificates = "{other_ca / "ca.crt"}"\n'
        )
        node_ids = set()
        for i in (0, 1):
            out = flwr(env, "supernode", "register", str(certs / f"supernode_{i}.pub"), "secure", "--format", "json")
            assert out.returncode == 0, out.stdout + out.stderr
            node_ids.add(str(json.loads(out.stdout)["node-id"]))
        for i in (0, 1):
            procs.append(start_supernode(env, port, logs / f"supernode-{i}.log", i, 2,
                                         root_ca=certs / "ca.crt", key=certs / f"supernode_{i}"))
        # supernode_2's key was never registered; the untrusting node has a registered key but another CA
        unregistered = start_supernode(env, port, logs / "unregistered.log", 1, 2,
                                       root_ca=certs / "ca.crt", key=certs / "supernode_2")
        untrusting = start_supernode(env, port, logs / "untrusting.log", 1, 2,
                                     root_ca=other_ca / "ca.crt", key=certs / "supernode_1")
        procs += [unregistered, untrusting]

        # A `flwr` client that trusts another CA: the CLI fails, and flwr's own client says why.
        refused_cli = flwr(env, "ls", "untrusted")
        assert refused_cli.returncode != 0 and "unavailable" in refused_cli.stdout + refused_cli.stderr
        monkeypatch.setenv("FLWR_HOME", str(home))
        client = init_http_client_from_connection(read_superlink_connection("untrusted"))
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            client.ListRuns(ListRunsRequest())
        client.close()

        # Both outsiders give up on their own (no retry limit was set) and say why.
        assert unregistered.wait(timeout=120) != 0
        assert "Failed to activate SuperNode" in (logs / "unregistered.log").read_text()
        assert "No SuperNode found with the given public key" in (logs / "superlink.log").read_text()
        assert untrusting.wait(timeout=120) != 0
        assert "CERTIFICATE_VERIFY_FAILED" in (logs / "untrusting.log").read_text()

        deadline = time.monotonic() + 120
        while (nodes := registered_nodes(env, "secure")) != dict.fromkeys(node_ids, "online"):
            assert time.monotonic() < deadline, f"nodes never came online: {nodes}"
            time.sleep(2)

        overrides = tiny_overrides(tiny_llama_dir, **{"num-server-rounds": 2,
                                                      "train.output-dir": str(tmp_path / "results")})
        run = flwr(env, "run", str(ROOT), "secure", "--stream", "--run-config", run_config_arg(overrides),
                   timeout=600)
        log = run.stdout + run.stderr
        assert run.returncode == 0, log[-3000:]
        assert [r[:3] for r in round_lines(log)] == [("1", "2", "0"), ("2", "2", "0")], log[-3000:]
        assert set(registered_nodes(env, "secure")) == node_ids  # the refused key never became a node
    finally:
        for proc in procs:
            stop_tree(proc.pid)
    for proc in procs:
        assert not psutil.pid_exists(proc.pid) or psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE

    (checkpoint,) = list((tmp_path / "results").glob("*/peft_2"))
    metrics = read_metrics(checkpoint.parent)
    assert [sorted(c["partition"] for c in m["client_losses"]) for m in metrics] == [[0, 1], [0, 1]]
    trained = adapter_state(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                                                      str(checkpoint)))
    assert set(trained) == set(initial_adapter(parse_config(tiny_run_config(tiny_llama_dir)).model, 42)[0])
