"""End to end: `flwr run` of the real app, 20 simulated SuperNodes, tiny 4-bit Llama, 2 rounds."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from flowertune_llm.config import parse_config, run_config_arg
from flowertune_llm.models import adapter_state, initial_adapter
from flowertune_llm.rundir import read_metrics
from tests.helpers import (
    ALPACA_SUBSET, MMLU_VAL, ROOT, mlflow_run, tiny_overrides, tiny_run_config, trackio_logs, wandb_history,
)
from tests.processes import BIN, flower_env, round_lines, start_simulation_superlink, stop_tree

pytestmark = pytest.mark.e2e


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


def test_offline_demo_on_real_smollm2_gguf_changes_the_model_output(
    tmp_path: Path, smollm2_gguf: Path, smollm2_model_dir: Path
) -> None:
    """The README's offline demo, shortened to 1 round: GGUF weights, 4-bit, CPU, local data."""
    from transformers import AutoTokenizer

    from flowertune_llm.prompts import alpaca_prompt

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
    ids = tok(alpaca_prompt("Name three primary colors."), return_tensors="pt")
    logits = {}
    for name in ("peft_0", "trained"):
        folder = tmp_path / "peft_0" if name == "peft_0" else checkpoint
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_model_dir), str(folder))
        with torch.inference_mode():
            logits[name] = model(**ids).logits[0, -1]
    assert (logits["trained"] - logits["peft_0"]).abs().max().item() > 1e-3


def comparable(metrics: dict) -> dict:
    """A metrics line without what differs between runs by nature (timing and the round timeout derived from it, node
    ids, memory use)."""
    out = {k: v for k, v in metrics.items() if k not in ("wall_time_s", "val_eval_s", "peak_mem_mb", "timeout_s")}
    out["client_losses"] = sorted(
        ({k: v for k, v in c.items() if k not in ("node", "peak_mem_mb", "peak_reserved_mb")}
         for c in metrics.get("client_losses", [])),
        key=lambda c: c["partition"],
    )
    return out


VALIDATION_KEYS = {"val_mmlu_stem", "val_mmlu_social_sciences", "val_mmlu_humanities", "val_mmlu_avg",
                   "val_valid_letter_rate", "val_letter_ceiling", "val_questions", "val_batching", "val_eval_s",
                   "val_largest_letter_share", "val_letter_probability"}


