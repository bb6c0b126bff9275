"""Write objectives (reconstruct, distill, weighted), the row-wise optimizer they train z with, and a
control's own reader training, on the tiny model and the shipped sample."""
from __future__ import annotations

import pytest
import torch

from pqa_core.config import PQAConfig, WriteSettings
from pqa_core.training.optim import RowwiseAdamW
from pqa_core.pipeline import Pipeline
from pqa_core.training.loop import RecordingLogger
from pqa_core.training.write_phase import WritePhaseTrainer


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def config(tmp_path, **sections):
    values = {"seed": 1, "output_dir": str(tmp_path / "run"),
              "model": {"llm": "tiny", "num_memory_tokens": 2, "d_z": 0, "lora": {"r": 4}},
              "projection": {"name": "hybrid"},
              "write": {"epochs": 1, "eval_docs": 0, "lr_z": 0.05}, "read": {"epochs": 1}}
    values.update(sections)
    return PQAConfig.from_dict(values)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return Pipeline(config(tmp_path_factory.mktemp("objectives")), RecordingLogger())


def build(pipeline, name, **params):
    from pqa_core.components import plugins

    objective = plugins.build("write_objective", name, params)
    objective.prepare(pipeline.write_context())
    return objective


def test_distill_computes_the_teacher_once_and_sends_gradient_to_z(pipeline):
    objective = build(pipeline, "distill")
    passes = objective.teacher_passes
    assert passes >= 1 and len(objective.items) == len(pipeline.train_qa)  # one pass per batch of pairs
    model = pipeline.model
    model.doc_vectors.grad = None
    rows = torch.tensor([0, 1, 2])
    loss = objective(model, rows)
    loss.backward()
    grad = model.doc_vectors.grad.coalesce()
    touched = set(grad.indices()[0].tolist())
    assert touched == {0, 1, 2} and grad.values()[:, 384:].abs().sum() > 0  # the content part of z learns
    for _ in range(3):  # training never runs the teacher again
        objective(model, rows)
    assert objective.teacher_passes == passes
    # a second preparation (a resumed run) reads the cached targets instead of running the teacher
    again = build(pipeline, "distill")
    assert again.teacher_passes == 0
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(again.targets, objective.targets))


def test_distill_loss_is_zero_when_the_student_reads_what_the_teacher_read():
    from pqa_plugins.write_objectives import topk_kl

    logits = torch.randn(5, 50)
    logp = torch.log_softmax(logits, -1)
    top = logp.topk(10, -1)
    assert float(topk_kl(top.values, top.indices, logp)) == pytest.approx(0.0, abs=1e-6)
    assert float(topk_kl(top.values, top.indices, torch.log_softmax(torch.randn(5, 50), -1))) > 0.1


def test_cloze_questions_blank_a_span_of_the_passage():
    from pqa_plugins.write_objectives import cloze_questions

    text = "The bridge was built in 1712 by Anna Berg. It has seven arches and spans the Gamma river today."
    questions = cloze_questions(text, 5, seed="a")
    assert questions and questions == cloze_questions(text, 5, seed="a")
    for question, answer in questions:
        assert "____" in question and answer in text
        assert question.replace("Fill in the blank: ", "").replace("____", answer) in text


def test_weighted_objective_sums_its_parts(pipeline):
    mixed = build(pipeline, "weighted", objectives={"reconstruct": 0.5, "distill": {"weight": 2.0, "top_k": 8}})
    rows = torch.tensor([3, 4])
    torch.manual_seed(0)
    total = float(mixed(pipeline.model, rows))
    parts = mixed.last_metrics()
    assert total == pytest.approx(0.5 * parts["reconstruct_loss"] + 2.0 * parts["distill_loss"], rel=1e-5)
    with pytest.raises(ValueError, match="weight of 'distill' must be a number >= 0"):
        build(pipeline, "weighted", objectives={"distill": -1})


