"""How a model computes on each device, decided in one place (models.py, train.py and evaluate/ all ask here).

The rules:
- **4-bit on CPU computes the protocol's arithmetic**: float32 through bitsandbytes' dequantize
  path. bitsandbytes >= 0.49 repacks a `Linear4bit` weight for a fused bf16 kernel the first
  time the layer runs in eval mode without gradients on a CPU with AVX512-BF16; from then on the
  layer computes with bf16 activations, and PEFT's DoRA, which dequantizes the base weight for
  its norm, gets the norm of the repacked bytes (a different model). `use_protocol_arithmetic`
  turns that off for every 4-bit layer of a model the app builds; `require_protocol_arithmetic`
  is the guard that refuses a model in which any layer is (or may become) packed.
- **Adapters are float32 on every device** (`adapter_dtype`): master weights and optimizer state,
  whatever TRL casts; the compute dtype stays the device's (`compute_dtype`, bf16 autocast on GPUs
  that support it).
- **A CPU trains in the dtype its matmul units compute fastest** (`training_compute`,
  `train.cpu-compute`): `auto` times a matmul at the model's shapes in float32 and bf16 once per
  process and trains in bf16 where that is at least `BF16_MIN_SPEEDUP` times faster (the model
  itself in bf16, 4-bit weights dequantized to bf16, adapters float32, the loss statistics
  float32). Evaluation never asks here: it keeps the protocol's float32 arithmetic on every CPU.
- **One device per client process** (`single_device_config`): a ClientApp that sees several GPUs
  trains on the first it sees, with the batch it was configured with.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from flowertune_llm.rules import MIB


def default_device() -> str:
    """CUDA when present, else CPU (bitsandbytes >= 0.49 quantizes on CPU too)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def compute_dtype(device: str) -> torch.dtype:
    """bf16 where the GPU supports it; float32 on CPU, where bf16 matmuls are slow or emulated."""
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


#: `auto` trains in bf16 where a bf16 matmul at the model's shapes is at least this much faster than float32.
BF16_MIN_SPEEDUP = 1.5
#: Where a round's compute dtype came from (the `compute_source` a client reports).
SOURCE_MEASURED, SOURCE_FORCED, SOURCE_GPU = 0, 1, 2


@dataclass(frozen=True)
class TrainingCompute:
    """The dtype a client trains in, and why (reported in its reply, logged by the server)."""

    dtype: torch.dtype
    source: int  # SOURCE_MEASURED (auto on a CPU), SOURCE_FORCED (train.cpu-compute), SOURCE_GPU
    bf16_speedup: float = 0.0  # measured float32 time / bf16 time of the probe (0: not measured)

    @property
    def bf16(self) -> bool:
        """True when the model computes in bf16."""
        return self.dtype == torch.bfloat16

    def metrics(self) -> dict[str, float]:
        """The reply's fields (numbers: Flower metrics carry no strings)."""
        return {"compute_bf16": float(self.bf16), "compute_source": float(self.source),
                "bf16_matmul_speedup": self.bf16_speedup}


def describe_compute(bf16: bool, source: int, speedup: float) -> str:
    """'compute bf16 (matmul 2.9x float32)': what a round trained in and why, for the log line."""
    name = "bf16" if bf16 else "float32"
    if source == SOURCE_GPU:
        return f"compute {name} (GPU)"
    if source == SOURCE_FORCED:
        return f"compute {name} (train.cpu-compute)"
    return f"compute {name} (matmul bf16 {speedup:.1f}x float32, threshold {BF16_MIN_SPEEDUP}x)"


