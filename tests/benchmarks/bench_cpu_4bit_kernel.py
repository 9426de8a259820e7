"""Benchmark: bitsandbytes' 4-bit matmul throughput against the number of rows it gets at once.

Run by hand (not part of the test suite):

    python -m tests.benchmarks.bench_cpu_4bit_kernel [--device cpu] [--rows 1,16,64,128,512,2048]

Batching MMLU prompts can only pay off where a bigger matmul runs at more FLOP/s. A single
prompt already hands every layer one row per token (about 100 rows for an MMLU question), so this
prints the throughput of the evaluation's 4-bit layer (fp4, float32 compute, as the protocol
loads it) on SmolLM2-135M's MLP shapes for each row count, beside plain bf16 and float32 matmuls.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial

import bitsandbytes as bnb
import torch

from flowertune_llm.devices import default_device

SHAPES = {"mlp_up (576->1536)": (576, 1536), "mlp_down (1536->576)": (1536, 576)}


def _gflops(fn, rows: int, k: int, n: int, seconds: float = 0.5) -> float:
    fn()
    fn()
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        reps += 1
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return 2 * rows * k * n * reps / (time.perf_counter() - start) / 1e9


def main() -> int:
    """Print GFLOP/s of the 4-bit layer and of plain matmuls for each row count."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--rows", default="1,16,64,128,512,2048")
    args = parser.parse_args()
    torch.manual_seed(0)
    report: dict[str, dict[str, dict[str, float]]] = {}
    with torch.inference_mode():
        for name, (k, n) in SHAPES.items():
            weight = torch.randn(n, k)
            layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.float32, quant_type="fp4")
            layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="fp4")
            layer = layer.to(args.device).eval()
            w32, w16 = weight.to(args.device), weight.to(args.device, torch.bfloat16)
            report[name] = {}
            for rows in (int(r) for r in args.rows.split(",")):
                x = torch.randn(rows, k, device=args.device)
                x16 = x.to(torch.bfloat16)
                calls = {
                    "bnb_4bit": partial(layer, x),
                    "bf16_matmul": partial(torch.matmul, x16, w16.t()),
                    "fp32_matmul": partial(torch.matmul, x, w32.t()),
                }
                report[name][str(rows)] = {
                    kind: round(_gflops(call, rows, k, n), 1) for kind, call in calls.items()
                }
    print(json.dumps({"device": args.device, "torch_threads": torch.get_num_threads(),
                      "gflop_per_s_by_rows": report}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
