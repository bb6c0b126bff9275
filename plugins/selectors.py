"""Built-in selectors: query vectors ``[B, d_q]`` x doc vectors ``[N, d_z]`` -> scores ``[B, N]``.

All of them score as a dot product between a query-side and a document-side vector
(``embed_queries`` / ``embed_documents``), so scoring every document stays O(B * N * d), and
at evaluation a ``pqa_core.modeling.selection_index`` index searches the document side.
"""
from __future__ import annotations

from typing import Annotated, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pqa_core.hookspecs import hookimpl
from pqa_core.interfaces import Range, Selector
from pqa_core.modeling.staleness import Stamp


def _check(query_vectors: torch.Tensor, doc_vectors: torch.Tensor, d_q: Optional[int], d_z: Optional[int]):
    if query_vectors.dim() != 2 or doc_vectors.dim() != 2:
        raise ValueError(f"selector expects query_vectors [B, d_q] and doc_vectors [N, d_z], got "
                         f"{tuple(query_vectors.shape)} and {tuple(doc_vectors.shape)}")
    if d_q is not None and query_vectors.shape[-1] != d_q:
        raise ValueError(f"selector built for query vectors of size {d_q}, got {query_vectors.shape[-1]}")
    if d_z is not None and doc_vectors.shape[-1] != d_z:
        raise ValueError(f"selector built for doc vectors of size {d_z}, got {doc_vectors.shape[-1]}")


class DotSelector(Selector):
    """``q @ z.T``. Needs d_q == d_z. No parameters."""

    def forward(self, query_vectors: torch.Tensor, doc_vectors: torch.Tensor) -> torch.Tensor:
        _check(query_vectors, doc_vectors, None, None)
        return query_vectors @ doc_vectors.T

    def embed_queries(self, query_vectors: torch.Tensor) -> torch.Tensor:
        return query_vectors

    def embed_documents(self, doc_vectors: torch.Tensor) -> torch.Tensor:
        return doc_vectors