def matmul_seconds(dtype: torch.dtype, hidden: int, intermediate: int, tokens: int, reps: int) -> float:
    """Best-of-`reps` time of an MLP-shaped matmul pair (up and down projection) in `dtype`."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    up = torch.randn(hidden, intermediate, generator=gen).to(dtype)
    down = torch.randn(intermediate, hidden, generator=gen).to(dtype)
    (x @ up) @ down  # warm-up: kernel selection, first-touch of the buffers
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        (x @ up) @ down
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache  # once per process and shape: the machine does not change under it
def bf16_matmul_speedup(hidden: int, intermediate: int, threads: int, tokens: int = 512, reps: int = 3) -> float:
    """float32 time / bf16 time of a matmul at the model's shapes on this CPU with `threads` threads.

    Measured, not read from the flag list: an AMX or AVX512-BF16 CPU computes bf16 several times
    faster, one whose AMX is hidden or that emulates bf16 may not (docs/benchmarks.md). About 0.1 s
    for SmolLM2-135M's shapes on 2 cores.
    """
    del threads  # part of the cache key: the answer depends on how many cores the process uses
    f32 = matmul_seconds(torch.float32, hidden, intermediate, tokens, reps)
    bf16 = matmul_seconds(torch.bfloat16, hidden, intermediate, tokens, reps)
    return f32 / bf16


def training_compute(
    device: str, cpu_compute: str, hidden: int, intermediate: int,
    speedup: Callable[[int, int, int], float] | None = None,
) -> TrainingCompute:
    """The dtype a training round computes in on `device`: a GPU as `compute_dtype`; a CPU by `train.cpu-compute`.

    `auto` (config.CPU_COMPUTE, validated there) trains in bf16 where `bf16_matmul_speedup` (or the
    `speedup` given, for tests) is at least `BF16_MIN_SPEEDUP`; `float32` / `bfloat16` force it.
    """
    if not device.startswith("cpu"):
        return TrainingCompute(compute_dtype(device), SOURCE_GPU)
    if cpu_compute == "float32":
        return TrainingCompute(torch.float32, SOURCE_FORCED)
    if cpu_compute == "bfloat16":
        return TrainingCompute(torch.bfloat16, SOURCE_FORCED)
    ratio = (speedup or bf16_matmul_speedup)(hidden, intermediate, torch.get_num_threads())
    return TrainingCompute(torch.bfloat16 if ratio >= BF16_MIN_SPEEDUP else torch.float32, SOURCE_MEASURED, ratio)


def adapter_dtype(device: str) -> torch.dtype:
    """The trainable adapter's (and so its optimizer state's) dtype: float32 on every device.

    TRL casts LoRA A/B of a quantized model to bf16 (QLoRA's choice). A bf16 weight has 8 bits of
    mantissa: an AdamW update of 5e-5 (the reference peak learning rate) is below half an ulp
    of most freshly initialised lora_A entries and rounds away, so most of the adapter would stay
    frozen (measured in tests/test_devices.py). Compute still runs in `compute_dtype(device)`
    (autocast on GPUs); only the stored weights are float32, as PEFT itself creates them.
    """
    del device  # the same answer everywhere, on purpose: one policy, asked per device
    return torch.float32


def apply_adapter_precision(model: torch.nn.Module, device: str) -> None:
    """Put the trainable (adapter) weights in `adapter_dtype(device)`, undoing TRL's bf16 cast.

    Call before the optimizer exists (after the trainer is built, before `train()`): the
    parameters keep their identity, only their data changes dtype.
    """
    dtype = adapter_dtype(device)
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)


class ArithmeticError4bit(RuntimeError):
    """A 4-bit model would not compute what the protocol computes (packed for the fused CPU kernel)."""


def _linear4bit_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # no bitsandbytes: no 4-bit layers
        return []
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Linear4bit)]


def _is_packed(layer: torch.nn.Module) -> bool:
    return bool(getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False))


def packed_4bit_layers(model: torch.nn.Module) -> list[str]:
    """Names of the 4-bit layers whose weight is in bitsandbytes' CPU-packed (fused bf16 kernel) format."""
    return [name for name, layer in _linear4bit_layers(model) if _is_packed(layer)]


def use_protocol_arithmetic(model: torch.nn.Module) -> torch.nn.Module:
    """Make every 4-bit layer compute in float32 through dequantize, on any CPU; returns the model.

    Turns off bitsandbytes' per-layer switch to its fused AVX512-BF16 kernel (read at every
    forward). Call it right after loading, before any forward: a weight that was already
    repacked cannot be restored exactly (the repacking rounds its block scales to bf16), so such
    a model is refused (reload it). No effect on a model without 4-bit layers, or on GPU arithmetic.
    """
    for _, layer in _linear4bit_layers(model):
        layer.support_avx512bf16_for_cpu = False
    packed = packed_4bit_layers(model)
    if packed:
        raise ArithmeticError4bit(
            f"{len(packed)} 4-bit layers (e.g. {packed[0]}) were already repacked for bitsandbytes' fused bf16 CPU "
            "kernel, which rounds their scales: reload the model and pass it here before it runs"
        )
    return model


def require_protocol_arithmetic(model: torch.nn.Module) -> None:
    """The guard: refuse a model with a 4-bit layer that is packed, or that may pack at its next forward.

    Chosen over comparing logits of the base model and the identity adapter: it is exact, costs
    one walk over the modules, and covers every model (trained adapters, non-DoRA, 8-bit-free
    paths) rather than only the round-0 case.
    """
    packed = packed_4bit_layers(model)
    armed = [n for n, layer in _linear4bit_layers(model) if getattr(layer, "support_avx512bf16_for_cpu", False)]
    if packed or armed:
        names = (packed or armed)[:3]
        raise ArithmeticError4bit(
            f"{len(packed)} 4-bit layers packed and {len(armed)} armed for bitsandbytes' fused bf16 CPU kernel "
            f"(e.g. {', '.join(names)}): this model does not compute the protocol's float32 arithmetic; "
            "build it through flowertune_llm (models.load_base_model / evaluate.model.load_model)"
        )


@contextlib.contextmanager
def assume_bf16_gpu(enabled: bool = True) -> Iterator[None]:
    """Let transformers build a bf16 GPU client's TrainingArguments on a machine without a GPU (checks only).

    TrainingArguments refuses bf16 without a bf16 GPU at construction; `check` builds what a GPU
    client will build, to refuse its bad arguments on any machine. Nothing is trained inside.
    """
    if not enabled:
        yield
        return
    import transformers.training_args as training_args

    original = training_args.is_torch_bf16_gpu_available
    training_args.is_torch_bf16_gpu_available = lambda *a, **k: True
    try:
        yield
    finally:
        training_args.is_torch_bf16_gpu_available = original


def single_device_config(config_class: type) -> type:
    """A TrainingArguments subclass whose process uses one device, however many GPUs it sees.

    transformers sets `n_gpu = torch.cuda.device_count()` for a single-process run: with N
    visible GPUs the loader batch becomes per-device batch x N and an unquantized model is wrapped
    in `DataParallel`, a different recipe than the configured one. Capping `n_gpu` at 1 keeps the
    batch and leaves the model alone on the device it was loaded on (cuda:0 = the first visible).
    """

    class OneDevice(config_class):  # type: ignore[misc, valid-type]
        @property
        def n_gpu(self) -> int:
            """At most 1: never DataParallel, never a multiplied batch."""
            return min(super().n_gpu, 1)

    OneDevice.__name__ = OneDevice.__qualname__ = f"OneDevice{config_class.__name__}"
    return OneDevice


def visible_gpu_ids() -> int:
    """How many GPU ids CUDA_VISIBLE_DEVICES lists: -1 when unset (every GPU visible), 0 when set empty."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return -1
    return len([v for v in value.split(",") if v.strip()])


class RoundMemory:
    """Peak memory of this process during one round: GPU allocated/reserved, or the CPU's resident set.

    GPU: torch's peak counters, reset when the round begins. CPU: the kernel's high-water mark of
    the resident set (VmHWM), reset through /proc/self/clear_refs ("5") when the round begins;
    where that is not possible (not Linux, no permission) the process's lifetime peak is reported
    and `reset` is False.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.reset = False

    def __enter__(self) -> RoundMemory:
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(self.device)
            self.reset = True
        else:
            try:
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")
                self.reset = True
            except OSError:
                self.reset = False
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def peak_mb(self) -> dict[str, float]:
        """{"peak_mem_mb": ...} (+ "peak_reserved_mb" on a GPU), in MiB (1024^2 bytes, as communication)."""
        if self.device.startswith("cuda"):
            return {
                "peak_mem_mb": torch.cuda.max_memory_allocated(self.device) / MIB,
                "peak_reserved_mb": torch.cuda.max_memory_reserved(self.device) / MIB,
            }
        return {"peak_mem_mb": _peak_rss_bytes() / MIB}


def _peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource  # ru_maxrss: KB on Linux

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def hardware(device: str) -> str:
    """What a figure was measured on: the CPU model, cores, its bf16 flags, and the GPU when one is used."""
    import platform
    from pathlib import Path

    cpu, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name") and cpu in ("", platform.machine(), platform.processor()):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    bf16 = " ".join(f for f in ("avx512_bf16", "amx_bf16") if f in flags) or "no avx512_bf16/amx_bf16"
    text = f"{cpu}, {os.cpu_count()} cores ({bf16}), torch {torch.__version__}"
    if device.startswith("cuda") and torch.cuda.is_available():
        text = f"{torch.cuda.get_device_name(torch.device(device))}; {text}"
    return text


def process_threads() -> int:
    """Torch threads for this process: the CPUs it was given (Ray's OMP_NUM_THREADS per ClientApp), else its affinity.

    Ray sets OMP_NUM_THREADS to a simulated ClientApp's `client-resources-num-cpus`; without it a
    process may use every CPU it can run on. Two processes that each use all cores slow each
    other down by an order of magnitude, so each one takes only its share.
    """
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    given = os.environ.get("OMP_NUM_THREADS", "")
    return max(1, min(int(given), available)) if given.isdigit() else available


def set_process_threads() -> int:
    """Apply `process_threads()` to torch (intra-op) once; returns the count."""
    threads = process_threads()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


@functools.cache  # once per process: the GPUs a process sees do not change
def warn_if_several_gpus(device: str) -> None:
    """Say which GPU a client trains on when it sees several (one device per client process)."""
    count = torch.cuda.device_count() if device.startswith("cuda") else 0
    if count > 1:
        import logging

        logging.getLogger("flowertune_llm").warning(
            "this client sees %d GPUs (CUDA_VISIBLE_DEVICES=%s) and trains on one, cuda:0 (%s), with its configured "
            "batch; give each client its own GPU share (client-resources-num-gpus) or set CUDA_VISIBLE_DEVICES per "
            "SuperNode", count, os.environ.get("CUDA_VISIBLE_DEVICES", "unset"), torch.cuda.get_device_name(0),
        )


#: glibc's mallopt parameter, and the size from which allocations get their own mapping with it on.
_M_MMAP_THRESHOLD = -3
RELEASE_MEMORY_THRESHOLD = 16 * 2**20


@functools.cache  # the setting holds for the whole process: once is enough
def release_memory_to_os() -> bool:
    """`train.release-memory`: make glibc map every buffer of 16 MB or more on its own and unmap it when freed.

    By default glibc raises its mmap threshold as large buffers are freed (up to 32 MB) and serves
    later ones from its heap, which a step's many short-lived activation buffers fragment: at the
    reference settings the process holds ~9 GB although the step's live data stays under ~4.5 GB.
    With a fixed threshold the resident memory follows the live data, at the price of page
    faults for every new buffer (slower steps; docs/benchmarks.md). Applies to this process, for
    good; no effect (False) where the C library is not glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, RELEASE_MEMORY_THRESHOLD))
    except (OSError, AttributeError):
        return False


def score_label_positions_only(enabled: bool = True) -> None:
    """On CPU, let TRL's fused LM head score only the positions that have a label, as it does on CUDA.

    TRL 1.16 projects only the label positions through the LM head where its Triton kernels run
    (CUDA, XPU) and every position elsewhere, to keep tile shapes fixed for compiled backends.
    Eager CPU has no such constraint, and the prompt and padding positions are most of a batch:
    the same rows go through the same row-wise computation, so the loss and the gradients are
    unchanged up to rounding, at a fraction of the LM-head time and tile memory. Idempotent;
    `enabled=False` (the plain path bench_step measures) puts TRL's own function back.
    """
    import trl.trainer.utils as trl_utils

    current = getattr(trl_utils, "_use_triton", None)
    if current is None:
        return
    original = getattr(current, "flowertune_original", current)
    if not enabled:
        trl_utils._use_triton = original
    elif current is original:

        def compact_on_cpu(device: torch.device) -> bool:
            return device.type == "cpu" or original(device)

        compact_on_cpu.flowertune_original = original  # type: ignore[attr-defined]
        trl_utils._use_triton = compact_on_cpu


#: TRL's LM-head tiles on a CPU: (tokens, vocabulary entries). TRL's defaults (4,096 x 32,768) suit a GPU; on a
#: CPU each elementwise pass over such a tile (~0.5 GB in float32) goes through memory and through the kernel's
#: page zeroing. 256 x 4,096 (4 MB) stays in cache: 2.6x faster at the reference step's shape in bf16, 2.4x in
#: float32, the same log-probs to 2e-6 (tests/benchmarks/bench_lm_head.py, docs/benchmarks.md).
CPU_LM_HEAD_TILE = (256, 4096)


def cpu_lm_head_tiles(enabled: bool = True) -> None:
    """Give TRL's chunked LM head + log-prob kernel cache-sized tiles in this (CPU) process; False restores TRL's.

    Only the tiling changes: every token's log-prob, entropy and gradient are the same sums in
    another grouping (rounding only). Call it in CPU processes only: TRL's GPU kernels read the same
    module constants.
    """
    import trl.kernels.chunked_logprob as kernel
    import trl.trainer.utils as trl_utils

    if not hasattr(kernel, "_flowertune_original_tile"):
        kernel._flowertune_original_tile = (kernel.TOKEN_CHUNK_SIZE, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE)
    tokens, vocab = CPU_LM_HEAD_TILE if enabled else kernel._flowertune_original_tile
    kernel.TOKEN_CHUNK_SIZE, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = tokens, vocab
