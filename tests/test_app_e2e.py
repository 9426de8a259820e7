"""End to end: `flwr run` of the real app, 20 simulated SuperNodes, tiny 4-bit Llama, 2 rounds."""

from __future__ import annotations

import contextlib
import json
import math
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from flowertune_llm.config import parse_config, run_config_arg
from flowertune_llm.metrics import read_metrics
from flowertune_llm.models import adapter_state, initial_adapter
from tests.conftest import ALPACA_SUBSET, MMLU_VAL, ROOT, tiny_overrides, tiny_run_config
from tests.processes import BIN, flower_env, round_lines, start_simulation_superlink, stop_tree

pytestmark = pytest.mark.slow


def flwr_run_command(connection: str, overrides: dict) -> list[str]:
    """`flwr run` of this app with 20 simulated SuperNodes and these run-config overrides."""
    return [str(BIN / "flwr"), "run", str(ROOT), connection, "--stream",
            "--federation-config", "num-supernodes=20 client-resources-num-cpus=1",
            "--run-config", run_config_arg(overrides)]


@contextlib.contextmanager
def simulation_superlink(tmp_path: Path) -> Iterator[tuple[dict[str, str], str]]:
    """A private SuperLink for `flwr run` (environment, connection), stopped by PID afterwards."""
    home = tmp_path / "flwr-home"
    superlink, connection = start_simulation_superlink(home, tmp_path / "superlink.log")
    try:
        yield flower_env(home), connection
    finally:
        stop_tree(superlink.pid)


def flwr_run_on(env: dict[str, str], connection: str, overrides: dict, timeout: int = 900) -> str:
    """`flwr run --stream` to the run's end; its output (exit status 0 asserted)."""
    proc = subprocess.run(
        flwr_run_command(connection, overrides), env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    return log


def flwr_run(tmp_path: Path, overrides: dict, timeout: int = 900) -> str:
    """Run the app to completion on a private SuperLink (stopped afterwards); the log."""
    with simulation_superlink(tmp_path) as (env, connection):
        return flwr_run_on(env, connection, overrides, timeout)


def run_status(env: dict[str, str], connection: str, log: str) -> dict:
    """`flwr ls --run-id <id> --format json` of the run that `log` started."""
    run_id = re.search(r"Successfully started run (\d+)", log).group(1)
    proc = subprocess.run([str(BIN / "flwr"), "ls", connection, "--run-id", run_id, "--format", "json"],
                          env=env, capture_output=True, text=True, timeout=60, check=True)
    (run,) = json.loads(proc.stdout)["runs"]
    return run


def test_flwr_run_trains_two_clients_per_round_and_saves_a_loadable_checkpoint(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    overrides = tiny_overrides(
        tiny_llama_dir, **{"model.quantization": 4, "num-server-rounds": 2, "train.output-dir": str(tmp_path / "results")}
    )
    with simulation_superlink(tmp_path) as (env, connection):
        log = flwr_run_on(env, connection, overrides)
        assert run_status(env, connection, log)["status"] == "finished:completed"
        # a bad value: one line naming key and value, no traceback, and a failed run in `flwr ls`
        bad = flwr_run_on(env, connection, {**overrides, "model.quantization": 16})
        status = run_status(env, connection, bad)
    message = "model.quantization=16: expected 4, 8, or none (0)"
    assert status["status"] == "finished:failed" and message in status["status-details"], status
    lines = [line for line in bad.splitlines() if message in line]
    assert len(lines) == 1 and lines[0].endswith(f"Run stopped: {message}"), bad[-3000:]
    assert "Traceback" not in bad and "Exit Code: 700 (run failed; see the line above)" in bad, bad[-3000:]
    assert len(list((tmp_path / "results").iterdir())) == 1  # the failed run wrote nothing
    assert "(2 of 20 nodes)" in log, log[-3000:]
    rounds = round_lines(log)
    assert [(r, c, f) for r, c, f, _ in rounds] == [("1", "2", "0"), ("2", "2", "0")], log[-3000:]
    assert all(math.isfinite(float(loss)) for *_, loss in rounds)

    checkpoints = list((tmp_path / "results").glob("*/peft_2"))
    assert len(checkpoints) == 1, log[-3000:]
    run_dir = checkpoints[0].parent
    metrics = read_metrics(run_dir)
    assert [(m["server_round"], m["replies"], m["failures"]) for m in metrics] == [(1, 2, 0), (2, 2, 0)]
    assert all(len(m["client_losses"]) == 2 and m["mb_total"] > 0 for m in metrics)
    # memory per client, measured each round; a simulated ClientApp given 0 GPUs sees none (Ray sets
    # CUDA_VISIBLE_DEVICES="" in its worker: visible_gpus 0, where -1 would mean "unset, every GPU visible")
    clients = [c for m in metrics for c in m["client_losses"]]
    assert all(c["peak_mem_mb"] > 0 and c["gpu"] == -1 and c["visible_gpus"] == 0 for c in clients), clients
    assert all(m["peak_mem_mb"] == max(c["peak_mem_mb"] for c in m["client_losses"]) for m in metrics)
    assert "peak memory per client" in log and re.search(r"Done: .*peak memory per client [\d,]+ MB", log), log[-2000:]
    assert (run_dir / "config.json").is_file() and (run_dir / "loss.png").is_file()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    trained = adapter_state(PeftModel.from_pretrained(base, str(checkpoints[0])))
    cfg = parse_config(tiny_run_config(tiny_llama_dir))
    start, _ = initial_adapter(cfg.model, cfg.train.seed)
    assert set(trained) == set(start)
    assert max((trained[k] - start[k]).abs().max().item() for k in start) > 1e-4


def test_offline_demo_on_real_smollm2_gguf_changes_the_model_output(
    tmp_path: Path, smollm2_gguf: Path, smollm2_model_dir: Path
) -> None:
    """The README's offline demo, shortened to 1 round: GGUF weights, 4-bit, CPU, local data."""
    from transformers import AutoTokenizer

    from flowertune_llm.prompts import build_prompt

    overrides = {
        "model.name": str(smollm2_gguf),
        "static.dataset.name": str(ALPACA_SUBSET),
        "num-server-rounds": 1,
        "train.seq-length": 128,
        "train.learning-rate-max": 2e-3,
        "train.learning-rate-min": 2e-3,
        "train.training-arguments.per-device-train-batch-size": 4,
        "train.training-arguments.max-steps": 3,
        "train.output-dir": str(tmp_path / "results"),
        "eval.data": str(MMLU_VAL),
        "eval.every-round": 1,
        "eval.questions": 6,
    }
    log = flwr_run(tmp_path, overrides)
    assert [r[:3] for r in round_lines(log)] == [("1", "2", "0")], log[-3000:]
    evaluated = [m for m in read_metrics(next((tmp_path / "results").iterdir())) if "val_mmlu_avg" in m]
    assert [m["server_round"] for m in evaluated] == [0, 1]  # real weights: before and after, in the run
    (checkpoint,) = list((tmp_path / "results").glob("*/peft_1"))
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(smollm2_model_dir)  # the local import

    # The same prompt through the initial (round-0) adapter and the trained one.
    from flowertune_llm.checkpoint import save_adapter

    cfg = parse_config(tiny_run_config(smollm2_model_dir, **{"model.name": str(smollm2_gguf)}))
    state, peft_config = initial_adapter(cfg.model, cfg.train.seed)
    save_adapter(tmp_path / "peft_0", state, peft_config, {})
    tok = AutoTokenizer.from_pretrained(smollm2_model_dir)
    ids = tok(build_prompt("Name three primary colors."), return_tensors="pt")
    logits = {}
    for name in ("peft_0", "trained"):
        folder = tmp_path / "peft_0" if name == "peft_0" else checkpoint
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_model_dir), str(folder))
        with torch.inference_mode():
            logits[name] = model(**ids).logits[0, -1]
    assert (logits["trained"] - logits["peft_0"]).abs().max().item() > 1e-3


