"""Base model (4-bit / 8-bit / full precision) + LoRA/DoRA wrapper; adapter <-> float32 arrays."""

from __future__ import annotations

import functools
import weakref
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from peft import (
    LoraConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    prepare_model_for_kbit_training,
)
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

from flowertune_llm.config import ConfigError, LoraSettings, ModelSettings
from flowertune_llm.devices import compute_dtype, use_protocol_arithmetic
from flowertune_llm.gguf import MODEL_CONFIG, resolve_model_path
from flowertune_llm.hub import require_hub_or_cache

AdapterState = dict[str, torch.Tensor]
MODEL_KEY = "model.name"


def quantization_config(bits: int, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    """The bitsandbytes config for 4 or 8 bits (the baseline's defaults, 4-bit computing in `dtype`); None for full precision."""
    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype)
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def check_model_source(name: str) -> None:
    """Fail fast, naming `model.name`, when the model cannot be found (GGUF, folder or hub)."""
    from flowertune_llm.gguf import GgufError, check_gguf_file

    local = Path(name).expanduser()
    if name.lower().endswith(".gguf"):
        try:
            check_gguf_file(local)
        except GgufError as exc:
            raise ConfigError(f"{MODEL_KEY}={name!r}: {exc}") from exc
        return
    if name.startswith((".", "/", "~")) or local.exists():
        if not (local / MODEL_CONFIG).is_file():
            raise ConfigError(f"{MODEL_KEY}={name!r}: no HF model folder ({MODEL_CONFIG}) at {local}")
        return
    require_hub_or_cache(MODEL_KEY, name)
    try:
        AutoConfig.from_pretrained(name)
    except Exception as exc:  # unknown id, gated repo, broken cache
        raise ConfigError(f"{MODEL_KEY}={name!r}: cannot load its config ({type(exc).__name__}: {exc})") from exc


def lora_config(lora: LoraSettings) -> LoraConfig:
    """PEFT's LoraConfig from our settings (targets default to PEFT's per-architecture choice)."""
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        use_dora=lora.use_dora,
        target_modules=list(lora.target_modules) or None,
        bias="none",
        task_type="CAUSAL_LM",
    )


@functools.lru_cache(maxsize=8)  # asked every round (train.round_compute): read the config once per process
def model_shape(name: str) -> tuple[int, int]:
    """(hidden size, MLP size) of a model, from its config alone: the shapes `devices.training_compute` times."""
    config = AutoConfig.from_pretrained(resolve_model_path(name)).get_text_config()
    hidden = int(config.hidden_size)
    return hidden, int(getattr(config, "intermediate_size", None) or 4 * hidden)


def load_base_model(settings: ModelSettings, device: str, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """Load the (quantized) base model on one device, computing in `dtype` (default: the device's).

    A CPU model in bf16 (`train.cpu-compute`) stays bf16 throughout: PEFT's k-bit preparation
    would cast its embeddings, norms and LM head back to float32, and the activations with them.
    """
    dtype = dtype or compute_dtype(device)
    quant = quantization_config(settings.quantization, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(settings.name),
        quantization_config=quant,
        dtype=dtype,
        device_map={"": device},
    )
    use_protocol_arithmetic(model)  # never bitsandbytes' fused bf16 CPU kernel: dequantize, then matmul
    if quant is not None and not (device == "cpu" and dtype == torch.bfloat16):
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=settings.checkpointing(device)
        )
    elif settings.checkpointing(device):
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    return model


def build_peft_model(settings: ModelSettings, device: str, seed: int, dtype: torch.dtype | None = None) -> PeftModel:
    """Base model + a freshly initialised adapter (deterministic for a given seed)."""
    model = load_base_model(settings, device, dtype)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, lora_config(settings.lora))
    peft_model.config.use_cache = False
    return peft_model


_ADAPTER_PARAMETERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def adapter_parameters(model: PeftModel) -> dict[str, torch.nn.Parameter]:
    """PEFT's saved name -> the model's parameter, found once per model (a round then copies, no state-dict walk).

    Parameter objects survive a dtype change of their data (TRL's bf16 cast, `apply_adapter_precision`).
    """
    found = _ADAPTER_PARAMETERS.get(model)
    if found is None:
        by_storage = {(p.data_ptr(), p.shape): p for p in model.parameters()}
        found = {}
        for name, tensor in get_peft_model_state_dict(model).items():
            param = by_storage.get((tensor.data_ptr(), tensor.shape))
            if param is None:
                raise RuntimeError(f"adapter tensor {name} is not one of the model's parameters")
            found[name] = param
        _ADAPTER_PARAMETERS[model] = found
    return found


def adapter_state(model: PeftModel) -> AdapterState:
    """The adapter's tensors as float32 on CPU (TRL may have cast them to bf16), copied.

    Always a copy: a float32 CPU parameter would otherwise be returned as itself, and the next
    round's reset of a kept model would overwrite this round's result in place.
    """
    return {
        k: p.detach().to(device="cpu", dtype=torch.float32, copy=True).contiguous()
        for k, p in adapter_parameters(model).items()
    }


def set_adapter_state(model: PeftModel, state: AdapterState) -> None:
    """Load adapter tensors into the model, refusing missing or unexpected names."""
    params = adapter_parameters(model)
    if set(state) != set(params):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ValueError(f"adapter mismatch: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, param in params.items():  # all checked before any is copied
        if state[name].shape != param.shape:
            raise ValueError(f"adapter tensor {name}: shape {tuple(state[name].shape)}, expected {tuple(param.shape)}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name])


def state_to_arrays(state: AdapterState, wire_dtype: str = "float32") -> ArrayRecord:
    """Adapter tensors -> ArrayRecord: float32, or bf16 bit patterns carried as uint16."""
    if wire_dtype == "bf16":  # Flower cannot carry bf16: send its 16 bits as uint16
        arrays = {k: v.to(torch.bfloat16).view(torch.uint16).numpy() for k, v in state.items()}
    else:
        arrays = {k: v.to(torch.float32).numpy() for k, v in state.items()}
    return ArrayRecord({k: Array(np.ascontiguousarray(a)) for k, a in arrays.items()})


def arrays_to_state(arrays: ArrayRecord) -> AdapterState:
    """ArrayRecord (float32 or bf16-as-uint16) -> float32 CPU tensors."""
    state = {}
    for k, a in arrays.items():
        array = a.numpy()
        if array.dtype == np.uint16:
            state[k] = torch.from_numpy(array.copy()).view(torch.bfloat16).to(torch.float32)
        else:
            state[k] = torch.from_numpy(np.array(array, dtype=np.float32))
    return state


def initial_adapter(settings: ModelSettings, seed: int) -> tuple[AdapterState, LoraConfig]:
    """The round-0 global adapter, built on CPU from the real base weights (DoRA needs them)."""
    model = build_peft_model(settings, "cpu", seed)
    state = adapter_state(model)
    config = model.peft_config["default"]
    del model
    return state, config
