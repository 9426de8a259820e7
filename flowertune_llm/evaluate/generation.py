"""Greedy generation in left-padded batches, with the option letters' logits at the answer position."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import (
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

import flowertune_llm.ml_stack  # noqa: F401  (progress bars quiet, lazy names resolved)
from flowertune_llm.evaluate.attention import use_exact_batching
from flowertune_llm.evaluate.protocol import (
    LETTERS,
)


def left_pad(
    encoded: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as one left-padded batch: (input_ids, attention_mask), padding on the left."""
    width = max(len(ids) for ids in encoded)
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + list(ids) for ids in encoded], device=device)
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
    return input_ids, mask


def letter_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The token each option letter starts with, as the model would write it at the answer position."""
    return [tokenizer(letter, add_special_tokens=False).input_ids[0] for letter in LETTERS]


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    progress: tqdm | None = None,
    columns: Sequence[int] | None = None,
) -> tuple[list[str], torch.Tensor]:
    """Greedy continuations, plus the logits at the answer position (first new token), in prompt order.

    Prompts are sorted by token length and left-padded in batches of `batch_size`, with
    padding-exact attention and a row-wise output layer (`attention.use_exact_batching`), so a
    prompt's answer does not depend on its batch where the device's kernels allow it (see
    `check_batching`). `columns` keeps only those vocabulary entries of the logits (all if None):
    the letter ceiling needs four of them, from this same forward pass.
    """
    use_exact_batching(model)
    encoded = [tokenizer(p).input_ids for p in prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
        return_dict_in_generate=True, output_logits=True,
    )
    outputs: list[str] = [""] * len(prompts)
    first: torch.Tensor | None = None
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        input_ids, attention_mask = left_pad([encoded[i] for i in idx], pad_id, device)
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=gen_config)
        logits = out.logits[0].float()
        if columns is not None:
            logits = logits[:, list(columns)]
        if first is None:
            first = torch.empty(len(prompts), logits.shape[1])
        first[idx] = logits.cpu()
        for i, tokens in zip(idx, out.sequences[:, input_ids.shape[1] :]):
            outputs[i] = tokenizer.decode(tokens, skip_special_tokens=True)
        if progress is not None:
            progress.update(len(idx))
    return outputs, first if first is not None else torch.empty(0, 0)