def comparable(metrics: dict) -> dict:
    """A metrics line without what differs between runs by nature (timing, node ids)."""
    out = {k: v for k, v in metrics.items() if k not in ("wall_time_s", "val_eval_s")}
    out["client_losses"] = sorted(
        ({k: v for k, v in c.items() if k != "node"} for c in metrics.get("client_losses", [])),
        key=lambda c: c["partition"],
    )
    return out


VALIDATION_KEYS = {"val_mmlu_stem", "val_mmlu_social_sciences", "val_mmlu_humanities", "val_mmlu_avg",
                   "val_valid_letter_rate", "val_letter_ceiling", "val_questions", "val_batching", "val_eval_s"}


def test_resume_after_kill_matches_uninterrupted_run_with_in_training_evaluation(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    import time

    from safetensors.torch import load_file

    from flowertune_llm.checkpoint import is_complete
    from flowertune_llm.evaluate.api import evaluate_mmlu
    from flowertune_llm.evaluate.validation import validation_questions

    evaluation = {"eval.every-round": 2, "eval.questions": 6, "eval.data": str(MMLU_VAL), "eval.batch-size": 2}
    base = tiny_overrides(tiny_llama_dir, **{"num-server-rounds": 4, "train.save-every-round": 2, **evaluation})
    log = flwr_run(tmp_path / "full", {**base, "train.output-dir": str(tmp_path / "full" / "results")})
    (full_run,) = list((tmp_path / "full" / "results").iterdir())
    full_m = read_metrics(full_run)
    assert [m["server_round"] for m in full_m] == [0, 1, 2, 3, 4]
    evaluated = [m["server_round"] for m in full_m if VALIDATION_KEYS <= set(m) and m["val_questions"] == 6]
    assert evaluated == [0, 2, 4]  # round 0, every 2nd round, the last
    assert len(re.findall(r"validation MMLU \(protocol, 6 q\)", log)) == 3, log[-3000:]
    assert (full_run / "loss.png").is_file()

    # The in-training figures are what flowertune-eval gives the saved checkpoint on the same questions.
    questions = validation_questions(parse_config(tiny_run_config(tiny_llama_dir, **evaluation)).eval)
    data = tmp_path / "val_sample.jsonl"
    data.write_text("".join(
        json.dumps({"subject": q.subject, "question": q.question, "answer": q.answer, **dict(zip("ABCD", q.options))}) + "\n"
        for qs in questions.values() for q in qs
    ))
    scored = evaluate_mmlu(str(tiny_llama_dir), str(full_run / "peft_4"), data=str(data), batch_size=2, device="cpu",
                           show_progress=False)
    assert scored.average == full_m[4]["val_mmlu_avg"]
    assert scored.letter_ceiling == full_m[4]["val_letter_ceiling"]
    assert scored.valid_letter_rate == full_m[4]["val_valid_letter_rate"]

    # Interrupted run: kill SuperLink, simulation and `flwr run` once peft_2 is on disk.
    out = tmp_path / "cut" / "results"
    home = tmp_path / "cut" / "flwr-home"
    superlink, connection = start_simulation_superlink(home, tmp_path / "cut" / "superlink.log")
    runner = subprocess.Popen(
        flwr_run_command(connection, {**base, "train.output-dir": str(out)}),
        env=flower_env(home), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 600
        while not any(is_complete(p) for p in out.glob("*/peft_2")):
            assert time.monotonic() < deadline and runner.poll() is None, "no peft_2 before the run ended"
            time.sleep(0.2)
    finally:
        stop_tree(superlink.pid, timeout=0)  # SIGTERM then SIGKILL right away: a pre-emption
        stop_tree(runner.pid, timeout=0)
    (cut_run,) = list(out.iterdir())
    assert not (cut_run / "peft_4").exists()

    log = flwr_run(tmp_path / "resume", {**base, "train.output-dir": str(out), "train.resume-from": str(cut_run)})
    assert "Resuming" in log and list(out.iterdir()) == [cut_run]

    full, resumed = load_file(str(full_run / "peft_4" / "adapter_model.safetensors")), load_file(
        str(cut_run / "peft_4" / "adapter_model.safetensors")
    )
    assert max((full[k] - resumed[k]).abs().max().item() for k in full) <= 1e-6
    cut_m = read_metrics(cut_run)
    assert [m["server_round"] for m in cut_m] == [0, 1, 2, 3, 4]  # the series goes on where it stopped
    assert [comparable(m) for m in cut_m[3:]] == [comparable(m) for m in full_m[3:]]


def test_a_sweep_of_four_points_through_flwr_run_reports_the_failed_one_and_lists_all(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    """2 x 2 points (learning rate x template) of 1-round runs; one point's dataset path passes the offline
    check but does not exist, so its run fails at start. The sweep goes on, exits 1, and `runs` lists all four."""
    results = tmp_path / "results"
    fixed = tiny_overrides(tiny_llama_dir, **{"num-server-rounds": 1, "train.training-arguments.max-steps": 1,
                                              "strategy.fraction-train": 0.05, "train.output-dir": str(results)})
    points = tmp_path / "points.toml"
    points.write_text(
        '[[point]]\n"train.learning-rate-max" = 0.01\n"train.prompt-template" = "alpaca"\n\n'
        '[[point]]\n"train.learning-rate-max" = 0.01\n"train.prompt-template" = "qa"\n\n'
        '[[point]]\n"train.learning-rate-max" = 0.001\n"train.prompt-template" = "alpaca"\n\n'
        '[[point]]\n"train.learning-rate-max" = 0.001\n"train.prompt-template" = "qa"\n'
        f'"static.dataset.name" = "{tmp_path / "no-such-alpaca.jsonl"}"\n'
    )
    with simulation_superlink(tmp_path) as (env, connection):
        proc = subprocess.run(
            [str(BIN / "flowertune-llm"), "sweep", "--name", "e2e", "--points", str(points), "--app", str(ROOT),
             "--connection", connection, "--run-config", run_config_arg(fixed),
             "--federation-config", "num-supernodes=20 client-resources-num-cpus=1"],
            env=env, capture_output=True, text=True, timeout=900, check=False,
        )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    progress = proc.stdout  # one line per point on stdout; the failures are repeated on stderr at the end
    assert progress.count(": finished:completed") == 3 and progress.count(": finished:failed") == 1, out[-3000:]
    assert "no-such-alpaca.jsonl" in out  # the failed point's reason, from Flower's run status
    listed = subprocess.run([str(BIN / "flowertune-llm"), "runs", str(results), "--format", "json"],
                            capture_output=True, text=True, check=True).stdout
    rows = json.loads(listed)
    assert sorted(r["status"] for r in rows) == ["complete", "complete", "complete", "failed"], rows
    assert {"static.dataset.name", "train.learning-rate-max", "train.prompt-template"} <= set(rows[0]), rows[0]
    assert {(r["train.learning-rate-max"], r["train.prompt-template"]) for r in rows} == {
        (0.01, "alpaca"), (0.01, "qa"), (0.001, "alpaca"), (0.001, "qa")}
    configs = [json.loads(p.read_text()) for p in results.glob("*/config.json")]
    assert all(c["run"]["run_config"]["sweep.name"] == "e2e" for c in configs)
    assert all(c["run"]["num_nodes"] == 20 for c in configs if "num_nodes" in c["run"])
