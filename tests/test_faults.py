"""A real federation under faults, on loopback with TLS and SuperNode authentication (docs/deployment.md): a ClientApp
that hangs inside training, a SuperNode killed while it trains, one that joins late, the SuperLink killed and
restarted, too few SuperNodes left. Each fault costs at most its own round and the log names the node and partition.
Every process is started by tests.processes.Federation and stopped by PID."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import psutil
import pytest
from flwr.cli.flower_config import read_superlink_connection
from flwr.cli.utils import init_http_client_from_connection
from flwr.proto.control_pb2 import ListRunsRequest  # pylint: disable=no-name-in-module
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from flowertune_llm.cli import main as flowertune_cli
from flowertune_llm.models import adapter_state, initial_adapter
from flowertune_llm.config import parse_config
from flowertune_llm.rundir import STATUS_FILE, is_complete, read_metrics
from tests.helpers import tiny_overrides, tiny_run_config
from tests.processes import Federation, flwr, registered_nodes, round_lines

pytestmark = pytest.mark.e2e

FAIL_LINE = re.compile(r"\[round (\d+)/\d+\] .* failed=(\d+)(?: \((.*?)\))? \|")


def wait_for(what: str, condition, timeout: float, run=None) -> None:  # noqa: ANN001
    """Poll `condition` until true; fail naming `what` after `timeout` s or when the `flwr run` process ended."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        assert run is None or run.poll() is None, f"`flwr run` ended (rc {run.returncode}) before {what}"
        time.sleep(0.5)


