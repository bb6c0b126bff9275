"""Top-k selection over every document at evaluation and inference: ``eval.index``.

``exact`` (the default) scores the documents block by block and merges each block's winners into
the running top-k, so the ``[B, N]`` score matrix never exists and each block's scores stay in
cache while they are ranked: the matrix product runs near the machine's matmul peak at any N
(bench (d)). The faiss indexes (``pip install 'pqa[faiss]'``) search the selector's document side:
``faiss_flat`` (exact, faiss's own kernel), ``faiss_ivf`` (inverted lists, ``eval.faiss.nlist`` /
``nprobe``) and ``faiss_hnsw`` (a graph, ``eval.faiss.hnsw_m`` / ``ef_construction`` / ``ef_search``).

An index is rebuilt when what it was built from changed: the doc vectors or the selector's own
tensors (``pqa_core.modeling.staleness.Stamp``), so evaluating between training epochs never reads a stale one.
faiss indexes need a selector whose score is a dot product of a query side and a document side
(``Selector.embed_queries`` / ``embed_documents``: all built-ins); ``exact`` scores any selector.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Callable, Dict, Optional, Tuple

import torch

from pqa_core.config import check_choice
from pqa_core.errors import UsageError
from pqa_core.interfaces import Selector, is_factorised
from pqa_core.modeling.staleness import Stamp

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 2048
"""Documents scored per block by exact search: a block's ``B x chunk`` scores stay in cache while
they are ranked (bench (d) measured the block sizes)."""


def chunked_topk(score_block: Callable[[int, int], torch.Tensor], num_docs: int, k: int,
                 chunk: int = DEFAULT_CHUNK) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of the scores ``score_block(start, stop) -> [B, stop - start]`` over ``num_docs``
    documents: ``(values [B, k], indices [B, k])``, best first, as ``torch.topk`` of the whole row.

    Only the rows whose block maximum beats their current k-th best merge the block's top-k into
    theirs; once the running k-th best is high, most blocks cost a matrix product and a max.
    """
    k = min(k, num_docs)
    best_v = best_i = None
    for start in range(0, num_docs, chunk):
        stop = min(start + chunk, num_docs)
        block = score_block(start, stop)
        if best_v is None:
            best_v = block.new_full((block.shape[0], k), float("-inf"))
            best_i = torch.zeros(block.shape[0], k, dtype=torch.long, device=block.device)
            rows = None  # the first block: every row
        else:
            rows = (block.amax(dim=1) > best_v[:, -1]).nonzero().flatten()
            if rows.numel() == 0:
                continue
            block = block[rows]
        values, indices = block.topk(min(k, stop - start), dim=1)
        current_v = best_v if rows is None else best_v[rows]
        current_i = best_i if rows is None else best_i[rows]
        merged_v, order = torch.cat([current_v, values], dim=1).topk(k, dim=1)
        merged_i = torch.cat([current_i, indices + start], dim=1).gather(1, order)
        if rows is None:
            best_v, best_i = merged_v, merged_i
        else:
            best_v[rows], best_i[rows] = merged_v, merged_i
    return best_v, best_i


def matmul_topk(queries: torch.Tensor, keys: torch.Tensor, k: int,
                chunk: int = DEFAULT_CHUNK) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of ``queries @ keys.T`` (``[B, e]`` x ``[N, e]``) by :func:`chunked_topk`."""
    buffer = queries.new_empty(queries.shape[0], min(chunk, keys.shape[0]))

    def score_block(start, stop):
        if stop - start == buffer.shape[1]:
            return torch.mm(queries, keys[start:stop].T, out=buffer)
        return queries @ keys[start:stop].T

    return chunked_topk(score_block, keys.shape[0], k, chunk)


class _BlockScores(torch.autograd.Function):
    """``queries @ keys.T`` computed a block of documents at a time, with the keys constants: the backward
    reaches the queries only, recomputing each block's keys instead of keeping them."""

    @staticmethod
    def forward(ctx, queries, keys_of, num_docs, chunk):
        ctx.keys_of, ctx.num_docs, ctx.chunk = keys_of, num_docs, chunk
        out = queries.new_empty(queries.shape[0], num_docs)
        for start in range(0, num_docs, chunk):
            out[:, start:start + chunk] = queries @ keys_of(start, min(start + chunk, num_docs)).T
        return out

    @staticmethod
    def backward(ctx, grad):
        total = None
        for start in range(0, ctx.num_docs, ctx.chunk):
            part = grad[:, start:start + ctx.chunk] @ ctx.keys_of(start, min(start + ctx.chunk, ctx.num_docs))
            total = part if total is None else total + part
        return total, None, None, None


