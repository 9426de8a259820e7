"""Benchmark: TRL's chunked LM head + log-prob kernel (forward and backward) on a CPU, by tile shape.

Run by hand, with nothing else running:

    python -m tests.benchmarks.bench_lm_head                 # the reference step's shape: 2,770 label positions
    python -m tests.benchmarks.bench_lm_head --tokens 400    # a proxy step's

The shape of the reference step (batch 16 x seq 512 of the alpaca sample: 2,770 positions whose next
token is scored) through SmolLM2-135M's tied LM head (49,152 x 576), in bf16 and float32, with the
outputs SFTTrainer asks for (log-probs, entropy, top-1). TRL's defaults tile the logits 4,096 tokens
x 32,768 vocabulary entries: on a CPU every elementwise pass over such a tile goes through memory.
Each row: the tile shape, seconds for forward + backward (best of 3), and the largest difference of
the log-probs, entropies and gradient from TRL's default tiles (they must agree to rounding).
"""

from __future__ import annotations

import argparse
import time

#: (tokens, vocabulary columns) per tile; the first is TRL's default.
TILES = ((4096, 32768), (1024, 8192), (512, 4096), (256, 4096), (256, 2048), (128, 2048))


def run(tokens: int, dtype_name: str, tile: tuple[int, int], reps: int = 3) -> tuple[float, tuple]:
    """Best forward+backward seconds of one tile shape, and its outputs (for the comparison)."""
    import torch
    import trl.kernels.chunked_logprob as kernel

    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(0)
    hidden = (torch.randn(tokens, 576, generator=gen) * 2).to(dtype).requires_grad_()
    weight = (torch.randn(49152, 576, generator=gen) * 0.05).to(dtype)
    targets = torch.randint(0, 49152, (tokens,), generator=gen)
    saved = kernel.TOKEN_CHUNK_SIZE
    kernel.TOKEN_CHUNK_SIZE = tile[0]
    best, out = float("inf"), ()
    try:
        for _ in range(reps):
            hidden.grad = None
            start = time.perf_counter()
            logp, entropy, _, _, top1 = kernel.ChunkedLogProbFunction.apply(
                hidden, weight, None, targets, 1.0, tile[1], None, 1.0, ("log_probs", "entropy", "is_top1"))
            (-(logp.sum()) + 0.01 * entropy.sum()).backward()
            best = min(best, time.perf_counter() - start)
            out = (logp.detach().float(), entropy.detach().float(), hidden.grad.float(), top1)
    finally:
        kernel.TOKEN_CHUNK_SIZE = saved
    return best, out


def main() -> None:
    """Print one row per tile shape and dtype."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2770, help="label positions of the step")
    args = parser.parse_args()
    import torch

    from tests.benchmarks import machine

    print(f"machine: {machine()}")
    for dtype in ("bfloat16", "float32"):
        reference = None
        for tile in TILES:
            seconds, out = run(args.tokens, dtype, tile)
            if reference is None:
                reference, base = out, seconds
            diffs = [float((a - b).abs().max()) for a, b in zip(out[:3], reference[:3])]
            same_top1 = bool(torch.equal(out[3], reference[3]))
            print(f"{dtype:<9} tile {tile[0]:>5} x {tile[1]:>5}: {seconds:6.3f} s forward+backward "
                  f"({base / seconds:4.2f}x TRL's default) | max diff log-prob {diffs[0]:.1e}, entropy {diffs[1]:.1e}, "
                  f"grad {diffs[2]:.1e}, top-1 {'same' if same_top1 else 'DIFFERENT'}", flush=True)


if __name__ == "__main__":
    main()