def test_contrast_pays_for_what_tells_a_document_from_the_next_one(pipeline):
    """reconstruct + w x softplus(margin - (other - own)) over the batch's distinct documents, each scored
    after the next distinct one's soft prompt; a repeated row is one document, a lone one has no contrast."""
    import torch.nn.functional as F

    plain = build(pipeline, "reconstruct", max_tokens=12)
    contrast = build(pipeline, "reconstruct", max_tokens=12, contrast_weight=2.0, contrast_margin=0.5)
    model = pipeline.model
    model.eval()

    def nats_per_token(text_row, prefix_row):
        ids = torch.tensor([plain.targets[text_row]])
        prefix = model.soft_prompts(torch.tensor([[prefix_row]]))
        logits, labels = model.continuation_logits(prefix, ids[:, :0], ids[:, :0], ids, torch.ones_like(ids))
        return F.cross_entropy(logits[0].float(), labels[0]).item()

    with torch.no_grad():
        rows = torch.tensor([2, 0, 2, 1])  # documents 2, 0, 1 (row 2 twice): each after the previous one's
        carried = [nats_per_token(t, p) - nats_per_token(t, t) for t, p in ((2, 1), (0, 2), (1, 0))]
        expected = plain(model, rows).item() + 2.0 * sum(F.softplus(torch.tensor(0.5 - c)).item()
                                                         for c in carried) / 3
        assert contrast(model, rows).item() == pytest.approx(expected, rel=1e-4)
        assert contrast.last_metrics()["carried"] == pytest.approx(sum(carried) / 3, abs=1e-4)
        alone = torch.tensor([3, 3])
        assert contrast(model, alone).item() == pytest.approx(plain(model, alone).item(), rel=1e-6)
    model.doc_vectors.grad = None
    contrast(model, alone).backward()  # still a loss of z
    assert model.doc_vectors.grad is not None


def test_rowwise_optimizer_leaves_rows_outside_the_batch_bit_identical(pipeline):
    model = pipeline.model
    objective = build(pipeline, "reconstruct")
    trainer = WritePhaseTrainer(model, WriteSettings(lr_z=0.05), objective)
    assert isinstance(trainer.optimizer, RowwiseAdamW)
    before = model.doc_vectors.detach().clone()
    for rows in ([0, 1], [0, 1], [2]):
        trainer.train_step({"doc_row": torch.tensor(rows)})
    after = model.doc_vectors.detach()
    assert not torch.equal(after[:3], before[:3])
    assert torch.equal(after[3:], before[3:])  # momentum never moves a document that was not in a batch
    steps = trainer.optimizer.state[model.doc_vectors]["row_step"]
    assert steps[:3].tolist() == [2, 2, 1] and int(steps[3:].sum()) == 0


def test_a_controls_reader_trains_for_its_own_input(tmp_path):
    logger = RecordingLogger()
    cfg = config(tmp_path, phases=["control_read", "control"], control={"name": "oracle"},
                 read={"epochs": 2, "lr_lora": 1e-2, "batch_size": 16})
    pipeline = Pipeline(cfg, logger)
    lora = [p.detach().clone() for p in pipeline.model.lora_parameters()]
    result = pipeline.run()
    losses = [v for _, v in logger.scalars["control_read.epoch_loss"]]
    assert len(losses) == 2 and losses[1] < losses[0]
    assert any(not torch.equal(a, b.detach()) for a, b in zip(lora, pipeline.model.lora_parameters()))
    assert result["Recall@3"] == 100.0 and "F1_ci95_low" in result
    reader = tmp_path / "run" / "checkpoints" / "control_read" / "final"
    assert (reader / "adapter").is_dir()
    # that reader can be pqa's distillation teacher: other targets than the plain LLM's, own weights untouched
    own = [p.detach().clone() for p in pipeline.model.lora_parameters()]
    plain = build(pipeline, "distill", top_k=4)
    taught = build(pipeline, "distill", top_k=4, teacher_adapter=str(reader))
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(plain.targets, taught.targets))
    assert all(torch.equal(a, b.detach()) for a, b in zip(own, pipeline.model.lora_parameters()))
    assert [n for n, p in pipeline.model.llm.named_parameters() if p.requires_grad] and \
        pipeline.model.llm.active_adapter == "default"


