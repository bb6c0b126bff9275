"""The five component contracts every plugin implements.

All are ``torch.nn.Module`` subclasses, so their parameters train with the
model, move with ``.to()`` and save with the checkpoint. Shapes below use
B = batch, N = number of documents, d_q = query-vector size, d_z = doc-vector
size, m = memory (soft) tokens per document, d_model = LLM hidden size.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class QueryEncoder(nn.Module):
    """Token ids + mask -> query vectors ``[B, d_q]``.

    ``output_dim`` is set by the constructor. An encoder with its own
    vocabulary (e.g. MiniLM) sets ``tokenizer``; the data collator then
    tokenizes questions with it. Otherwise it reads the LLM's token ids.
    """

    output_dim: int
    tokenizer = None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Selector(nn.Module):
    """Query vectors ``[B, d_q]`` and doc vectors ``[N, d_z]`` -> scores ``[B, N]`` (higher is better)."""

    def forward(self, query_vectors: torch.Tensor, doc_vectors: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Projection(nn.Module):
    """Doc latents ``z [..., d_z]`` -> soft-prompt embeddings ``[..., m, d_model]`` the LLM reads."""

    num_tokens: int

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class RetrievalLoss(nn.Module):
    """Scores ``[B, N]`` and a boolean gold mask ``[B, N]`` (one or more gold docs per row) -> scalar."""

    def forward(self, scores: torch.Tensor, gold_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class GenerationLoss(nn.Module):
    """Logits ``[B, T, V]`` aligned with labels ``[B, T]`` (``logits[:, t]`` predicts ``labels[:, t]``;
    -100 = ignore) -> scalar.

    A loss that sets ``needs_teacher = True`` also receives ``teacher_logits``
    ``[B, T, V]``, aligned the same way, from the LLM reading the gold passage
    text in context (xRAG-style distillation).
    """

    needs_teacher = False

    def forward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        teacher_logits: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        raise NotImplementedError


COMPONENT_KINDS = {
    "selector": Selector,
    "query_encoder": QueryEncoder,
    "projection": Projection,
    "retrieval_loss": RetrievalLoss,
    "generation_loss": GenerationLoss,
}
"""Config namespace -> interface class. The config key ``selector.name`` picks a selector, and so on."""
