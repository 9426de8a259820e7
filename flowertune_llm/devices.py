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
- **One device per client process** (`single_device_config`): a ClientApp that sees several GPUs
  trains on the first it sees, with the batch it was configured with.
"""

from __future__ import annotations

import functools
import os

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
