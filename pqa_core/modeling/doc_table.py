"""Where the doc-vector table lives and in what precision: ``model.doc_storage`` and ``model.doc_dtype``.

``memory`` keeps the table in RAM; ``mmap`` keeps it in a safetensors file under the run's output folder
(``tables/rank-<r>/doc_vectors.safetensors``) mapped into memory, so the kernel holds only the pages in
use and writes changed ones back: a table (and the row-wise optimizer's two moments of it, mapped the
same way) larger than the RAM a run is given. ``bfloat16`` halves every one of them; rows are updated
in float32 and stored by stochastic rounding (``pqa_core.training.optim``). A mapped table is filled a block of
rows at a time, never built whole in memory first. Checkpoints hold its contents as usual.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import torch

from pqa_core.config import check_choice
from pqa_core.errors import UsageError
from pqa_core.storage.tensor_files import create_mapped

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # the torch dtype of each model.doc_dtype choice
BLOCK_ROWS = 16 * 1024  # a multiple of 16: random blocks draw the numbers one draw of the whole table would


class TableStorage:
    """Allocates the table (and same-shaped optimizer state) in ``dtype``, in memory or in files under ``folder``."""

    def __init__(self, dtype: torch.dtype = torch.float32, folder: Optional[Path] = None):
        self.dtype, self.folder = dtype, None if folder is None else Path(folder)

    @property
    def mapped(self) -> bool:
        return self.folder is not None

    def zeros(self, name: str, shape: Tuple[int, int]) -> torch.Tensor:
        if self.mapped:
            return create_mapped(self.folder / f"{name}.safetensors", name, shape, self.dtype)
        return torch.zeros(shape)

    def random(self, shape: Tuple[int, int], scale: float) -> torch.Tensor:
        """Gaussian noise times ``scale``; the same numbers in memory and in a mapped file."""
        if not self.mapped:
            return torch.randn(shape) * scale
        table = self.zeros("doc_vectors", shape)
        for start in range(0, shape[0], BLOCK_ROWS):
            rows = min(BLOCK_ROWS, shape[0] - start)
            table[start:start + rows] = torch.randn(rows, shape[1]) * scale
        return table

    def fill_key(self, table: torch.Tensor, keys: torch.Tensor) -> None:
        """``table[:, :keys.shape[1]] = keys``, a block of rows at a time."""
        for start in range(0, keys.shape[0], BLOCK_ROWS):
            table[start:start + BLOCK_ROWS, :keys.shape[1]] = keys[start:start + BLOCK_ROWS]

    def stored(self, table: torch.Tensor) -> torch.Tensor:
        """The table as the model keeps it: a mapped file as it is, an in-memory table copied to ``dtype``."""
        return table if self.mapped else table.to(self.dtype, copy=True)

    def state(self, param: torch.Tensor, name: str) -> torch.Tensor:
        """A zero tensor like the table ``param`` for the optimizer's ``name`` state (a mapped file beside
        the table when it is one)."""
        if self.mapped:
            return create_mapped(self.folder / f"{name}.safetensors", name, tuple(param.shape), param.dtype)
        return torch.zeros_like(param)


def storage_of(config, folder: Optional[Path] = None) -> TableStorage:
    """The storage ``config.model`` asks for (``folder``: where a mapped table goes). A bad value is a usage
    error naming its key."""
    model = config.model
    check_choice("model.doc_dtype", model.doc_dtype)
    check_choice("model.doc_storage", model.doc_storage)
    if model.doc_storage == "mmap" and folder is None:
        raise UsageError("model.doc_storage='mmap' needs a folder for the table (the run's output folder)")
    return TableStorage(DTYPES[model.doc_dtype], folder if model.doc_storage == "mmap" else None)


def table_std(table: torch.Tensor) -> float:
    """The standard deviation of every value, a block of rows at a time for a mapped table."""
    if table.is_contiguous() and table.dtype == torch.float32 and not _is_mapped(table):
        return float(table.std())
    total = total_sq = 0.0
    for start in range(0, table.shape[0], BLOCK_ROWS):
        block = table[start:start + BLOCK_ROWS].double()
        total += float(block.sum())
        total_sq += float((block * block).sum())
    n = table.numel()
    return ((total_sq - total * total / n) / max(n - 1, 1)) ** 0.5


def _is_mapped(table: torch.Tensor) -> bool:
    return table.untyped_storage().filename is not None
