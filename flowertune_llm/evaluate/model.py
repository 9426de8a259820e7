"""The evaluated model: loaded as the official script loads it, its adapter checked against its base, DoRA norms."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from peft.tuners.lora.dora import DoraLinearLayer
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

import flowertune_llm.ml_stack  # noqa: F401  (progress bars quiet, lazy names resolved)
from flowertune_llm.devices import use_protocol_arithmetic
from flowertune_llm.gguf import imported_source, model_identity
from flowertune_llm.rundir import ADAPTER_CONFIG, ADAPTER_WEIGHTS

LOG = logging.getLogger("flowertune_llm.evaluate")


class EvalModelError(ValueError):
    """The model or adapter cannot be used; the message names the path."""


def same_base(adapter_base: str, base: str) -> bool:
    if adapter_base == base or model_identity(adapter_base) == model_identity(base):
        return True
    a, b = Path(adapter_base).expanduser(), Path(base).expanduser()
    if a.exists() and b.exists():
        return False  # two local models with different content
    return a.name.lower() == b.name.lower()  # hub id vs. a local copy of the same model


def _working_base(adapter_base: str) -> str | None:
    """A value of --base-model-name-path that would load the adapter's own base model, if one exists here."""
    source = imported_source(adapter_base)
    if source and Path(source.get("gguf", "")).is_file():
        return source["gguf"]
    if Path(adapter_base).expanduser().exists() or not adapter_base.startswith(("/", ".", "~")):
        return adapter_base
    return None


def check_peft_path(peft_path: str, base: str) -> None:
    """Refuse an adapter folder that is missing or was trained on another base model."""
    config_file = Path(peft_path).expanduser() / ADAPTER_CONFIG
    if not config_file.is_file():
        raise EvalModelError(f"--peft-path {peft_path}: no {ADAPTER_CONFIG} there")
    adapter_base = json.loads(config_file.read_text()).get("base_model_name_or_path") or ""
    if adapter_base and not same_base(adapter_base, base):
        working = _working_base(adapter_base)
        hint = (
            f"; use --base-model-name-path {working}"
            if working
            else " (not found on this machine; pass that model, or its .gguf file)"
        )
        raise EvalModelError(
            f"--peft-path {peft_path} was trained on base model {adapter_base!r}, "
            f"but --base-model-name-path is {base!r}{hint}"
        )


def load_model(
    base: str, peft_path: str | None, quantization: int, device: str
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Base model as the official script loads it (4-bit: bnb defaults, float32), + adapter."""
    if peft_path:
        check_peft_path(peft_path, base)
    if quantization == 4:
        quant, dtype = BitsAndBytesConfig(load_in_4bit=True), torch.float32
    elif quantization == 8:
        quant, dtype = BitsAndBytesConfig(load_in_8bit=True), torch.float16
    elif quantization == 0:
        quant, dtype = None, torch.float32
    else:
        raise EvalModelError(f"--quantization {quantization}: use 4, 8 or 0 (none)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(
            base, quantization_config=quant, dtype=dtype, device_map={"": device}
        )
    except OSError as exc:
        raise EvalModelError(f"--base-model-name-path {base}: cannot load ({exc})") from exc
    use_protocol_arithmetic(model)  # the protocol's float32 arithmetic on every CPU (devices.py)
    if peft_path:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, peft_path)
        except RuntimeError as exc:  # size mismatch: adapter for another architecture
            raise EvalModelError(f"--peft-path {peft_path}: does not fit {base}: {exc}") from exc
    model.eval()
    return model, tokenizer


@contextlib.contextmanager
def dora_norm_cache(model: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Compute each DoRA layer's weight norm once for this model's current adapter, not per forward.

    The norm depends only on the (frozen) base weight and the adapter, not on the input, so PEFT's
    own cache gives the same logits bit for bit; it is emptied on entry and exit because the
    caller may swap the adapter's tensors between evaluations. `enabled=False` measures the
    uncached cost (bench_dora_eval).
    """
    from peft.helpers import DoraCaching

    if not enabled:
        yield
        return
    layers = [m for m in model.modules() if isinstance(m, DoraLinearLayer)]
    for layer in layers:
        layer._cache_clear()
    try:
        with DoraCaching():
            yield
    finally:
        for layer in layers:
            layer._cache_clear()


def adapter_sha256(peft_path: str | Path) -> str:
    """SHA-256 of a PEFT folder's adapter_model.safetensors (the checkpoint's identity)."""
    from flowertune_llm.gguf import content_hash

    return content_hash(Path(peft_path) / ADAPTER_WEIGHTS)


#: adapter_config.json fields that do not change what the adapter computes (where it was trained, versions).
_ADAPTER_CONFIG_BOOKKEEPING = ("base_model_name_or_path", "revision", "peft_version", "auto_mapping")


def adapter_config_sha256(peft_path: str | Path) -> str:
    """SHA-256 of the adapter config's computing fields (r, lora_alpha, use_dora, target modules, ...)."""
    import hashlib
    import json

    config = json.loads((Path(peft_path) / ADAPTER_CONFIG).read_text())
    kept = {k: v for k, v in config.items() if k not in _ADAPTER_CONFIG_BOOKKEEPING}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()