def block_scores(queries: torch.Tensor, keys_of: Callable[[int, int], torch.Tensor], num_docs: int,
                 chunk: int = 16_384) -> torch.Tensor:
    """Scores ``[B, N]`` of ``queries [B, e]`` against ``keys_of(start, stop) -> [stop - start, e]`` (constant
    keys, computed under no_grad), differentiable in the queries; holds one block of keys at a time
    rather than all N of them (a bfloat16 or memory-mapped table is read and converted a block at a time)."""
    def constant(start, stop):
        with torch.no_grad():
            return keys_of(start, stop).to(queries.dtype)

    return _BlockScores.apply(queries, constant, num_docs, chunk)


def document_side_is_constant(selector: Selector) -> bool:
    """Whether the selector's document side depends on none of its parameters (``dot``, ``cosine``,
    ``bilinear``): then scoring constant keys needs no gradient on the document side."""
    if not is_factorised(selector):
        return False
    params = [p for p in selector.parameters() if p.requires_grad]
    if not params:
        return True
    try:
        out = selector.embed_documents(torch.ones(2, params[0].shape[-1]))
    except (RuntimeError, ValueError):  # a probe of the wrong size: assume the document side has parameters
        return False
    grads = torch.autograd.grad(out.sum(), params, allow_unused=True)
    return all(g is None for g in grads)


class SelectionIndex:
    """Searches a selector's scores over doc vectors; built on first use and whenever they changed.

    ``search(selector, doc_vectors, query_vectors, k[, source]) -> (scores [B, k], doc rows [B, k])``, best
    first, under ``torch.no_grad``. ``build_seconds`` and ``builds`` say what building cost.
    """

    name = "?"

    def __init__(self):
        self._stamp: Optional[Stamp] = None
        self.builds = 0
        self.build_seconds = 0.0
        self.num_docs = 0

    def search(self, selector: Selector, doc_vectors, query_vectors: torch.Tensor, k: int,
               source: Optional[torch.Tensor] = None):
        """``doc_vectors``: a tensor, or a function returning it (called only to build). ``source``: the
        tensor they come from when they are not it (a converted copy, or a function's result): its
        changes are what make the index stale."""
        with torch.no_grad():
            tensors = [doc_vectors if source is None else source, *selector.parameters(), *selector.buffers()]
            if self._stamp is None or not self._stamp.matches(tensors):
                started = time.perf_counter()
                docs = doc_vectors() if callable(doc_vectors) and not torch.is_tensor(doc_vectors) else doc_vectors
                self.build(selector, docs.detach())
                self.num_docs = int(docs.shape[0])
                self.build_seconds += time.perf_counter() - started
                self.builds += 1
                self._stamp = Stamp.of(tensors)
                log.debug("%s index built over %d documents", self.name, self.num_docs)
            return self.query(selector, query_vectors, min(k, self.num_docs))

    def build(self, selector: Selector, doc_vectors: torch.Tensor) -> None:
        raise NotImplementedError

    def query(self, selector: Selector, query_vectors: torch.Tensor, k: int):
        raise NotImplementedError


class ExactIndex(SelectionIndex):
    """Every document scored, block by block (:func:`chunked_topk`); no copy of the doc vectors where
    the selector's document side is the doc vectors themselves (``dot``, ``bilinear``)."""

    name = "exact"

    def __init__(self, chunk: int = DEFAULT_CHUNK):
        super().__init__()
        self.chunk = chunk
        self.keys = self.doc_vectors = None

    def build(self, selector, doc_vectors):
        self.doc_vectors = doc_vectors
        self.keys = selector.embed_documents(doc_vectors) if is_factorised(selector) else None

    def query(self, selector, query_vectors, k):
        if self.keys is not None:
            queries = selector.embed_queries(query_vectors).to(self.keys.dtype)
            return matmul_topk(queries.contiguous(), self.keys, k, self.chunk)
        docs = self.doc_vectors
        return chunked_topk(lambda start, stop: selector(query_vectors, docs[start:stop]), docs.shape[0], k,
                            self.chunk)


