"""Selection at evaluation (``eval.index``): exact chunked top-k equals ``torch.topk`` of the whole score
matrix, indexes are rebuilt exactly when what they were built from changed, faiss indexes agree with
exact search where they must, and a pipeline evaluates through the configured index."""
from __future__ import annotations

import pytest
import torch

from pqa_core.config import PQAConfig
from pqa_core.errors import UsageError
from pqa_core.components.plugins import build
from pqa_core.modeling.selection_index import ExactIndex, build_index, chunked_topk, ivf_lists, matmul_topk

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SELECTORS = ("dot", "cosine", "bilinear", "mlp")


def selector(name, d=16):
    torch.manual_seed(0)
    sel = build("selector", name, {}, context={"d_z": d, "output_dim": d})
    if name == "mlp":  # its towers start as the identity: make them matter
        for p in sel.parameters():
            torch.nn.init.normal_(p, std=0.3)
    return sel


@pytest.mark.parametrize("n, k, chunk", [(1, 3, 4), (5, 5, 2), (7, 10, 3), (64, 1, 64), (65, 4, 64), (1000, 10, 64),
                                         (1000, 10, 5000)])
def test_chunked_topk_is_torch_topk_of_the_whole_matrix(n, k, chunk):
    torch.manual_seed(n)
    q, z = torch.randn(6, 8), torch.randn(n, 8)
    values, rows = matmul_topk(q, z, k, chunk=chunk)
    expected = (q @ z.T).topk(min(k, n), dim=-1)
    assert torch.equal(rows, expected.indices)
    torch.testing.assert_close(values, expected.values)


def test_chunked_topk_scores_any_selector_block_by_block():
    """A selector without a document side (only ``forward``) is searched by scoring blocks of documents."""
    torch.manual_seed(1)
    q, z = torch.randn(4, 8), torch.randn(300, 8)

    def l2(query, docs):
        return -torch.cdist(query, docs)

    values, rows = chunked_topk(lambda a, b: l2(q, z[a:b]), 300, 5, chunk=32)
    expected = l2(q, z).topk(5, dim=-1)
    assert torch.equal(rows, expected.indices)


@pytest.mark.parametrize("name", SELECTORS)
def test_exact_index_gives_the_selectors_own_top_k_and_scores(name):
    sel = selector(name)
    z, q = torch.randn(500, 16), torch.randn(7, 16)
    values, rows = ExactIndex(chunk=64).search(sel, z, q, 5)
    with torch.no_grad():
        expected = sel(q, z).topk(5, dim=-1)
    assert torch.equal(rows, expected.indices)
    torch.testing.assert_close(values, expected.values)


def test_index_is_rebuilt_when_the_doc_vectors_or_the_selector_change_and_only_then():
    sel = selector("mlp")
    z = torch.nn.Parameter(torch.randn(200, 16))
    q = torch.randn(3, 16)
    index = ExactIndex(chunk=32)
    index.search(sel, z, q, 4)
    index.search(sel, z, q, 4)
    assert index.builds == 1  # unchanged: built once
    optimizer = torch.optim.SGD([z], lr=10.0)
    sel(q, z).logsumexp(-1).sum().backward()
    optimizer.step()  # z moved in place (its version counter moved)
    _, rows = index.search(sel, z, q, 4)
    assert index.builds == 2
    with torch.no_grad():
        assert torch.equal(rows, sel(q, z).topk(4, dim=-1).indices)
        sel.doc_tower.fc2.weight.add_(0.5)  # the selector's document side changed
    _, rows = index.search(sel, z, q, 4)
    assert index.builds == 3
    with torch.no_grad():
        assert torch.equal(rows, sel(q, z).topk(4, dim=-1).indices)
    index.search(sel, torch.randn(200, 16), q, 4)  # another tensor of the same shape
    assert index.builds == 4


def _config(**faiss):
    return lambda name: PQAConfig.from_dict({"eval": {"index": name, "faiss": faiss}}).eval