def test_resume_after_kill_matches_uninterrupted_run_with_in_training_evaluation_and_trackers(
    tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """4 rounds, a checkpoint every 2, evaluation every 2; MLflow, W&B and trackio on. The interrupted run is killed
    (SuperLink, simulation, `flwr run`) once round 3 is in metrics.jsonl (its last checkpoint: round 2); the resume
    ends with the uninterrupted run's adapter and figures, and each tracker holds ONE run with every round once
    (round 3 from the resume only), read back with each library's own API."""
    import time

    from safetensors.torch import load_file

    from flowertune_llm.evaluate.api import evaluate_mmlu
    from flowertune_llm.evaluate.validation import validation_questions
    from flowertune_llm.rundir import is_complete

    evaluation = {"eval.every-round": 2, "eval.questions": 6, "eval.data": str(MMLU_VAL), "eval.batch-size": 2}
    base = tiny_overrides(tiny_llama_dir, **{"num-server-rounds": 4, "train.save-every-round": 2, **evaluation})
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # every SuperLink started below inherits it
    tracked = {"tracking.backends": "mlflow,wandb,trackio", "sweep.name": "s1", "sweep.point": "train.seq-length=64"}
    log = flwr_run(tmp_path / "full", {**base, "train.output-dir": str(tmp_path / "full" / "results")})
    (full_run,) = list((tmp_path / "full" / "results").iterdir())
    full_m = read_metrics(full_run)
    assert [m["server_round"] for m in full_m] == [0, 1, 2, 3, 4]
    evaluated = [m["server_round"] for m in full_m if VALIDATION_KEYS <= set(m) and m["val_questions"] == 6]
    assert evaluated == [0, 2, 4]  # round 0, every 2nd round, the last
    assert len(re.findall(r"validation MMLU \(protocol, 6 q\)", log)) == 3, log[-3000:]
    assert len(re.findall(r"largest letter [0-9.]+%, mean P\(A/B/C/D\) \d+/\d+/\d+/\d+", log)) == 3  # the letter prior
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
    prior = scored.letter_prior()
    assert prior["largest_letter_share"] == full_m[4]["val_largest_letter_share"]
    assert prior["letter_probability"] == full_m[4]["val_letter_probability"]

    # Interrupted run: kill SuperLink, simulation and `flwr run` once round 3 is logged (its checkpoint: peft_2).
    out = tmp_path / "cut" / "results"
    home = tmp_path / "cut" / "flwr-home"
    superlink, connection = start_simulation_superlink(home, tmp_path / "cut" / "superlink.log")
    runner = subprocess.Popen(
        flwr_run_command(connection, {**base, **tracked, "train.output-dir": str(out)}),
        env=flower_env(home), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 600
        while not any(m["server_round"] == 3 for d in out.glob("*/") if is_complete(d / "peft_2")
                      for m in read_metrics(d)):
            assert time.monotonic() < deadline and runner.poll() is None, "no round 3 before the run ended"
            time.sleep(0.2)
    finally:
        stop_tree(superlink.pid, timeout=0)  # SIGTERM then SIGKILL right away: a pre-emption
        stop_tree(runner.pid, timeout=0)
    (cut_run,) = [d for d in out.iterdir() if d.is_dir() and d.name != "mlartifacts"]
    assert not (cut_run / "peft_4").exists()

    log = flwr_run(tmp_path / "resume", {**base, **tracked, "train.output-dir": str(out),
                                         "train.resume-from": str(cut_run)})
    assert "Resuming" in log and [d for d in out.iterdir() if d.is_dir() and d.name != "mlartifacts"] == [cut_run]

    full, resumed = load_file(str(full_run / "peft_4" / "adapter_model.safetensors")), load_file(
        str(cut_run / "peft_4" / "adapter_model.safetensors")
    )
    assert max((full[k] - resumed[k]).abs().max().item() for k in full) <= 1e-6
    cut_m = read_metrics(cut_run)
    assert [m["server_round"] for m in cut_m] == [0, 1, 2, 3, 4]  # the series goes on where it stopped
    assert [comparable(m) for m in cut_m[3:]] == [comparable(m) for m in full_m[3:]]

    ids = json.loads((cut_run / "tracking.json").read_text())["runs"]
    losses = [(m["server_round"], pytest.approx(m["train_loss"])) for m in cut_m if m["server_round"] > 0]
    client, run = mlflow_run(out, ids["mlflow"])
    assert [(m.step, m.value) for m in client.get_metric_history(ids["mlflow"], "train/loss")] == losses
    assert [m.step for m in client.get_metric_history(ids["mlflow"], "validation/mmlu_avg")] == [0, 2, 4]
    assert run.info.status == "FINISHED" and run.data.tags["sweep.name"] == "s1"
    assert run.data.tags["mlflow.runName"] == f"train.seq-length=64 {cut_run.name}"
    assert [a.path for a in client.list_artifacts(ids["mlflow"])] == ["peft_4"]
    assert len(client.search_runs([run.info.experiment_id])) == 1  # one tracker run for the run and its resume
    rows, records = wandb_history(cut_run)
    assert [(r["_step"], r["train/loss"]) for r in rows if "train/loss" in r] == losses
    assert {r.run.run_id for r in records if r.WhichOneof("record_type") == "run"} == {ids["wandb"]}
    logs = trackio_logs(tmp_path / "trackio", ids["trackio"])[:-1]
    assert [(r["step"], r["train/loss"]) for r in logs if "train/loss" in r] == losses


def flwr_log(env: dict[str, str], connection: str, run_id: str) -> str:
    """`flwr log <run-id> --show`: a finished run's whole log."""
    proc = subprocess.run([str(BIN / "flwr"), "log", run_id, connection, "--show"], env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    return proc.stdout + proc.stderr


def test_a_sweep_of_four_points_through_flwr_run_reports_the_failed_one_and_lists_all(
    tmp_path: Path, tiny_llama_dir: Path, official_stack: Path
) -> None:
    """2 x 2 points (learning rate x template) of 1-round runs of the real app, 20 simulated SuperNodes, 2 clients
    per round, tiny 4-bit Llama. One point's dataset path passes the offline check but does not exist, so its run
    fails at start: the sweep reports it, goes on, exits 1, and `runs` lists all four. The completed runs also
    show what every `flwr run` must (round lines, memory per client, a loadable checkpoint that moved), and the
    failed one how a bad input ends a run (one line naming key and value, no traceback, finished:failed)."""
    results = tmp_path / "results"
    fixed = tiny_overrides(tiny_llama_dir, **{"num-server-rounds": 1, "train.training-arguments.max-steps": 1,
                                              "train.output-dir": str(results)})
    missing = tmp_path / "no-such-alpaca.jsonl"
    points = tmp_path / "points.toml"
    points.write_text(
        '[[point]]\n"train.learning-rate-max" = 0.01\n"train.prompt-template" = "alpaca"\n\n'
        '[[point]]\n"train.learning-rate-max" = 0.01\n"train.prompt-template" = "qa"\n"model.lora.use-dora" = false\n\n'
        '[[point]]\n"train.learning-rate-max" = 0.001\n"train.prompt-template" = "alpaca"\n\n'
        '[[point]]\n"train.learning-rate-max" = 0.001\n"train.prompt-template" = "qa"\n'
        f'"static.dataset.name" = "{missing}"\n'
    )
    with simulation_superlink(tmp_path) as (env, connection):
        proc = subprocess.run(
            [str(BIN / "flowertune-llm"), "sweep", "--name", "e2e", "--points", str(points), "--app", str(ROOT),
             "--connection", connection, "--run-config", run_config_arg(fixed),
             "--federation-config", "num-supernodes=20 client-resources-num-cpus=1"],
            env=env, capture_output=True, text=True, timeout=900, check=False,
        )
        out = proc.stdout + proc.stderr
        run_ids = re.findall(r"\] (.+?): run (\d+) started", proc.stdout)
        first_log = flwr_log(env, connection, run_ids[0][1])
        failed_log = flwr_log(env, connection, run_ids[3][1])
        failed_status = run_status(env, connection, f"Successfully started run {run_ids[3][1]}")
        # a training argument TRL refuses: the run ends before round 0's evaluation, with TRL's reason in one line
        bogus = {**fixed, "train.training-arguments.lr-scheduler-type": "bogus", "eval.every-round": 1,
                 "eval.data": str(MMLU_VAL), "eval.questions": 6}
        bogus_status = run_status(env, connection, flwr_run_on(env, connection, bogus, timeout=300))
        bogus_log = flwr_log(env, connection, str(bogus_status["run-id"]))
    bogus_message = "train.training-arguments.lr-scheduler-type='bogus': bogus is not a valid SchedulerType"
    assert bogus_status["status"] == "finished:failed" and bogus_message in bogus_status["status-details"]
    lines = [line for line in bogus_log.splitlines() if bogus_message in line]
    assert len(lines) == 1 and f"Run stopped: {bogus_message}" in lines[0], bogus_log[-3000:]
    assert "validation MMLU" not in bogus_log and "Traceback" not in bogus_log, bogus_log[-3000:]
    assert proc.returncode == 1, out[-3000:]
    progress = proc.stdout  # one line per point on stdout; the failures are repeated on stderr at the end
    assert progress.count(": finished:completed") == 3 and progress.count(": finished:failed") == 1, out[-3000:]
    message = f"static.dataset.name={str(missing)!r}: local path {missing} does not exist"
    assert message in progress  # the failed point's reason, from Flower's run status

    # the failed run: one line naming key and value, no traceback, finished:failed; nothing of it but the record
    assert failed_status["status"] == "finished:failed" and message in failed_status["status-details"]
    lines = [line for line in failed_log.splitlines() if message in line]
    assert len(lines) == 1 and lines[0].endswith(f"Run stopped: {message}"), failed_log[-3000:]
    assert "Traceback" not in failed_log and "(run failed; see the line above)" in failed_log, failed_log[-3000:]

    # a completed run, as any `flwr run` of the app: 2 of 20 nodes trained, memory per client, Done line
    assert "(2 of 20 nodes)" in first_log and round_lines(first_log)[0][1:3] == ("2", "0"), first_log[-3000:]
    assert re.search(r"Done: .*peak memory per client [\d,]+ MiB", first_log), first_log[-2000:]

    listed = subprocess.run([str(BIN / "flowertune-llm"), "runs", str(results), "--format", "json"],
                            capture_output=True, text=True, check=True).stdout
    rows = json.loads(listed)
    assert sorted(r["status"] for r in rows) == ["complete", "complete", "complete", "failed"], rows
    assert {"static.dataset.name", "train.learning-rate-max", "train.prompt-template"} <= set(rows[0]), rows[0]
    assert {(r["train.learning-rate-max"], r["train.prompt-template"]) for r in rows} == {
        (0.01, "alpaca"), (0.01, "qa"), (0.001, "alpaca"), (0.001, "qa")}
    run_dirs = [Path(r["run"]) for r in rows]
    configs = [json.loads((d / "config.json").read_text()) for d in run_dirs]
    assert all(c["run"]["run_config"]["sweep.name"] == "e2e" for c in configs)
    failed_dir = next(d for d, r in zip(run_dirs, rows) if r["status"] == "failed")
    assert sorted(p.name for p in failed_dir.iterdir()) == ["config.json", "status.json"]

    starts = {dora: initial_adapter(parse_config(tiny_run_config(tiny_llama_dir, **{"model.lora.use-dora": dora})).model,
                                    42)[0] for dora in (True, False)}
    for run_dir, config in zip(run_dirs, configs):
        if run_dir == failed_dir:
            continue
        assert config["run"]["num_nodes"] == 20
        (metrics,) = read_metrics(run_dir)
        assert (metrics["replies"], metrics["failures"], len(metrics["client_losses"])) == (2, 0, 2)
        # memory per client, measured each round; a simulated ClientApp given 0 GPUs sees none (Ray sets
        # CUDA_VISIBLE_DEVICES="" in its worker: visible_gpus 0, where -1 would mean "unset, every GPU visible")
        clients = metrics["client_losses"]
        assert all(c["peak_mem_mb"] > 0 and c["gpu"] == -1 and c["visible_gpus"] == 0 for c in clients), clients
        assert metrics["peak_mem_mb"] == max(c["peak_mem_mb"] for c in clients) and metrics["mb_total"] > 0
        assert (run_dir / "loss.png").is_file()
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
        trained = adapter_state(PeftModel.from_pretrained(base, str(run_dir / "peft_1")))
        start = starts[config["run"]["run_config"]["model.lora.use-dora"]]  # the run's own adapter: LoRA or DoRA
        assert set(trained) == set(start)
        assert max((trained[k] - start[k]).abs().max().item() for k in trained) > 1e-4

    # The official evaluator (peft 0.14.0, transformers 4.53, 4-bit fp4, float32) loads a DoRA and a LoRA checkpoint
    # of these runs and computes the answer-position logits flowertune-eval computes.
    from flowertune_llm.evaluate.data import load_questions
    from flowertune_llm.evaluate.protocol import mcq_prompt
    from tests.helpers import MMLU_DIR
    from tests.official_evaluator import official_logits, our_logits

    questions = load_questions(str(MMLU_DIR / "mmlu_test.jsonl"))[::2000][:6]
    prompts = [mcq_prompt(q.question, list(q.options)) for q in questions]
    checked = set()
    for run_dir, config in zip(run_dirs, configs):
        dora = config["run"]["run_config"]["model.lora.use-dora"]
        if run_dir == failed_dir or dora in checked:
            continue
        checked.add(dora)
        peft = str(run_dir / "peft_1")
        theirs = official_logits(official_stack, str(tiny_llama_dir), peft, prompts, tmp_path / f"official-{dora}.pt")
        assert theirs["versions"] == ["4.53.0", "0.14.0"]
        ours = our_logits(str(tiny_llama_dir), peft, prompts)
        assert (theirs["logits"].argmax(-1) == ours.argmax(-1)).all(), ("DoRA" if dora else "LoRA")
        assert (theirs["logits"] - ours).abs().max().item() < 1e-4, ("DoRA" if dora else "LoRA")
    assert checked == {True, False}