class CosineSelector(Selector):
    """Cosine similarity divided by ``temperature`` (so scores lie in [-1/t, 1/t]).

    Normalising the N doc vectors costs more than the score matmul itself at large N (it reads and
    writes the whole matrix), so while no gradient has to reach them (evaluation, ``torch.no_grad``,
    frozen doc vectors) the normalised matrix is kept and reused until the doc vectors change
    (``pqa_core.modeling.staleness.Stamp``: the tensor, its storage, layout and version counter, which every
    in-place update, an optimizer step or ``load_state_dict`` included, bumps). It holds one
    normalised copy of the doc vectors. With gradients flowing to the doc vectors (training), they
    are normalised on every call.
    """

    def __init__(self, temperature: Annotated[float, Range(0, low_open=True),
                                              "divides the cosine: lower is a sharper softmax"] = 0.05):
        super().__init__()
        self.temperature = float(temperature)
        self._cache = None  # (stamp of the doc vectors, normalised doc vectors)

    def forward(self, query_vectors: torch.Tensor, doc_vectors: torch.Tensor) -> torch.Tensor:
        _check(query_vectors, doc_vectors, None, None)
        return self.embed_queries(query_vectors) @ self.embed_documents(doc_vectors).T

    def embed_queries(self, query_vectors: torch.Tensor) -> torch.Tensor:
        # scale the B queries, not the B x N scores
        return F.normalize(query_vectors, dim=-1) / self.temperature

    def embed_documents(self, doc_vectors: torch.Tensor) -> torch.Tensor:
        return self.normalized_docs(doc_vectors)

    def normalized_docs(self, doc_vectors: torch.Tensor) -> torch.Tensor:
        """``F.normalize(doc_vectors, dim=-1)``, from the cache when that is safe and up to date."""
        if torch.is_grad_enabled() and doc_vectors.requires_grad:
            self._cache = None  # training: the gradient must flow through the normalisation
            return F.normalize(doc_vectors, dim=-1)
        if torch.is_inference_mode_enabled():  # its result could not be saved for a later backward
            return F.normalize(doc_vectors, dim=-1)
        cached = self._cache
        if cached is not None and cached[0].matches([doc_vectors]):
            return cached[1]
        stamp = Stamp.of([doc_vectors])
        z = F.normalize(doc_vectors.detach(), dim=-1)
        self._cache = None if stamp is None else (stamp, z)  # an inference-mode tensor: nothing to key on
        return z

    def __getstate__(self):  # pickling (torch.save of the module): a weak reference cannot be pickled
        state = self.__dict__.copy()
        state["_cache"] = None
        return state

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class BilinearSelector(Selector):
    """``q W z``, with a trainable ``W [d_q, d_z]``.

    ``W`` starts as the identity when d_q == d_z (the selector starts as ``dot``),
    else as a random map with unit-ish gain.
    """

    def __init__(self, d_z: int, output_dim: Optional[int] = None):
        super().__init__()
        d_q = d_z if output_dim is None else output_dim
        self.d_q, self.d_z = int(d_q), int(d_z)
        if d_q == d_z:
            weight = torch.eye(d_z)
        else:
            weight = torch.randn(d_q, d_z) / max(d_q, d_z) ** 0.5
        self.weight = nn.Parameter(weight)

    def forward(self, query_vectors: torch.Tensor, doc_vectors: torch.Tensor) -> torch.Tensor:
        _check(query_vectors, doc_vectors, self.d_q, self.d_z)
        # (q W) z^T: transform the B queries, not the N documents
        return self.embed_queries(query_vectors) @ doc_vectors.T

    def embed_queries(self, query_vectors: torch.Tensor) -> torch.Tensor:
        return query_vectors @ self.weight.to(query_vectors.dtype)

    def embed_documents(self, doc_vectors: torch.Tensor) -> torch.Tensor:
        return doc_vectors

    def extra_repr(self) -> str:
        return f"d_q={self.d_q}, d_z={self.d_z}"


class _Tower(nn.Module):
    """``x -> skip(x) + Linear(GELU(Linear(x)))``; the second layer starts at zero, so the tower starts as ``skip``."""

    def __init__(self, d_in: int, hidden: int, d_out: int):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)
        self.skip = nn.Identity() if d_in == d_out else nn.Linear(d_in, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.fc2(F.gelu(self.fc1(x)))


class MLPSelector(Selector):
    """Two-tower: separate 2-layer GELU MLPs (with residual) on queries and on docs, then a dot product.

    Documents are transformed independently of the query, so scoring stays
    O(B*N*d) and top-k retrieval over all documents scales. The towers'
    output layers start at zero, so the selector starts equal to ``dot``
    (when d_q == d_z).
    """

    def __init__(self, d_z: int, output_dim: Optional[int] = None,
                 hidden: Annotated[int, Range(1), "hidden units of each tower"] = 256):
        super().__init__()
        d_q = d_z if output_dim is None else output_dim
        self.d_q, self.d_z = int(d_q), int(d_z)
        self.query_tower = _Tower(self.d_q, hidden, self.d_z)
        self.doc_tower = _Tower(self.d_z, hidden, self.d_z)

    def forward(self, query_vectors: torch.Tensor, doc_vectors: torch.Tensor) -> torch.Tensor:
        _check(query_vectors, doc_vectors, self.d_q, self.d_z)
        return self.embed_queries(query_vectors) @ self.embed_documents(doc_vectors).T

    def embed_queries(self, query_vectors: torch.Tensor) -> torch.Tensor:
        return self.query_tower(query_vectors)

    def embed_documents(self, doc_vectors: torch.Tensor) -> torch.Tensor:
        return self.doc_tower(doc_vectors)


@hookimpl
def pqa_register_selectors(register):
    register("dot", DotSelector)
    register("cosine", CosineSelector)
    register("bilinear", BilinearSelector)
    register("mlp", MLPSelector)
