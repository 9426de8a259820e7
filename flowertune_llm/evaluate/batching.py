"""Whether batches give the one-at-a-time answers on this device: the probe, and the fallback."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

import flowertune_llm.ml_stack  # noqa: F401  (progress bars quiet, lazy names resolved)
from flowertune_llm.evaluate.attention import batch_invariant
from flowertune_llm.rules import BATCHING_EXACT, BATCHING_INEXACT, BATCHING_SOLO
from flowertune_llm.evaluate.generation import generate

LOG = logging.getLogger("flowertune_llm.evaluate")


@dataclass(frozen=True)
class BatchingCheck:
    """What the on-device probe found, and so how the questions were scored."""

    mode: str  # rules.BATCHING_EXACT | BATCHING_SOLO | BATCHING_INEXACT
    batch_size: int  # the batch size the scoring used
    requested_batch_size: int
    probe_prompts: int = 0
    differing: int = 0  # probe prompts whose answer-position logits differ batched vs alone
    max_abs_diff: float = 0.0
    flipped: int = 0  # probe prompts whose greedy answer token differs
    reason: str = ""

    def to_dict(self) -> dict:
        """JSON-friendly view for results.json."""
        return asdict(self)


def probe_prompts(encoded_lengths: Sequence[int], count: int) -> list[int]:
    """Indices of `count` prompts spread evenly over the token lengths (so probe batches are padded)."""
    order = sorted(range(len(encoded_lengths)), key=lambda i: encoded_lengths[i])
    if count >= len(order):
        return order
    step = (len(order) - 1) / max(count - 1, 1)
    return [order[round(k * step)] for k in range(count)]


@dataclass
class SoloAnswers:
    """Prompts the probe already scored one at a time: their official answers, reused by the scoring."""

    texts: dict[int, str] = field(default_factory=dict)
    letter_logits: dict[int, torch.Tensor] = field(default_factory=dict)


def check_batching(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    batch_size: int,
    allow_inexact: bool = False,
    new_tokens: Sequence[int] | None = None,
    columns: Sequence[int] = (),
) -> tuple[BatchingCheck, SoloAnswers]:
    """Decide, on this device, whether batches give the one-at-a-time answers; fall back if not.

    Batched and solo answers are equal only where the device's kernels compute a row the same way
    whatever the batch (BLAS, bitsandbytes and cuBLAS choose kernels by shape and CPU), so this
    is measured, not assumed: a batch and a half of the run's own prompts, spread over their
    lengths, is scored batched and one at a time, and the answer-position logits are compared
    bit for bit. Any difference means one prompt at a time (or, with `allow_inexact`, batches
    kept and the result marked "inexact"). The probe's solo answers are official answers, so
    they are returned (texts, and the logits of `columns`) for the scoring to reuse.
    """
    solo = SoloAnswers()
    if batch_size <= 1 or len(prompts) <= 1:
        return BatchingCheck(BATCHING_SOLO, 1, batch_size, reason="batch size 1"), solo
    if not batch_invariant(model):
        reason = "8-bit (LLM.int8) picks its outlier columns over the whole batch"
        if allow_inexact:
            return BatchingCheck(BATCHING_INEXACT, batch_size, batch_size, reason=reason), solo
        LOG.warning("--batch-size %d: %s; scoring one prompt at a time", batch_size, reason)
        return BatchingCheck(BATCHING_SOLO, 1, batch_size, reason=reason), solo
    new_tokens = list(new_tokens) if new_tokens is not None else [1] * len(prompts)
    length = Counter(new_tokens).most_common(1)[0][0]  # probe prompts share one answer length
    pool = [i for i, n in enumerate(new_tokens) if n == length]
    lengths = [len(tokenizer(prompts[i]).input_ids) for i in pool]
    picked = [pool[k] for k in probe_prompts(lengths, batch_size + max(1, batch_size // 2))]
    _, batched = generate(model, tokenizer, [prompts[i] for i in picked], length, batch_size)
    texts, alone = generate(model, tokenizer, [prompts[i] for i in picked], length, 1)
    for k, i in enumerate(picked):
        solo.texts[i], solo.letter_logits[i] = texts[k], alone[k, list(columns)]
    differing = int((batched != alone).any(dim=1).sum())
    figures = {
        "probe_prompts": len(picked),
        "differing": differing,
        "max_abs_diff": float((batched - alone).abs().max()),
        "flipped": int((batched.argmax(dim=1) != alone.argmax(dim=1)).sum()),
    }
    if differing == 0:
        return BatchingCheck(BATCHING_EXACT, batch_size, batch_size, **figures), solo
    line = (
        f"batching check: {differing} of {len(picked)} probe prompts give other answer-position logits "
        f"batched than one at a time on this device (largest difference {figures['max_abs_diff']:.3g}, "
        f"{figures['flipped']} predictions flipped); "
    )
    if allow_inexact:
        LOG.warning("%skeeping batches of %d (--allow-inexact-batching)", line, batch_size)
        return BatchingCheck(BATCHING_INEXACT, batch_size, batch_size, **figures, reason="probe differed"), SoloAnswers()
    LOG.warning("%sscoring one prompt at a time (--allow-inexact-batching keeps the batches)", line)
    return BatchingCheck(BATCHING_SOLO, 1, batch_size, **figures, reason="probe differed"), solo
