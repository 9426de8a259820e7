"""The leaderboard's evaluation stack, as its `eval.py` loads a checkpoint, beside ours: answer-position logits.

Flower's general-nlp evaluation (which the leaderboard runs unmodified, on CUDA) pins
`peft==0.14.0`; its transformers is a 4.x (4.53.0 here). These are pip-installed into a folder put
first on the path of a child process, so the test process keeps this project's stack. The child
loads the base model as `eval.py` does (4-bit bitsandbytes, fp4 by default, float32 compute; or full
precision with `quantization=0`), the adapter with `PeftModel.from_pretrained(..., torch_dtype=float32)`,
and returns the last-position logits of each prompt. Two changes, both for CPU only: peft 0.14's
`dequantize_bnb_weight` moves 4-bit weights to CUDA before dequantizing (a shim dequantizes where they
are), and bitsandbytes' fused AVX512-BF16 kernel is switched off, as this project's evaluation does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

#: The official evaluation's pinned peft, a transformers 4.x it supports, and what that transformers needs.
OLD_STACK = ("peft==0.14.0", "transformers==4.53.0", "tokenizers==0.21.2", "huggingface_hub==0.33.2")

CHILD = r"""
import json, sys
import torch
import bitsandbytes as bnb
import peft.utils.integrations as integrations
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
import transformers, peft

def dequantize_where_it_is(weight, state=None):  # peft 0.14 moves 4-bit weights to CUDA first; on CPU: in place
    if weight.__class__.__name__ == "Params4bit":
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    return original(weight, state)

original = integrations.dequantize_bnb_weight
integrations.dequantize_bnb_weight = dequantize_where_it_is
for module in ("peft.tuners.lora.bnb", "peft.tuners.lora.dora", "peft.tuners.lora.layer"):
    mod = sys.modules.get(module) or __import__(module, fromlist=["x"])
    if hasattr(mod, "dequantize_bnb_weight"):
        mod.dequantize_bnb_weight = dequantize_where_it_is

args = json.loads(sys.argv[1])
kwargs = {"torch_dtype": torch.float32}
if args["quantization"] == 4:  # eval.py: BitsAndBytesConfig(load_in_4bit=True), torch_dtype=torch.float32
    kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True)
model = AutoModelForCausalLM.from_pretrained(args["base"], **kwargs)
for layer in model.modules():
    if isinstance(layer, bnb.nn.Linear4bit):
        layer.support_avx512bf16_for_cpu = False
if args["peft"]:
    model = peft.PeftModel.from_pretrained(model, args["peft"], torch_dtype=torch.float32)
model.eval()
tokenizer = AutoTokenizer.from_pretrained(args["base"])
rows = []
with torch.no_grad():
    for prompt in args["prompts"]:
        ids = tokenizer.encode(prompt, return_tensors="pt")
        rows.append(model(input_ids=ids).logits[0, -1].float())
torch.save({"logits": torch.stack(rows), "versions": [transformers.__version__, peft.__version__],
            "tokenizer": type(tokenizer).__name__}, args["out"])
"""


def install_old_stack(target: Path) -> Path:
    """pip-install OLD_STACK (no dependencies: the rest comes from this environment) into `target`, once."""
    if not (target / "peft-0.14.0.dist-info").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), *OLD_STACK],
                       check=True, timeout=600)
    return target


def official_logits(stack: Path, base: str, peft_path: str | None, prompts: list[str], out: Path,
                    quantization: int = 4) -> dict:
    """Last-position logits of each prompt as the official evaluator's stack computes them (a child process)."""
    env = {**os.environ, "PYTHONPATH": f"{stack}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    payload = {"base": base, "peft": peft_path, "prompts": prompts, "out": str(out), "quantization": quantization}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(payload)], env=env, timeout=900,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the official evaluator's stack failed:\n{proc.stderr[-3000:]}")
    return torch.load(out)


def our_logits(base: str, peft_path: str | None, prompts: list[str], quantization: int = 4) -> torch.Tensor:
    """The same logits through flowertune-eval's own loading (evaluate.model.load_model), one prompt at a time."""
    from flowertune_llm.evaluate.model import load_model

    model, tokenizer = load_model(base, peft_path, quantization, "cpu")
    rows = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            rows.append(model(input_ids=ids).logits[0, -1].float())
    return torch.stack(rows)
