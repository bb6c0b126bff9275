"""Behaviour of every built-in component, each built by name through ``pqa_core.components.plugins.build``."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pqa_core.components.kinds import COMPONENT_KINDS
from pqa_core.modeling.minilm import MINILM_DIM, embed_texts
from pqa_core.components.plugins import build, components

BUILTINS = {
    "selector": {"dot", "cosine", "bilinear", "mlp"},
    "query_encoder": {"llm_mean", "minilm", "transformer"},
    "projection": {"linear", "mlp2x_gelu", "direct", "hybrid"},
    "retrieval_loss": {"gold_nll", "infonce", "margin"},
    "generation_loss": {"ce", "kl_distill"},
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    from pqa_core.modeling.llm import load_llm

    model, tokenizer = load_llm("tiny")
    model.eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def minilm_encoder():
    return build("query_encoder", "minilm", context={"output_dim": MINILM_DIM})


def minilm_batch(encoder, texts):
    enc = encoder.tokenizer(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def tiny_context(model):
    emb = model.get_input_embeddings().weight
    return {"llm": model, "d_model": model.config.hidden_size, "vocab_size": model.config.vocab_size,
            "embedding_std": float(emb.detach().std()), "pad_token_id": model.config.pad_token_id}


# --------------------------------------------------------------------------- registry


@pytest.mark.parametrize("kind", sorted(BUILTINS))
def test_every_builtin_registered_with_interface(kind):
    found = components(kind)
    assert BUILTINS[kind] <= set(found)
    for name in BUILTINS[kind]:
        assert issubclass(found[name].factory, COMPONENT_KINDS[kind]), name
        assert found[name].plugin.startswith("pqa_plugins."), name


def test_context_is_passed_only_where_declared():
    # cosine declares no d_z; passing it in context must not break it
    sel = build("selector", "cosine", {"temperature": 0.1}, context={"d_z": 8, "d_model": 64, "llm": object()})
    assert sel.temperature == 0.1


# --------------------------------------------------------------------------- selectors


def test_dot_equals_matmul():
    sel = build("selector", "dot", context={"d_z": 6, "output_dim": 6})
    q, z = torch.randn(3, 6), torch.randn(5, 6)
    torch.testing.assert_close(sel(q, z), q @ z.T)


def test_cosine_scale_invariant_and_divided_by_temperature():
    sel = build("selector", "cosine", {"temperature": 0.1}, context={"d_z": 6})
    q, z = torch.randn(3, 6), torch.randn(5, 6)
    scores = sel(q, z)
    cos = F.cosine_similarity(q[:, None, :], z[None, :, :], dim=-1)
    torch.testing.assert_close(scores, cos / 0.1)
    torch.testing.assert_close(sel(7.0 * q, 0.01 * z), scores)
    assert scores.abs().max() <= 1 / 0.1 + 1e-4
    default = build("selector", "cosine")
    torch.testing.assert_close(default(q, z), cos / 0.05)


def test_bilinear_starts_as_dot_and_gradient_reaches_w():
    sel = build("selector", "bilinear", context={"d_z": 6, "output_dim": 6})
    q, z = torch.randn(3, 6), torch.randn(5, 6)
    torch.testing.assert_close(sel(q, z), q @ z.T)
    sel(q, z).sum().backward()
    assert sel.weight.grad is not None and sel.weight.grad.abs().sum() > 0
    # different query size: W is [d_q, d_z]
    rect = build("selector", "bilinear", context={"d_z": 6, "output_dim": 4})
    assert rect(torch.randn(3, 4), z).shape == (3, 5)


def test_mlp_selector_shape_topk_and_trainable():
    d = 32
    sel = build("selector", "mlp", {"hidden": 64}, context={"d_z": d, "output_dim": d})
    q, z = torch.randn(4, d), torch.randn(10_000, d)
    scores = sel(q, z)
    assert scores.shape == (4, 10_000)
    # towers start as identity -> equals dot at init
    torch.testing.assert_close(scores, q @ z.T, rtol=1e-4, atol=1e-4)
    top = scores.topk(5, dim=-1)
    assert top.indices.shape == (4, 5)
    # plant exact matches: each query's own vector (scaled up) must come out on top
    z2 = z.clone()
    z2[[11, 222, 3333, 9999]] = 10 * q
    assert sel(q, z2).topk(1, dim=-1).indices.flatten().tolist() == [11, 222, 3333, 9999]
    # both towers get gradients after one step (fc2 starts at zero)
    opt = torch.optim.Adam(sel.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        (-sel(q, z[:50]).logsumexp(-1).mean()).backward()
        opt.step()
    assert sel.query_tower.fc1.weight.grad.abs().sum() > 0
    assert sel.doc_tower.fc1.weight.grad.abs().sum() > 0


def test_selector_rejects_wrong_sizes():
    sel = build("selector", "bilinear", context={"d_z": 6, "output_dim": 6})
    with pytest.raises(ValueError, match="doc vectors of size 6"):
        sel(torch.randn(2, 6), torch.randn(3, 5))


# --------------------------------------------------------------------------- retrieval losses


def test_gold_nll_hand_computed_with_multi_gold():
    loss = build("retrieval_loss", "gold_nll")
    scores = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]])
    gold = torch.tensor([[False, False, True], [True, True, False]])
    z1 = math.log(math.exp(1) + math.exp(2) + math.exp(3))
    z2 = math.log(2 + math.e)
    expected = ((z1 - 3.0) + (z2 - 0.0) + (z2 - 0.0)) / 3  # mean over the three gold pairs
    assert loss(scores, gold).item() == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(loss(scores[:1], gold[:1]), F.cross_entropy(scores[:1], torch.tensor([2])))


@pytest.mark.parametrize("name", ["gold_nll", "infonce", "margin"])
def test_retrieval_loss_rejects_row_without_gold(name):
    loss = build("retrieval_loss", name)
    gold = torch.tensor([[True, False], [False, False]])
    with pytest.raises(ValueError, match=r"row\(s\) \[1\]"):
        loss(torch.randn(2, 2), gold)


def test_infonce_exact_and_bounded_by_gold_nll():
    loss = build("retrieval_loss", "infonce")
    scores = torch.tensor([[0.0, 0.0, 1.0]])
    gold = torch.tensor([[True, True, False]])
    expected = -math.log(2 / (2 + math.e))
    assert loss(scores, gold).item() == pytest.approx(expected, rel=1e-6)
    # single gold: InfoNCE == cross-entropy == gold_nll
    single = torch.tensor([[False, True, False]])
    nll = build("retrieval_loss", "gold_nll")
    torch.testing.assert_close(loss(scores, single), nll(scores, single))
    # several gold: per row, InfoNCE (all gold mass) < mean gold NLL
    s = torch.randn(1, 7)
    g = torch.tensor([[True, False, True, True, False, False, False]])
    assert loss(s, g) < nll(s, g)
    # temperature divides the scores
    hot = build("retrieval_loss", "infonce", {"temperature": 0.5})
    torch.testing.assert_close(hot(scores, gold), loss(scores / 0.5, gold))


def test_margin_zero_when_separated_and_hinge_otherwise():
    loss = build("retrieval_loss", "margin")  # margin=1.0
    gold = torch.tensor([[True, True, False, False]])
    separated = torch.tensor([[5.0, 4.1, 3.0, -1.0]])  # lowest gold 4.1 - hardest neg 3.0 = 1.1 > 1
    assert loss(separated, gold).item() == 0.0
    close = torch.tensor([[5.0, 3.5, 3.0, -1.0]])  # gap 0.5 -> 0.5
    assert loss(close, gold).item() == pytest.approx(0.5)
    wide = build("retrieval_loss", "margin", {"margin": 2.0})
    assert wide(separated, gold).item() == pytest.approx(0.9)
    # scores requiring grad: gradient reaches the lowest gold and the hardest negative only
    s = close.clone().requires_grad_(True)
    loss(s, gold).backward()
    assert s.grad.tolist() == [[0.0, -1.0, 1.0, 0.0]]
    # all-gold row has no negative and contributes 0
    assert loss(torch.randn(1, 3), torch.ones(1, 3, dtype=torch.bool)).item() == 0.0


# --------------------------------------------------------------------------- generation losses


def _lm_batch(B=2, T=5, V=11):
    logits = torch.randn(B, T, V)
    labels = torch.randint(0, V, (B, T))
    labels[0, :2] = -100
    labels[1, 4] = -100
    return logits, labels


def test_ce_matches_cross_entropy_and_ignores_masked_positions():
    loss = build("generation_loss", "ce")
    assert not loss.needs_teacher
    logits, labels = _lm_batch()
    value = loss(logits, labels)
    torch.testing.assert_close(value, F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), ignore_index=-100))
    changed = logits.clone()
    changed[0, :2] = 100 * torch.randn(2, 11)
    changed[1, 4] = -50.0
    torch.testing.assert_close(loss(changed, labels), value)
    changed[1, 3] += 5 * torch.randn(11)  # a kept position does change it
    assert not torch.allclose(loss(changed, labels), value)
    # all ignored: 0, not NaN, and still differentiable
    logits.requires_grad_(True)
    empty = loss(logits, torch.full_like(labels, -100))
    assert empty.item() == 0.0
    empty.backward()


def test_kl_distill_equals_ce_for_identical_teacher_and_exceeds_otherwise():
    kd = build("generation_loss", "kl_distill", {"alpha": 0.5, "temperature": 2.0})
    ce = build("generation_loss", "ce")
    assert kd.needs_teacher is True
    logits, labels = _lm_batch()
    torch.testing.assert_close(kd(logits, labels, teacher_logits=logits.clone()), ce(logits, labels))
    teacher = logits + torch.randn_like(logits)
    assert kd(logits, labels, teacher_logits=teacher) > ce(logits, labels) + 1e-4
    # the KL term uses only non-ignored positions
    teacher_masked = logits.clone()
    teacher_masked[0, :2] = torch.randn(2, 11)
    torch.testing.assert_close(kd(logits, labels, teacher_logits=teacher_masked), ce(logits, labels))
    # exact value: CE + alpha * T^2 * KL(teacher || student), mean over kept tokens
    keep = labels != -100
    p_t = F.softmax(teacher[keep] / 2.0, -1)
    kl = (p_t * (p_t.log() - F.log_softmax(logits[keep] / 2.0, -1))).sum(-1).mean()
    torch.testing.assert_close(kd(logits, labels, teacher_logits=teacher), ce(logits, labels) + 0.5 * 4.0 * kl)
    # no gradient into the teacher
    teacher.requires_grad_(True)
    logits.requires_grad_(True)
    kd(logits, labels, teacher_logits=teacher).backward()
    assert teacher.grad is None and logits.grad is not None


def test_kl_distill_requires_teacher():
    kd = build("generation_loss", "kl_distill")
    logits, labels = _lm_batch()
    with pytest.raises(ValueError, match="teacher_logits"):
        kd(logits, labels)


# --------------------------------------------------------------------------- projections


def _close_to(value, target):
    return 0.8 * target < value < 1.25 * target


@pytest.mark.parametrize("name", ["linear", "mlp2x_gelu"])
def test_projection_shape_and_scale(name):
    ctx = {"d_z": 96, "d_model": 64, "num_tokens": 3, "embedding_std": 0.02}
    proj = build("projection", name, context=ctx)
    assert proj.num_tokens == 3
    # default: z at the LLM's embedding scale (the model's random doc init) -> output at that scale
    z = torch.randn(4000, 96) * 0.02
    out = proj(z)
    assert out.shape == (4000, 3, 64)
    assert _close_to(out.std().item(), 0.02)
    # leading dims are kept
    assert proj(torch.randn(2, 5, 96)).shape == (2, 5, 3, 64)
    # the output scale follows embedding_std
    big = build("projection", name, context={**ctx, "embedding_std": 0.5})
    assert _close_to(big(z * 25).std().item(), 0.5)
    # input_std sets the expected z scale: unit-norm z (MiniLM doc init), or z ~ N(0, 1)
    unit = build("projection", name, {"input_std": 96 ** -0.5}, context=ctx)
    assert _close_to(unit(F.normalize(torch.randn(4000, 96), dim=-1)).std().item(), 0.02)
    gaussian = build("projection", name, {"input_std": 1.0}, context=ctx)
    assert _close_to(gaussian(torch.randn(4000, 96)).std().item(), 0.02)
    with pytest.raises(ValueError, match="input_std must be > 0"):
        build("projection", name, {"input_std": 0.0}, context=ctx)


def test_direct_projection_is_z_reshaped_and_checks_its_size():
    proj = build("projection", "direct", context={"d_z": 6, "d_model": 3, "num_tokens": 2, "embedding_std": 0.02})
    z = torch.arange(12.0).view(2, 6)
    assert torch.equal(proj(z), z.view(2, 2, 3))
    assert list(proj.parameters()) == []
    with pytest.raises(ValueError, match="d_z = num_memory_tokens x d_model = 2 x 3 = 6, got 7"):
        build("projection", "direct", context={"d_z": 7, "d_model": 3, "num_tokens": 2})


def test_projection_matches_tiny_llm_embedding_scale(tiny):
    model, _ = tiny
    ctx = {**tiny_context(model), "d_z": 32, "num_tokens": 2}
    proj = build("projection", "mlp2x_gelu", context=ctx)
    assert proj.hidden == model.config.hidden_size
    out = proj(torch.randn(1000, 32) * ctx["embedding_std"])
    assert out.shape == (1000, 2, model.config.hidden_size)
    assert _close_to(out.std().item(), ctx["embedding_std"])


# --------------------------------------------------------------------------- query encoders


def test_llm_mean_reads_llm_embeddings_and_trains_only_head(tiny):
    model, tokenizer = tiny
    enc = build("query_encoder", "llm_mean", context={**tiny_context(model), "output_dim": 16})
    assert enc.tokenizer is None  # reads the LLM's token ids
    batch = tokenizer(["what is the capital of france", "who wrote hamlet"], padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    out = enc(ids, mask)
    assert out.shape == (2, 16)
    expected = enc.head(((model.get_input_embeddings()(ids) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)))
    torch.testing.assert_close(out, expected)
    # only the head is trainable / saved: the LLM is not a submodule
    assert sorted(n for n, p in enc.named_parameters() if p.requires_grad) == ["head.bias", "head.weight"]
    assert sorted(enc.state_dict()) == ["head.bias", "head.weight"]
    assert all(p is not model.get_input_embeddings().weight for p in enc.parameters())
    # editing an embedding row of a token in the first question changes its vector only
    weight = model.get_input_embeddings().weight
    row = int(ids[0, 0])
    assert row not in ids[1].tolist()
    saved = weight[row].clone()
    try:
        with torch.no_grad():
            weight[row] += 1.0
        changed = enc(ids, mask)
    finally:
        with torch.no_grad():
            weight[row] = saved
    assert not torch.allclose(changed[0], out[0])
    torch.testing.assert_close(changed[1], out[1])
    # no gradient flows into the LLM's embeddings
    enc(ids, mask).sum().backward()
    assert weight.grad is None
    assert enc.head.weight.grad is not None


def test_minilm_paraphrases_close_unrelated_far_and_frozen(minilm_encoder):
    enc = minilm_encoder
    assert enc.tokenizer is not None and enc.output_dim == MINILM_DIM
    texts = ["What is the capital city of France?", "Which city is France's capital?",
             "How many legs does a spider have?"]
    vectors = enc(*minilm_batch(enc, texts))
    assert vectors.shape == (3, MINILM_DIM)
    para = F.cosine_similarity(vectors[0], vectors[1], dim=0).item()
    unrelated = F.cosine_similarity(vectors[0], vectors[2], dim=0).item()
    assert para > 0.8 and unrelated < 0.3 and para - unrelated > 0.5
    # identity head at init: equals the reference sentence embedding
    torch.testing.assert_close(vectors.detach(), embed_texts(texts), rtol=1e-4, atol=1e-4)
    # frozen: MiniLM is neither trainable nor saved, only the head is
    assert sorted(n for n, p in enc.named_parameters()) == ["head.bias", "head.weight"]
    assert sorted(enc.state_dict()) == ["head.bias", "head.weight"]
    assert not any(p.requires_grad for p in enc.minilm.parameters())
    enc.train()
    assert not enc.minilm.training  # dropout stays off
    enc.eval()


def test_minilm_head_not_identity_for_other_sizes():
    enc = build("query_encoder", "minilm", context={"output_dim": 32})
    assert enc.head.weight.shape == (32, MINILM_DIM)
    assert enc(*minilm_batch(enc, ["hello world"])).shape == (1, 32)


def test_transformer_encoder_trains_and_ignores_padding(tiny):
    model, _ = tiny
    enc = build("query_encoder", "transformer", {"dim": 32, "heads": 4, "dropout": 0.0},
                context={**tiny_context(model), "output_dim": 8})
    assert enc.tokenizer is None
    assert all(p.requires_grad for p in enc.parameters())
    ids = torch.randint(0, model.config.vocab_size, (6, 7))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    enc.eval()
    out = enc(ids, mask)
    assert out.shape == (6, 8)
    # extra padding (any token id) does not change the vectors
    padded_ids = torch.cat([ids, torch.randint(0, 100, (6, 3))], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(6, 3, dtype=mask.dtype)], dim=1)
    torch.testing.assert_close(enc(padded_ids, padded_mask), out, rtol=1e-4, atol=1e-5)
    # an all-padding row does not give NaN
    assert torch.isfinite(enc(ids[:1], torch.zeros_like(ids[:1]))).all()
    # it learns: regress to fixed random targets
    enc.train()
    targets = torch.randn(6, 8)
    opt = torch.optim.Adam(enc.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = F.mse_loss(enc(ids, mask), targets)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_overfit_minilm_cosine_infonce_recall_at_1():
    questions = ["Who painted the Mona Lisa?", "What is the boiling point of water?",
                 "Which planet is known as the red planet?", "Who wrote Pride and Prejudice?",
                 "What is the largest ocean on Earth?", "How many continents are there?",
                 "What gas do plants absorb from the air?", "In which year did the Berlin Wall fall?"]
    enc = build("query_encoder", "minilm", context={"output_dim": MINILM_DIM})
    selector = build("selector", "cosine", context={"d_z": MINILM_DIM})
    loss_fn = build("retrieval_loss", "infonce")
    doc_vectors = torch.nn.Parameter(torch.randn(8, MINILM_DIM))
    ids, mask = minilm_batch(enc, questions)
    gold = torch.eye(8, dtype=torch.bool)
    frozen_before = next(enc.minilm.parameters()).clone()

    def recall_at_1():
        with torch.no_grad():
            return (selector(enc(ids, mask), doc_vectors).argmax(-1) == torch.arange(8)).float().mean().item()

    before = recall_at_1()
    opt = torch.optim.Adam([doc_vectors, *enc.parameters()], lr=1e-2)
    for _ in range(24):
        opt.zero_grad()
        loss = loss_fn(selector(enc(ids, mask), doc_vectors), gold)
        loss.backward()
        opt.step()
    assert before < 1.0
    assert recall_at_1() == 1.0
    assert loss.item() < 0.1
    torch.testing.assert_close(next(enc.minilm.parameters()), frozen_before)
