"""The letter-balance term of `train.mcq-balance`: a question's four rotations should not prefer a letter.

For one question trained in its four cyclic rotations (gold at A, B, C, D), a model that knows
the answer puts its mass on a different letter each time, so the mean of its four A-D
distributions is uniform; a model that leans on a letter prior does not. The term is the KL
divergence of that mean from uniform, averaged over the batch's complete rotation groups, added
to the SFT loss with weight `train.mcq-balance` (the training-time form of removing the prior,
cf. Zheng et al., ICLR 2024, who estimate and remove it at inference, which the leaderboard's
fixed evaluation does not allow).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from flowertune_llm.padding_free import first_label_positions

#: The batch column that says which rotation an example is (0-3; -1: not a rotated question).
ROTATION_COLUMN = "mcq_rotation"
#: ... and the one that says which question (partition row) it belongs to.
ROW_COLUMN = "mcq_row"
GROUP = 4


def letter_balance(letter_logits: torch.Tensor) -> torch.Tensor:
    """Mean over groups of KL(mean_r softmax(logits[g, r]) || uniform), for logits of shape (groups, 4, 4).

    Zero when each group's mean A-D distribution is uniform; log 4 at most (all mass on one letter).
    """
    if letter_logits.numel() == 0:
        return letter_logits.sum()
    mean = torch.softmax(letter_logits.float(), dim=-1).mean(dim=1)  # (groups, 4)
    kl = (mean * torch.log(mean.clamp_min(1e-12))).sum(dim=-1) + math.log(mean.shape[-1])
    return kl.mean()


def complete_groups(rotations: Sequence[int], rows: Sequence[int] | None = None) -> list[int]:
    """Start indices of the runs (i, i+1, i+2, i+3) holding rotations 0, 1, 2, 3 of ONE question (the same row,
    when `rows` is given): the batch's complete questions."""
    rot = [int(r) for r in rotations]
    row = [int(r) for r in rows] if rows is not None else [0] * len(rot)
    return [i for i in range(len(rot) - GROUP + 1)
            if rot[i : i + GROUP] == list(range(GROUP)) and len(set(row[i : i + GROUP])) == 1]


def answer_positions(
    labels: torch.Tensor, bounds: Sequence[tuple[int, int, int]] | None = None
) -> list[tuple[int, int]]:
    """Per example, the (row, position) whose output predicts its first labelled token (the answer letter).

    `bounds` (padding_free.row_bounds) locates the examples of a padding-free batch inside its one row;
    None: one example per (padded) row.
    """
    return [(row, max(pos - 1, 0)) for row, pos in first_label_positions(labels, bounds)]


class LetterBalance:
    """Computes the term for one batch from the backbone's last hidden states (captured by a forward hook).

    TRL's fused LM head returns no logits, so the hook keeps the backbone output and only the four
    letter rows of the LM head are applied, at the answer positions of the complete groups.
    """

    def __init__(self, model: torch.nn.Module, letter_ids: Sequence[int], weight: float) -> None:
        self.model = model
        self.letter_ids = list(letter_ids)
        self.weight = weight
        self._hidden: torch.Tensor | None = None

    def _backbone(self) -> torch.nn.Module:
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return base.get_decoder()

    def _keep(self, _module: torch.nn.Module, _args: Any, output: Any) -> None:
        self._hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state

    @contextmanager
    def capture(self) -> Iterator[None]:
        """Keep the backbone's output of the forward passes inside (for `term`)."""
        handle = self._backbone().register_forward_hook(self._keep)
        try:
            yield
        finally:
            handle.remove()

    def term(
        self, labels: torch.Tensor, rotations: torch.Tensor, bounds: Sequence[tuple[int, int, int]] | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """weight x letter_balance over the batch's complete groups (None when it has none); `bounds` for a
        padding-free batch (padding_free.row_bounds), `rows` each example's question."""
        hidden, self._hidden = self._hidden, None
        starts = complete_groups(rotations.tolist(), None if rows is None else rows.tolist())
        if hidden is None or not starts:
            return None
        if bounds is not None and len(bounds) != len(rotations):
            raise ValueError(f"letter balance: {len(bounds)} packed rows for {len(rotations)} rotation labels")
        at = answer_positions(labels, bounds)
        chosen = [at[s + r] for s in starts for r in range(GROUP)]
        rows = torch.tensor([r for r, _ in chosen], device=hidden.device)
        pos = torch.tensor([p for _, p in chosen], device=hidden.device)
        head = self.model.get_output_embeddings()
        weight = head.weight[self.letter_ids]
        logits = hidden[rows, pos].to(weight.dtype) @ weight.T
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[self.letter_ids]
        return self.weight * letter_balance(logits.float().view(len(starts), GROUP, GROUP))