def training_clientapp(node: psutil.Popen, min_cpu_s: float = 2.0) -> bool:
    """True once a ClientApp of this SuperNode process has computed for a while (it is training)."""
    try:
        children = psutil.Process(node.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return False
    for child in children:
        try:
            if "clientapp" in child.name() and child.cpu_times().user >= min_cpu_s:
                return True
        except psutil.NoSuchProcess:
            continue
    return False


def test_tls_federation_refuses_outsiders_and_a_hanging_client_a_killed_and_a_late_supernode_cost_one_round(
    tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TLS + SuperNode authentication: a SuperNode whose key was never registered, one that trusts another CA and a
    `flwr` client that trusts another CA are refused, each saying why.
    Round 1: partitions 0, 1, 2. Round 2: partition 3's SuperNode (started once the run began) joins; partition
    2's ClientApp blocks inside its training step (its SuperNode stays online); partition 1's SuperNode is SIGKILLed
    while it trains. The round ends with the two replies it has, at the round timeout: the killed node named by
    Flower's heartbeat if it expired first (Node Unavailable), the hanging one as "no reply in 60 s". Round 3
    does not wait for the hanging node again (not sampled: its SuperNode takes no message until it replies) and
    completes on partitions 0 and 3. The final checkpoint loads."""
    other_ca = tmp_path / "other-ca"
    assert flowertune_cli(["certs", "--out", str(other_ca), "--host", "127.0.0.1"]) == 0
    fed = Federation(tmp_path, max_nodes=5)
    fed.add_connection("untrusted", other_ca / "ca.crt")
    log = tmp_path / "run.log"
    try:
        ids = {p: fed.add_node(p, p, 4, hang_round=2 if p == 2 else None) for p in (0, 1, 2)}
        unregistered = fed.start_unregistered(4, 1, 4, fed.certs / "ca.crt", "unregistered")  # key 4: never registered
        untrusting = fed.start_unregistered(1, 1, 4, other_ca / "ca.crt", "untrusting")  # registered key, other CA
        refused_cli = flwr(fed.env, "ls", "untrusted")
        assert refused_cli.returncode != 0 and "unavailable" in refused_cli.stdout + refused_cli.stderr
        monkeypatch.setenv("FLWR_HOME", str(fed.home))
        client = init_http_client_from_connection(read_superlink_connection("untrusted"))
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            client.ListRuns(ListRunsRequest())
        client.close()
        fed.wait_online([0, 1, 2])
        overrides = tiny_overrides(tiny_llama_dir, **{
            "num-server-rounds": 3, "strategy.fraction-train": 1.0, "strategy.round-timeout": 60,
            "train.output-dir": str(tmp_path / "results"),
        })
        run = fed.run(overrides, log)
        wait_for("round 1 to start", lambda: "round 1: sampled partitions" in log.read_text(), 300, run)
        ids[3] = fed.add_node(3, 3, 4)  # joins while round 1 trains
        wait_for("round 2 to start", lambda: "round 2: sampled partitions" in log.read_text(), 300, run)
        wait_for("partition 1 to train in round 2", lambda: training_clientapp(fed.nodes[1]), 120, run)
        fed.kill_node(1)
        wait_for("the run to end", lambda: run.poll() is not None, 400)
        text = log.read_text()
        assert run.returncode == 0, text[-3000:]
        round2_s = float(re.search(r"\[round 2/3\] .* \| ([0-9.]+)s, ETA", text).group(1))
        # Both outsiders give up on their own (no retry limit was set) and say why; neither became a node.
        assert unregistered.wait(timeout=120) != 0
        assert "Failed to activate SuperNode" in (fed.logs / "unregistered.log").read_text()
        assert "No SuperNode found with the given public key" in (fed.logs / "superlink-1.log").read_text()
        assert untrusting.wait(timeout=120) != 0
        assert "CERTIFICATE_VERIFY_FAILED" in (fed.logs / "untrusting.log").read_text()
        assert set(registered_nodes(fed.env, fed.CONNECTION)) == set(ids.values())
    finally:
        fed.close()
    for proc in [*fed.nodes.values(), *fed.others, fed.superlink]:
        assert not psutil.pid_exists(proc.pid) or psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE

    assert fed.hang_mark(2).is_file()  # the ClientApp really blocked inside a training step
    lines = {int(r): (int(n), why) for r, n, why in FAIL_LINE.findall(text)}
    assert [r[:3] for r in round_lines(text)] == [("1", "3", "0"), ("2", "2", "2"), ("3", "2", "0")], text[-4000:]
    n, why = lines[2]
    # the killed node: Flower's heartbeat (2 x 30 s) or the round timeout, whichever comes first
    assert re.search(rf"node {ids[1]}, partition 1: (client error: Error: Node Unavailable|no reply in 60 s)", why), why
    assert f"node {ids[2]}, partition 2: no reply in 60 s" in why, why
    assert round2_s < 80  # the round costs its timeout, no more
    assert re.search(rf"round 3: node {ids[2]} \(partition 2\) has not answered a message sent \d+ s ago", text)

    (run_dir,) = list((tmp_path / "results").iterdir())
    metrics = read_metrics(run_dir)
    partitions = [sorted(c["partition"] for c in m["client_losses"]) for m in metrics]
    assert partitions == [[0, 1, 2], [0, 3], [0, 3]]  # the late node trains its own partition from round 2 on
    assert sorted((r["node"], r["partition"]) for r in metrics[1]["rejected"]) == sorted(
        [(int(ids[1]), 1), (int(ids[2]), 2)])
    skipped = [(s["node"], s["partition"]) for s in metrics[2]["skipped"]]  # + the killed node if still "online"
    assert (int(ids[2]), 2) in skipped and set(skipped) <= {(int(ids[1]), 1), (int(ids[2]), 2)}
    assert json.loads((run_dir / STATUS_FILE).read_text())["status"] == "complete"
    trained = adapter_state(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                                                      str(run_dir / "peft_3")))
    assert set(trained) == set(initial_adapter(parse_config(tiny_run_config(tiny_llama_dir)).model, 42)[0])


def test_superlink_restart_resumes_to_the_uninterrupted_adapter_and_too_few_nodes_fail_in_one_line(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    """The SuperLink keeps its state in a SQLite file (`--database`). Killed with its ServerApp after round 1's
    checkpoint and restarted, the registered SuperNodes reconnect by themselves and `train.resume-from` ends with
    the adapter of an uninterrupted run. Then one SuperNode is stopped during a run with `strategy.min-replies=2`:
    the run fails with one line naming the rule, status failed, only the good rounds' checkpoints."""
    fed = Federation(tmp_path, max_nodes=2, database=tmp_path / "superlink.db")
    base = tiny_overrides(tiny_llama_dir, **{"num-server-rounds": 2, "train.save-every-round": 1,
                                             "strategy.round-timeout": 60})
    try:
        for p in (0, 1):
            fed.add_node(p, p, 2)
        fed.wait_online([0, 1])
        full = fed.run({**base, "train.output-dir": str(tmp_path / "full")}, tmp_path / "full.log")
        assert full.wait(timeout=400) == 0, (tmp_path / "full.log").read_text()[-3000:]

        cut = tmp_path / "cut"
        run = fed.run({**base, "train.output-dir": str(cut)}, tmp_path / "cut.log")
        wait_for("round 1's checkpoint", lambda: any(is_complete(p) for p in cut.glob("*/peft_1")), 300, run)
        fed.kill_superlink()  # the SuperLink machine goes down, its ServerApp with it
        run.wait(timeout=60)
        fed.start_superlink()
        fed.wait_online([0, 1], timeout=120)  # no re-registration: the database kept the keys
        (cut_run,) = list(cut.iterdir())
        resume = fed.run({**base, "train.output-dir": str(cut), "train.resume-from": str(cut_run)},
                         tmp_path / "resume.log")
        assert resume.wait(timeout=400) == 0, (tmp_path / "resume.log").read_text()[-3000:]
        assert "Resuming" in (tmp_path / "resume.log").read_text()

        few = tmp_path / "few"
        run = fed.run({**base, "train.output-dir": str(few), "strategy.min-replies": 2, "strategy.round-timeout": 30},
                      tmp_path / "few.log")
        wait_for("round 1's checkpoint", lambda: any(is_complete(p) for p in few.glob("*/peft_1")), 300, run)
        lost = fed.node_ids[1]
        fed.stop_node(1)  # stopped, not killed: it leaves the federation at once (no heartbeat to wait for)
        run.wait(timeout=300)  # `flwr run --stream` exits 0 whatever the run's status: ask the SuperLink
        few_log = (tmp_path / "few.log").read_text()
        run_id = re.search(r"Successfully started run (\d+)", few_log).group(1)
        (listed,) = json.loads(flwr(fed.env, "ls", fed.CONNECTION, "--run-id", run_id, "--format", "json").stdout)["runs"]
    finally:
        fed.close()

    (full_run,) = list((tmp_path / "full").iterdir())
    a, b = (load_file(str(r / "peft_2" / "adapter_model.safetensors")) for r in (full_run, cut_run))
    assert set(a) == set(b) and all((a[k] == b[k]).all() for k in a)  # two clients: FedAvg's sum is order-free
    assert [m["server_round"] for m in read_metrics(cut_run)] == [1, 2]

    stops = [line for line in few_log.splitlines() if "Run stopped:" in line]
    assert len(stops) == 1 and "strategy.min-replies=2" in stops[0] and "Traceback" not in few_log, few_log[-3000:]
    # round 2 had sent it its message (the lost node named, by id and partition), or found it gone (the count)
    assert re.search(rf"(failed=1 \(node {lost}, partition 1: |1 SuperNode\(s\) can take the round)", stops[0]), stops
    (few_run,) = list(few.iterdir())
    status = json.loads((few_run / STATUS_FILE).read_text())
    assert status["status"] == "failed" and "strategy.min-replies=2" in status["error"]
    assert sorted(p.name for p in few_run.glob("peft_*")) == ["peft_1"]
    assert [m["server_round"] for m in read_metrics(few_run)] == [1]
    assert listed["status"] == "finished:failed"
