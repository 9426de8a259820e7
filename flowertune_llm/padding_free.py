"""`train.padding-free`: a step computes its rows' real tokens only, with attention kept inside each row.

The batch's rows are laid end to end as ONE row (TRL's padding-free collator: position ids
restart at each row, `cu_seq_lens_q` holds the row boundaries, the first token of each row gets
no label), so every linear layer, norm, MLP and the LM head see real tokens only. Attention then
runs SDPA with `is_causal` on each row's own segment (`segment_sdpa_forward`), as FlashAttention's
variable-length kernels do on GPUs: transformers' own SDPA path would build one dense
block-diagonal mask over the whole flattened batch, quadratic in its total length. The same rows
give the same loss and gradients as the padded batch, up to float rounding (tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

#: The attention implementation a padding-free training model runs; "sdpa" otherwise.
SEGMENT_ATTENTION = "flowertune_segment_sdpa"
PADDED_ATTENTION = "sdpa"


def segment_sdpa_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cu_seq_lens_q: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal SDPA on each segment [cu[i], cu[i+1]) of a one-row packed batch; plain SDPA when not packed."""
    kwargs.pop("cu_seq_lens_k", None)
    if attention_mask is not None:
        raise ValueError(f"{SEGMENT_ATTENTION}: got a padding mask; a padding-free batch has none (use 'sdpa')")
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"{SEGMENT_ATTENTION}: a packed batch is one row, got {query.shape[0]}")
    bounds = cu_seq_lens_q.tolist()
    parts = [
        sdpa_attention_forward(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], None, **kwargs)[0]
        for s, e in zip(bounds[:-1], bounds[1:])
        if e > s
    ]
    return torch.cat(parts, dim=1), None


AttentionInterface.register(SEGMENT_ATTENTION, segment_sdpa_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(SEGMENT_ATTENTION, flash_attention_mask)  # None: no dense mask is built


def collator(pad_token_id: int) -> DataCollatorForLanguageModeling:
    """TRL's own padding-free collator (passed to the trainer, so TRL still truncates rows to `max_length`)."""
    return DataCollatorForLanguageModeling(pad_token_id=pad_token_id, padding_free=True)


def use_attention(model: PreTrainedModel, padding_free: bool) -> None:
    """Give a (possibly PEFT-wrapped) training model the attention its batches need; cheap, idempotent."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    wanted = SEGMENT_ATTENTION if padding_free else PADDED_ATTENTION
    if base.config._attn_implementation != wanted:
        base.set_attn_implementation(wanted)


def row_bounds(batch: dict[str, Any]) -> list[tuple[int, int, int]] | None:
    """(row of the model input, start, end) of each example of a padding-free batch; None for a padded one."""
    cu = batch.get("cu_seq_lens_q")
    if cu is None:
        return None
    bounds = [int(b) for b in cu]
    return [(0, s, e) for s, e in zip(bounds[:-1], bounds[1:])]


def first_label_positions(labels: torch.Tensor, bounds: Sequence[tuple[int, int, int]] | None) -> list[tuple[int, int]]:
    """Per example, (row, position) of its first labelled token: padded rows, or the segments of a packed row."""
    if bounds is None:
        has = labels != -100
        first = has.float().argmax(dim=1).tolist()
        return [(r, p) for r, p in enumerate(first)]
    out = []
    for row, start, end in bounds:
        labelled = (labels[row, start:end] != -100).nonzero()
        out.append((row, start + (int(labelled[0]) if len(labelled) else 0)))
    return out