def test_documents_added_after_training_are_written_with_the_reader_frozen(tmp_path):
    """A grown corpus: init_from a trained run, only the new documents' z are written (write.documents=new,
    no projection or LoRA training), everything the earlier run learnt is kept."""
    import json

    from pqa_core.data.loading import load_corpus, load_qa, sample_data_path

    corpus = load_corpus(sample_data_path("corpus.jsonl"))
    questions = load_qa(sample_data_path("qa_train.jsonl"), corpus)
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"doc_id": d.doc_id, "title": d.title, "text": d.text}) + "\n"
                             for d in corpus[:30]))
    kept = {d.doc_id for d in corpus[:30]}
    small_qa = tmp_path / "small_qa.jsonl"
    small_qa.write_text("".join(json.dumps({"id": q.id, "question": q.question, "answers": q.answers,
                                            "gold_doc_ids": q.gold_doc_ids}) + "\n"
                                for q in questions if set(q.gold_doc_ids) <= kept))
    first = Pipeline(config(tmp_path, output_dir=str(tmp_path / "first"), phases=["write", "read"],
                            data={"corpus": str(small), "qa": str(small_qa), "eval_qa": str(small_qa)}),
                     RecordingLogger())
    first.run()
    logger = RecordingLogger()
    grown = Pipeline(config(tmp_path, output_dir=str(tmp_path / "grown"), phases=["write"],
                            init_from=str(tmp_path / "first"),
                            write={"epochs": 2, "eval_docs": 0, "documents": "new", "train_projection": False}),
                     logger)
    assert grown.new_rows == list(range(30, 36)) and logger.info["documents_added"] == 6
    table = grown.model.doc_vectors.detach().clone()
    assert torch.equal(table[:30], first.model.doc_vectors.detach())
    projection = [p.detach().clone() for p in grown.model.z_to_embedding.parameters()]
    grown.run()
    after = grown.model.doc_vectors.detach()
    assert torch.equal(after[:30], table[:30]) and not torch.equal(after[30:], table[30:])
    assert all(torch.equal(a, b.detach()) for a, b in zip(projection, grown.model.z_to_embedding.parameters()))
    with pytest.raises(Exception, match="not in this run's corpus"):  # a checkpoint of other documents
        Pipeline(config(tmp_path, output_dir=str(tmp_path / "other"), init_from=str(tmp_path / "grown"),
                        data={"corpus": str(small), "qa": str(small_qa), "eval_qa": str(small_qa)}),
                 RecordingLogger())


def test_keyword_content_init_starts_soft_tokens_at_the_passages_salient_words(tmp_path):
    from pqa_core.modeling.keywords import salient_token_ids

    pipeline = Pipeline(config(tmp_path, model={"llm": "tiny", "num_memory_tokens": 8, "d_z": 0,
                                                "content_init": "keywords", "lora": {"r": 4}},
                               projection={"name": "hybrid", "key_in_prompt": False}), RecordingLogger())
    model, tok = pipeline.model, pipeline.tokenizer
    ids = salient_token_ids([d.text for d in pipeline.rows.documents], tok, 8)
    words = tok.decode(ids[0]).split()
    text = pipeline.rows.documents[0].text
    assert 0 < len(ids[0]) <= 8 and words[0] == "Vell"  # names and numbers first (test_keywords.py)
    assert not {"the", "is", "a", "of", "on"} & set(words)  # never a stop word
    assert [text.index(w) for w in words] == sorted(text.index(w) for w in words)  # in the text's order
    embeddings = model.llm.get_input_embeddings().weight.detach()
    soft = model.soft_prompts(torch.tensor([[0]]))[0].detach()  # [m, d_model]: the free part alone
    assert torch.allclose(soft[:len(ids[0])], embeddings[torch.tensor(ids[0])])
    assert torch.equal(model.doc_vectors[:, :384].detach(), pipeline.model.doc_vectors[:, :384].detach())
