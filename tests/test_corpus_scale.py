"""A training step's work and the rows it moves do not grow with the corpus: a write or read step leaves
every document outside its batch bit-identical (its z and its optimizer moments), the read phase's
retrieval gradient reaches only the batch's keys while scoring every document. (A run resumed from a
checkpoint ends with the weights of one never stopped: tests/test_pipeline.py.)"""
from __future__ import annotations

import pytest
import torch

from pqa_core.pipeline import Pipeline
from pqa_core.modeling.builder import build_component
from pqa_core.training.read_phase import ReadPhaseTrainer
from pqa_core.training.loop import RecordingLogger
from pqa_core.training.write_phase import WritePhaseTrainer
from test_pipeline import tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def first_batch(dataset, size):
    return dataset.collate([dataset[i] for i in range(size)])


def snapshot(model, optimizer):
    state = optimizer.state.get(model.doc_vectors, {})
    return model.doc_vectors.detach().clone(), {k: v.clone() for k, v in state.items() if torch.is_tensor(v)}


def test_a_write_step_moves_only_the_rows_of_its_batch(tmp_path):
    pipeline = Pipeline(tiny_config(tmp_path), RecordingLogger())
    objective = build_component(pipeline.config, "write_objective", {})
    objective.prepare(pipeline.write_context())
    trainer = WritePhaseTrainer(pipeline.model, pipeline.config.write, objective)
    batch = first_batch(pipeline.write_dataset, 4)
    trainer.train_step(batch)  # the optimizer's state exists from here on
    z_before, state_before = snapshot(pipeline.model, trainer.optimizer)
    batch = pipeline.write_dataset.collate([pipeline.write_dataset[i] for i in (5, 9, 20)])
    trainer.train_step(batch)
    z_after, state_after = snapshot(pipeline.model, trainer.optimizer)
    moved = (z_after != z_before).any(dim=1).nonzero().flatten().tolist()
    assert moved == [5, 9, 20]
    others = torch.ones(len(z_before), dtype=torch.bool)
    others[[5, 9, 20]] = False
    assert torch.equal(z_after[others], z_before[others])  # bit-identical
    for key in state_before:
        assert torch.equal(state_after[key][others], state_before[key][others]), key


@pytest.mark.parametrize("selector", ["cosine", "mlp"])
def test_batch_key_updates_give_the_full_scorings_gradient_on_the_batchs_rows_and_nothing_elsewhere(tmp_path,
                                                                                                    selector):
    pipeline = Pipeline(tiny_config(tmp_path, selector={"name": selector}), RecordingLogger())
    model = pipeline.model
    batch = first_batch(pipeline.read_dataset, 4)
    gold = batch["gold_doc_ids"]
    weights = torch.randn(4, model.num_docs)

    def grads(key_rows):
        model.zero_grad(set_to_none=True)
        selected, scores = model.select_documents(batch["encoder_ids"], batch["encoder_mask"], 3, key_rows=key_rows)
        (scores * weights).sum().backward()
        z = model.doc_vectors.grad
        params = {n: p.grad.clone() for n, p in model.named_parameters()
                  if p.grad is not None and n != "doc_vectors"}
        return selected, scores.detach(), (z.to_dense() if z.is_sparse else z).clone(), z.is_sparse, params

    full_sel, full_scores, full_z, full_sparse, full_params = grads(None)
    sel, scores, z, sparse, params = grads(gold)
    assert torch.equal(sel, full_sel)
    torch.testing.assert_close(scores, full_scores)
    assert sparse and not full_sparse
    rows = torch.cat([gold.flatten(), sel.flatten()])
    rows = rows[rows >= 0].unique()
    assert z.ne(0).any(dim=1).nonzero().flatten().tolist() == rows.tolist()
    torch.testing.assert_close(z[rows], full_z[rows])
    assert full_z.ne(0).any(dim=1).sum() == model.num_docs  # the full softmax reaches every key
    assert set(params) == set(full_params) and params  # the query side and the selector: as the full scoring
    for name in params:
        torch.testing.assert_close(params[name], full_params[name])


@pytest.mark.parametrize("key_updates, moves_all", [("batch", False), ("all", True)])
def test_a_read_step_moves_the_batchs_rows_only_with_batch_key_updates(tmp_path, key_updates, moves_all):
    pipeline = Pipeline(tiny_config(tmp_path, **{"read.key_updates": key_updates}), RecordingLogger())
    model = pipeline.model
    trainer = ReadPhaseTrainer(model, pipeline.config.read, retrieval_loss=pipeline.retrieval_loss,
                               generation_loss=pipeline.generation_loss)
    trainer.train_step(first_batch(pipeline.read_dataset, 4))
    z_before, state_before = snapshot(model, trainer.optimizer)
    batch = pipeline.read_dataset.collate([pipeline.read_dataset[i] for i in (10, 11, 12)])
    with torch.no_grad():
        selected, _ = model.select_documents(batch["encoder_ids"], batch["encoder_mask"], pipeline.config.read.top_k)
    trainer.train_step(batch)
    z_after, state_after = snapshot(model, trainer.optimizer)
    moved = set((z_after != z_before).any(dim=1).nonzero().flatten().tolist())
    in_batch = set(selected.flatten().tolist()) | {r for r in batch["gold_doc_ids"].flatten().tolist() if r >= 0}
    if moves_all:
        assert len(moved) == model.num_docs
        return
    assert moved and moved <= in_batch
    others = torch.tensor([r not in in_batch for r in range(model.num_docs)])
    assert torch.equal(z_after[others], z_before[others])
    for key in state_before:
        assert torch.equal(state_after[key][others], state_before[key][others]), key


@pytest.mark.parametrize("key_updates", ["none", "all"])
def test_with_key_updates_none_a_read_step_moves_no_key_but_trains_the_query_side(tmp_path, key_updates):
    """read.key_updates=none: every retrieval key stays as written (the retrieval loss trains the query
    encoder and the selector only) while the soft-token part of z still learns from the answers; with
    ``all`` the same steps move keys."""
    pipeline = Pipeline(tiny_config(tmp_path, **{"read.key_updates": key_updates}), RecordingLogger())
    model, keys = pipeline.model, pipeline.model.key_dims
    trainer = ReadPhaseTrainer(model, pipeline.config.read, retrieval_loss=pipeline.retrieval_loss,
                               generation_loss=pipeline.generation_loss)
    z_before = model.doc_vectors.detach().clone()
    query_side = {name: p.detach().clone() for name, p in model.query_encoder.named_parameters() if p.requires_grad}
    assert query_side and 0 < keys < z_before.shape[1]
    for start in (0, 4):
        trainer.train_step(pipeline.read_dataset.collate([pipeline.read_dataset[i] for i in range(start, start + 4)]))
    z_after = model.doc_vectors.detach()
    assert not torch.equal(z_after[:, keys:], z_before[:, keys:])  # the soft tokens' part learns
    assert torch.equal(z_after[:, :keys], z_before[:, :keys]) == (key_updates == "none")
    moved = [name for name, p in model.query_encoder.named_parameters() if name in query_side
             and not torch.equal(p.detach(), query_side[name])]
    assert moved  # the query encoder learns either way