def _faiss():
    try:
        import faiss
    except ImportError:
        raise UsageError("this eval.index needs faiss: pip install 'pqa[faiss]' (or faiss-cpu)") from None
    return faiss


class FaissIndex(SelectionIndex):
    """The selector's document side in a faiss inner-product index (queries: its query side)."""

    def __init__(self, settings):
        super().__init__()
        self.settings = settings
        self.index = None

    def build(self, selector, doc_vectors):
        import numpy as np

        faiss = _faiss()
        if not is_factorised(selector):
            raise UsageError(_not_factorised(self.name, type(selector)))
        faiss.omp_set_num_threads(torch.get_num_threads())
        keys = np.ascontiguousarray(selector.embed_documents(doc_vectors).float().cpu().numpy())
        self.index = None  # the old index's memory goes before the new one is built
        self.index = self.make(faiss, keys)
        self.index.add(keys)

    def make(self, faiss, keys):
        raise NotImplementedError

    def query(self, selector, query_vectors, k):
        import numpy as np

        queries = np.ascontiguousarray(selector.embed_queries(query_vectors).float().cpu().numpy())
        scores, rows = self.index.search(queries, k)
        device = query_vectors.device
        return torch.from_numpy(scores).to(device), torch.from_numpy(rows).long().to(device)


class FaissFlatIndex(FaissIndex):
    name = "faiss_flat"

    def make(self, faiss, keys):
        return faiss.IndexFlatIP(keys.shape[1])


def ivf_lists(num_docs: int, nlist: int = 0) -> int:
    """``nlist``, or with 0: 4 x sqrt(N) rounded to a power of two, with at least 39 documents per
    list (faiss's k-means wants 39 training points per centroid)."""
    if nlist <= 0:
        nlist = 2 ** round(math.log2(max(4 * math.sqrt(max(num_docs, 1)), 1)))
    while nlist > 1 and nlist * 39 > num_docs:
        nlist //= 2
    return max(int(nlist), 1)


class FaissIVFIndex(FaissIndex):
    """Inverted lists (IVF-Flat): k-means on at most 64 x nlist documents, ``nprobe`` lists searched."""

    name = "faiss_ivf"

    def make(self, faiss, keys):
        import numpy as np

        s = self.settings
        nlist = ivf_lists(keys.shape[0], s.nlist)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(keys.shape[1]), keys.shape[1], nlist,
                                   faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = 0
        sample = keys
        if keys.shape[0] > 64 * nlist:
            rows = np.random.default_rng(0).choice(keys.shape[0], 64 * nlist, replace=False)
            sample = keys[np.sort(rows)]
        index.train(sample)
        index.nprobe = min(s.nprobe, nlist)
        return index


class FaissHNSWIndex(FaissIndex):
    """A hierarchical navigable small-world graph over the documents (HNSW-Flat)."""

    name = "faiss_hnsw"

    def make(self, faiss, keys):
        s = self.settings
        index = faiss.IndexHNSWFlat(keys.shape[1], s.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = s.ef_construction
        index.hnsw.efSearch = s.ef_search
        return index


_FAISS = {"faiss_flat": FaissFlatIndex, "faiss_ivf": FaissIVFIndex, "faiss_hnsw": FaissHNSWIndex}


def check_index_settings(eval_settings, selector_class=None) -> None:
    """Pre-flight: a known ``eval.index``, faiss importable, a selector a faiss index can search (the
    faiss knobs' ranges are declared and checked with the config). One line naming the key."""
    name = check_choice("eval.index", eval_settings.index)
    if name == "exact":
        return
    _faiss()
    if isinstance(selector_class, type) and not is_factorised(selector_class):
        raise UsageError(_not_factorised(name, selector_class))


def _not_factorised(index_name: str, selector_class) -> str:
    return (f"eval.index={index_name!r} searches a selector's document side, and selector "
            f"{selector_class.__name__} has no embed_queries/embed_documents: use eval.index=exact")


def build_index(eval_settings) -> SelectionIndex:
    """The index ``eval.index`` names (built lazily, at its first search)."""
    check_index_settings(eval_settings)
    if eval_settings.index == "exact":
        return ExactIndex()
    return _FAISS[eval_settings.index](eval_settings.faiss)


def describe(index: SelectionIndex) -> Dict[str, object]:
    """What a run records about its index: name, builds, seconds spent building."""
    return {"name": index.name, "builds": index.builds, "build_seconds": round(index.build_seconds, 3)}
