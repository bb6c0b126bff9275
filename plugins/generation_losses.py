"""Built-in generation losses: logits ``[B, T, V]`` aligned with labels ``[B, T]`` (-100 = ignore) -> scalar.

Both average over the non-ignored tokens of the whole batch (``batch_mean``: the global batch when
several processes train). A batch with no non-ignored token gives 0 (connected to the graph), not NaN.
"""
from __future__ import annotations

from typing import Annotated, Optional

import torch
import torch.nn.functional as F

from pqa_core.training.distributed import batch_mean
from pqa_core.hookspecs import hookimpl
from pqa_core.interfaces import GenerationLoss, Range

IGNORE_INDEX = -100


def _check(name: str, logits: torch.Tensor, labels: torch.Tensor):
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"{name} loss expects logits [B, T, V] and labels [B, T], got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")


def _token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    keep = labels != IGNORE_INDEX
    loss = batch_mean(F.cross_entropy(logits[keep].float(), labels[keep], reduction="none"))
    return loss if bool(keep.any()) else loss + logits.sum() * 0.0


class CrossEntropyLoss(GenerationLoss):
    """Token cross-entropy over the non-ignored labels, mean over tokens."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor,
                teacher_logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        _check("ce", logits, labels)
        return _token_ce(logits, labels)


class KLDistillLoss(GenerationLoss):
    """``CE + alpha * T^2 * KL(teacher || student)`` at temperature ``T``, on the non-ignored positions.

    The teacher reads the gold passage as text: the run's LLM with its adapter off, or the trained text
    reader ``teacher_adapter`` names (``pqa_core.modeling.teacher``). Its logits are a fixed target (detached).
    """

    needs_teacher = True

    def __init__(self, alpha: Annotated[float, Range(0), "weight of the KL term added to the cross-entropy"] = 1.0,
                 temperature: Annotated[float, Range(0, low_open=True), "softens both distributions"] = 1.0,
                 teacher_adapter: Annotated[str, "the teacher: a trained text reader (a LoRA adapter folder, a "
                                                 "checkpoint holding one, or a text-reader artifact); empty = the "
                                                 "LLM with its adapter off"] = ""):
        super().__init__()
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.teacher_adapter = str(teacher_adapter)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor,
                teacher_logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        _check("kl_distill", logits, labels)
        if teacher_logits is None:
            raise ValueError("kl_distill loss needs teacher_logits (the LLM's logits with the gold passage "
                             "in context); got None")
        if teacher_logits.shape != logits.shape:
            raise ValueError(f"kl_distill loss: teacher_logits shape {tuple(teacher_logits.shape)} "
                             f"!= logits shape {tuple(logits.shape)}")
        ce = _token_ce(logits, labels)
        keep = labels != IGNORE_INDEX
        if not bool(keep.any()):
            return ce
        t = self.temperature
        student = F.log_softmax(logits[keep].float() / t, dim=-1)
        teacher = F.log_softmax(teacher_logits[keep].detach().float() / t, dim=-1)
        kl = batch_mean(F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1))  # sum over V
        return ce + self.alpha * t * t * kl

    def extra_repr(self) -> str:
        teacher = f", teacher_adapter={self.teacher_adapter!r}" if self.teacher_adapter else ""
        return f"alpha={self.alpha}, temperature={self.temperature}{teacher}"


@hookimpl
def pqa_register_generation_losses(register):
    register("ce", CrossEntropyLoss)
    register("kl_distill", KLDistillLoss)
