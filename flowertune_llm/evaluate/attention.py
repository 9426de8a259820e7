"""Padding-exact batching: a left-padded batch computes each prompt exactly as it would alone.

Two things make a prompt's logits depend on its batch neighbours. Stock SDPA with a padding mask
reduces over the padded key length, so the last bits change with the padding beside a prompt; on
bitsandbytes' CPU 4-bit kernel, which rounds activations to bf16, those bits grow into logit
shifts of up to 0.3 and flipped MMLU predictions (3 of 300 in our checks). And the float32 LM head
is one matrix product over the batch, which BLAS computes with another kernel (and summation
order) for 1 row than for 16. Here every sequence runs SDPA on its own tokens only and the LM head
runs row by row: the very calls, with the very shapes, that a prompt gets alone. The decoder's
4-bit and float32 matmuls, norms and MLPs already work row by row on CPU, so the forward pass is
bit-for-bit the single-prompt one (tested). LLM.int8 is the exception: see `batch_invariant`.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    flash_attention_mask,
)

EXACT_ATTENTION = "flowertune_exact_sdpa"


def unpadded_sdpa_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """SDPA per sequence over its real (left-padded) tokens; padded query rows get zeros.

    `attention_mask` is the 2-D key mask [batch, kv_len] (True = real token) that transformers
    hands to un-padded attention kernels, or None when nothing is padded.
    """
    if attention_mask is None:
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)
    if attention_mask.ndim != 2:
        raise ValueError(f"{EXACT_ATTENTION}: expected a 2-D padding mask, got shape {tuple(attention_mask.shape)}")
    batch, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    real = attention_mask.sum(dim=1)
    if not torch.equal(torch.arange(kv_len, device=real.device) >= kv_len - real[:, None], attention_mask.bool()):
        raise ValueError(f"{EXACT_ATTENTION}: the batch is not left-padded")
    out = query.new_zeros(batch, q_len, query.shape[1], value.shape[-1])
    for b, n in enumerate(real.tolist()):
        start = kv_len - n
        q_start = max(0, q_len - n)  # prefill: pad queries are skipped; decoding: the one query
        rows, _ = sdpa_attention_forward(
            module,
            query[b : b + 1, :, q_start:],
            key[b : b + 1, :, start:],
            value[b : b + 1, :, start:],
            None,
            **kwargs,
        )
        out[b, q_start:] = rows[0]
    return out, None


AttentionInterface.register(EXACT_ATTENTION, unpadded_sdpa_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(EXACT_ATTENTION, flash_attention_mask)


class RowwiseHead(nn.Module):
    """An output layer applied one batch row at a time, so a row never depends on the batch size."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped layer's weight (tied to the input embeddings in SmolLM2)."""
        return self.inner.weight  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """inner(x[i]) for each row i, stacked."""
        if x.shape[0] == 1:
            return self.inner(x)
        return torch.cat([self.inner(x[i : i + 1]) for i in range(x.shape[0])])


def _unwrapped(model: PreTrainedModel) -> PreTrainedModel:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def batch_invariant(model: PreTrainedModel) -> bool:
    """False for LLM.int8 (8-bit) models: their fp16 outlier columns are picked over the whole batch."""
    quant = getattr(_unwrapped(model).config, "quantization_config", None)
    if isinstance(quant, dict):
        quant = SimpleNamespace(**quant)
    return not (getattr(quant, "load_in_8bit", False) and getattr(quant, "llm_int8_threshold", 0) > 0)


def use_exact_batching(model: PreTrainedModel) -> None:
    """Make a (possibly PEFT-wrapped) causal LM give every prompt of a padded batch its solo result."""
    base = _unwrapped(model)
    base.set_attn_implementation(EXACT_ATTENTION)
    head = base.get_output_embeddings()
    if head is not None and not isinstance(head, RowwiseHead):
        base.set_output_embeddings(RowwiseHead(head))
