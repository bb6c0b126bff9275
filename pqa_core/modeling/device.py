"""Where a run computes and in what precision: ``model.device`` and ``model.precision``.

``model.precision=auto`` runs the LLM's forward passes under bfloat16 autocast on a CUDA device that
supports it (weights and optimizer state stay float32; losses are taken in float32) and in float32
everywhere else; ``bf16`` asks for autocast on any device (CPU included), ``fp32`` never. Batches are
collated into pinned memory and copied without blocking when the model is on a GPU.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from pqa_core.config import check_choice
from pqa_core.errors import UsageError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for ``model.precision`` on ``device`` (None: float32, no autocast)."""
    check_choice("model.precision", precision)
    if precision == "fp32":
        return None
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "auto":
        return torch.bfloat16 if cuda_bf16 else None
    if device.type == "cuda" and not cuda_bf16:
        raise UsageError(f"model.precision='bf16' but {torch.cuda.get_device_name(device)} has no bfloat16; "
                         f"use model.precision=fp32")
    return torch.bfloat16


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """``torch.autocast`` to ``dtype`` on ``device``, or nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def pin_batches(device: torch.device) -> bool:
    """Whether batches should be collated into pinned memory (a GPU model: faster, asynchronous copies)."""
    return device.type == "cuda"
