"""Shared test helpers (a plain module): offline data paths, run configs, the tiny random Llama builder."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
ALPACA_SUBSET = SHARED_DATA / "alpaca_gpt4" / "alpaca_gpt4_subset.jsonl"
MMLU_DIR = SHARED_DATA / "mmlu"
MMLU_VAL = MMLU_DIR / "mmlu_val.jsonl"

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def default_run_config(**overrides: Any) -> dict[str, Any]:
    """The pyproject's [tool.flwr.app.config], flattened as Flower passes it, plus overrides."""
    from flwr.common.config import flatten_dict

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    flat = flatten_dict(data["tool"]["flwr"]["app"]["config"])
    flat.update(overrides)
    return flat


def tiny_overrides(model_dir: Path | str, **extra: Any) -> dict[str, Any]:
    """Run-config overrides for a tiny model on the local alpaca sample: seconds per round."""
    return {
        "model.name": str(model_dir),
        "static.dataset.name": str(ALPACA_SUBSET),
        "train.seq-length": 64,
        "train.learning-rate-max": 1e-2,
        "train.learning-rate-min": 1e-3,
        "train.training-arguments.per-device-train-batch-size": 4,
        "train.training-arguments.max-steps": 2,
        "train.training-arguments.logging-steps": 1,
        "model.gradient-checkpointing": False,
        "eval.every-round": 0,  # tests that evaluate during training turn it on with local data
        **extra,
    }


def tiny_run_config(model_dir: Path | str, **overrides: Any) -> dict[str, Any]:
    """The full run_config of a tiny-model run (pyproject defaults + tiny_overrides)."""
    return default_run_config(**tiny_overrides(model_dir, **overrides))


#: The tests' tiny Llama: 2 layers, hidden 64 (seconds per round on CPU).
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True)


def make_tiny_llama(out: Path, tokenizer_dir: Path, shape: dict[str, Any] = TINY_LLAMA, seed: int = 0) -> Path:
    """Save a random LlamaForCausalLM of this shape (default: tiny) with SmolLM2's tokenizer and special tokens."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **shape)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    from flowertune_llm.gguf import readable_by_transformers_4

    readable_by_transformers_4(out)  # as the app's own model folders: the official evaluator's transformers 4.x reads it
    return out
