"""The cosine selector's cache of normalised doc vectors: reused only while they are unchanged and no
gradient has to reach them, never stale."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F

from pqa_core.components.plugins import build


def reference(q, z, t):
    return F.cosine_similarity(q[:, None, :], z[None, :, :], dim=-1) / t


@pytest.fixture
def sel():
    return build("selector", "cosine", {"temperature": 0.1}, context={"d_z": 6})


def test_no_grad_reuses_the_normalised_matrix_until_the_vectors_change(sel):
    z = torch.nn.Parameter(torch.randn(5, 6))
    q = torch.randn(3, 6)
    with torch.no_grad():
        first = sel.normalized_docs(z)
        assert sel.normalized_docs(z) is first  # cached
        torch.testing.assert_close(sel(q, z), reference(q, z, 0.1))
        z.mul_(-1.0)  # in place: the version counter moves
        assert sel.normalized_docs(z) is not first
        torch.testing.assert_close(sel(q, z), reference(q, z, 0.1))


def test_optimizer_step_and_load_state_dict_invalidate(sel):
    z = torch.nn.Parameter(torch.randn(5, 6))
    q = torch.randn(3, 6)
    optimizer = torch.optim.AdamW([z], lr=0.5)
    for _ in range(2):
        sel(q, z).logsumexp(-1).sum().backward()  # training: gradient flows through the normalisation
        assert z.grad is not None and z.grad.abs().sum() > 0
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            torch.testing.assert_close(sel(q, z), reference(q, z.detach(), 0.1))
    holder = torch.nn.Module()
    holder.z = z
    with torch.no_grad():
        sel(q, z)
        holder.load_state_dict({"z": torch.randn(5, 6)})
        torch.testing.assert_close(sel(q, z), reference(q, z, 0.1))


def test_views_and_new_tensors_at_a_reused_address(sel):
    z = torch.nn.Parameter(torch.randn(5, 8))
    q = torch.randn(3, 6)
    with torch.no_grad():
        torch.testing.assert_close(sel(q, z[:, :6]), reference(q, z[:, :6], 0.1))
        first = sel.normalized_docs(z[:, :6])
        assert sel.normalized_docs(z[:, :6]) is first  # a fresh view of the same unchanged parameter
        z[:, :6].zero_()  # through a view: shares the parameter's version counter
        z[:, :6].add_(torch.randn(5, 6))
        torch.testing.assert_close(sel(q, z[:, :6]), reference(q, z[:, :6], 0.1))
        for _ in range(3):  # other tensors, maybe at the address a freed one had: never a stale hit
            other = torch.randn(5, 6)
            torch.testing.assert_close(sel(q, other), reference(q, other, 0.1))


def test_grad_through_docs_is_never_served_from_the_cache(sel):
    z = torch.nn.Parameter(torch.randn(5, 6))
    q = torch.randn(3, 6, requires_grad=True)
    with torch.no_grad():
        sel(q, z)
    scores = sel(q, z)
    assert scores.requires_grad
    scores.sum().backward()
    assert z.grad is not None and q.grad is not None
    frozen = torch.randn(5, 6)  # doc vectors without grad: the query side still gets its gradient
    q.grad = None
    sel(q, frozen).sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_inference_mode_tensors_and_pickling(sel):
    q = torch.randn(3, 6)
    with torch.inference_mode():
        z = torch.randn(5, 6)
        torch.testing.assert_close(sel(q, z), reference(q, z, 0.1))
    z = torch.nn.Parameter(torch.randn(5, 6), requires_grad=False)
    with torch.inference_mode():
        sel(q, z)  # nothing kept from inference mode: a later backward through the scores must work
    q.requires_grad_(True)
    sel(q, z).sum().backward()
    q = q.detach()
    z = torch.randn(5, 6)
    with torch.no_grad():
        sel(q, z)
    buffer = io.BytesIO()
    torch.save(sel, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(q, z), sel(q, z))
    torch.testing.assert_close(copy.deepcopy(sel)(q, z), sel(q, z))
