"""Built-in retrieval losses: scores ``[B, N]`` + boolean gold mask ``[B, N]`` -> scalar.

A row may have several gold documents. A row with none is an error (it would
otherwise contribute a silent 0 or NaN). Means are ``pqa_core.training.distributed.batch_mean``: over the
whole global batch when several processes train.
"""
from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F

from pqa_core.training.distributed import batch_mean
from pqa_core.hookspecs import hookimpl
from pqa_core.interfaces import Range, RetrievalLoss


def _check(name: str, scores: torch.Tensor, gold_mask: torch.Tensor) -> torch.Tensor:
    if scores.dim() != 2 or gold_mask.shape != scores.shape:
        raise ValueError(f"{name} loss expects scores [B, N] and gold_mask of the same shape, got "
                         f"{tuple(scores.shape)} and {tuple(gold_mask.shape)}")
    gold_mask = gold_mask.to(device=scores.device, dtype=torch.bool)
    empty = ~gold_mask.any(dim=1)
    if bool(empty.any()):
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(f"{name} loss: row(s) {rows[:10]} of the batch have no gold document")
    return gold_mask


class GoldNLLLoss(RetrievalLoss):
    """Mean, over all gold (row, doc) pairs, of ``-log_softmax(scores)`` at the gold doc."""

    def forward(self, scores: torch.Tensor, gold_mask: torch.Tensor) -> torch.Tensor:
        gold_mask = _check("gold_nll", scores, gold_mask)
        log_probs = F.log_softmax(scores.float(), dim=-1)
        return batch_mean(-log_probs[gold_mask])


class InfoNCELoss(RetrievalLoss):
    """Multi-positive InfoNCE, mean over rows: ``-log(sum_gold exp(s/t) / sum_all exp(s/t))``."""

    def __init__(self, temperature: Annotated[float, Range(0, low_open=True), "divides the scores"] = 1.0):
        super().__init__()
        self.temperature = float(temperature)

    def forward(self, scores: torch.Tensor, gold_mask: torch.Tensor) -> torch.Tensor:
        gold_mask = _check("infonce", scores, gold_mask)
        logits = scores.float() / self.temperature
        gold = logits.masked_fill(~gold_mask, float("-inf"))
        return batch_mean(torch.logsumexp(logits, dim=-1) - torch.logsumexp(gold, dim=-1))

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class MarginLoss(RetrievalLoss):
    """Hinge, mean over rows: ``relu(margin - (lowest gold score - highest non-gold score))``.

    A row whose documents are all gold has no negative and contributes 0.
    """

    def __init__(self, margin: Annotated[float, Range(0), "how far the lowest gold score must lead"] = 1.0):
        super().__init__()
        self.margin = float(margin)

    def forward(self, scores: torch.Tensor, gold_mask: torch.Tensor) -> torch.Tensor:
        gold_mask = _check("margin", scores, gold_mask)
        scores = scores.float()
        lowest_gold = scores.masked_fill(~gold_mask, float("inf")).min(dim=-1).values
        hardest_negative = scores.masked_fill(gold_mask, float("-inf")).max(dim=-1).values
        has_negative = (~gold_mask).any(dim=-1)
        gap = torch.where(has_negative, lowest_gold - hardest_negative, torch.full_like(lowest_gold, float("inf")))
        return batch_mean(F.relu(self.margin - gap))

    def extra_repr(self) -> str:
        return f"margin={self.margin}"


@hookimpl
def pqa_register_retrieval_losses(register):
    register("gold_nll", GoldNLLLoss)
    register("infonce", InfoNCELoss)
    register("margin", MarginLoss)