@pytest.mark.parametrize("name", SELECTORS)
def test_faiss_flat_and_exhaustive_ivf_equal_exact_search(name):
    pytest.importorskip("faiss", reason="faiss not installed (pip install 'pqa[faiss]')")
    sel = selector(name)
    z, q = torch.randn(2000, 16), torch.randn(9, 16)
    with torch.no_grad():
        expected = sel(q, z).topk(5, dim=-1)
    settings = _config(nlist=16, nprobe=16)  # every list searched: IVF is exact
    for index_name in ("faiss_flat", "faiss_ivf"):
        values, rows = build_index(settings(index_name)).search(sel, z, q, 5)
        assert torch.equal(rows, expected.indices), index_name
        torch.testing.assert_close(values, expected.values, rtol=1e-4, atol=1e-4)


def test_faiss_hnsw_finds_nearly_all_true_neighbours_and_is_rebuilt_after_a_step():
    pytest.importorskip("faiss", reason="faiss not installed (pip install 'pqa[faiss]')")
    sel = selector("cosine")
    z = torch.nn.Parameter(torch.randn(3000, 16))
    q = torch.randn(50, 16)
    index = build_index(_config()("faiss_hnsw"))
    with torch.no_grad():
        exact = sel(q, z).topk(10, dim=-1).indices
    _, rows = index.search(sel, z, q, 10)
    recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(rows, exact)) / exact.numel()
    assert recall >= 0.9
    with torch.no_grad():
        z.mul_(-1.0)  # every neighbour changes
        exact = sel(q, z).topk(10, dim=-1).indices
    _, rows = index.search(sel, z, q, 10)
    assert index.builds == 2
    recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(rows, exact)) / exact.numel()
    assert recall >= 0.9


def test_ivf_lists_follow_the_corpus_size():
    assert ivf_lists(1_000_000) == 4096 and ivf_lists(100_000) == 1024
    assert ivf_lists(36) == 1 and ivf_lists(10_000, nlist=64) == 64 and ivf_lists(100, nlist=64) == 2


def test_bad_index_settings_are_refused_naming_the_key():
    with pytest.raises(UsageError, match="config key 'eval.index' = 'annoy': must be one of exact"):
        build_index(_config()("annoy"))
    with pytest.raises(UsageError, match="config key 'eval.faiss.ef_search' = 0: must be an integer >= 1"):
        build_index(_config(ef_search=0)("faiss_hnsw"))


def test_faiss_refuses_a_selector_without_a_document_side():
    pytest.importorskip("faiss", reason="faiss not installed (pip install 'pqa[faiss]')")
    from pqa_core.interfaces import Selector

    class L2(Selector):
        def forward(self, query_vectors, doc_vectors):
            return -torch.cdist(query_vectors, doc_vectors)

    with pytest.raises(UsageError, match="selector L2 has no embed_queries/embed_documents: use eval.index=exact"):
        build_index(_config()("faiss_hnsw")).search(L2(), torch.randn(10, 4), torch.randn(2, 4), 3)
    values, rows = ExactIndex().search(L2(), torch.randn(10, 4), torch.randn(2, 4), 3)
    assert rows.shape == (2, 3)


def test_a_run_evaluates_through_the_configured_index_built_once_while_z_is_unchanged(tmp_path):
    pytest.importorskip("faiss", reason="faiss not installed (pip install 'pqa[faiss]')")
    from test_pipeline import tiny_config

    from pqa_core.pipeline import Pipeline
    from pqa_core.training.loop import RecordingLogger

    results = {}
    for name in ("exact", "faiss_hnsw"):
        logger = RecordingLogger()
        config = tiny_config(tmp_path, phases=["eval"], output_dir=str(tmp_path / name), **{"eval.index": name})
        results[name] = Pipeline(config, logger).run()
        # Recall before training and the evaluation searched one index: z did not change between them
        assert logger.info["eval_index"]["name"] == name and logger.info["eval_index"]["builds"] == 1
    assert results["faiss_hnsw"] == results["exact"]  # 36 documents: the graph finds every neighbour
