"""Pretraining: the reusable parts learn their jobs on many questions of a disjoint corpus, before any run.

A pqa reader (``pretrain.reader=pqa``) is trained as the read phase trains it, with two differences:
each selected document's soft tokens are written by the writer *at every step* (``model.live_writer``),
so the gradient reaches the writer (its LoRA, memory slots and map) as well as the reader's LoRA and the
projection (a writer without parameters, ``keywords``, writes the table once, as a run does, and the
reader and projection learn to read what it wrote); and the gold passages are also reconstructed from their soft tokens (ICAE's autoencoding,
``pretrain.reconstruct_weight``). The first ``pretrain.reconstruct_only_steps`` steps reconstruct alone (ICAE
pretrains by autoencoding before it fine-tunes on questions): a writer that starts as noise gets a dense
signal (every passage token) instead of competing with a few answer tokens for the shared reader.
Retrieval is not pretrained (the doc table, query encoder and selector stay frozen): the selected
neighbours are only the distractors a reader meets at run time.
A control's reader (``text``: passages chosen by dense MiniLM retrieval, ``closed_book``: none) is trained
with the same steps and learning rate, so a comparison of pretrained readers stays fair.
"""
from __future__ import annotations

from typing import Dict

import torch

from pqa_core.config import PretrainSettings, ReadSettings
from pqa_core.interfaces import WriteContext, writer_trains
from pqa_core.training.read_phase import ReadPhaseTrainer

CONTROL_OF_READER = {"text": "dense_minilm", "closed_book": "closed_book"}
"""The control whose input a non-pqa pretrained reader learns to read."""


def read_settings(p: PretrainSettings) -> ReadSettings:
    """The read phase's settings that pretraining reuses (no retrieval loss, no evaluation between epochs)."""
    return ReadSettings(epochs=p.epochs, batch_size=p.batch_size, lr_lora=p.lr_lora, lr_projection=p.lr_projection,
                        top_k=p.top_k, retrieval_weight=0.0, grad_clip=p.grad_clip, eval_every=0,
                        checkpoint_every=p.checkpoint_every, key_updates="batch")


class PretrainTrainer(ReadPhaseTrainer):
    """The read phase's step over a live writer, plus reconstruction of the gold passages."""

    def __init__(self, model, settings: PretrainSettings, *, retrieval_loss, generation_loss, reconstruction,
                 teacher_llm=None):
        for frozen in (model.doc_vectors, *model.selector.parameters(), *model.query_encoder.parameters()):
            frozen.requires_grad_(False)
        super().__init__(model, read_settings(settings), retrieval_loss=retrieval_loss,
                         generation_loss=generation_loss, teacher_llm=teacher_llm)
        writer = [p for p in model.writer.parameters() if p.requires_grad] if writer_trains(model.writer) else []
        if writer:
            self.optimizer.add_param_group({"params": writer, "lr": settings.lr_writer, "name": "writer",
                                            "weight_decay": 0.0})
        self.trainable += writer
        self.reconstruct_weight = settings.reconstruct_weight
        self.reconstruct_only_steps = settings.reconstruct_only_steps
        self.reconstruction = reconstruction
        model.live_writer = bool(writer)

    def warming_up(self) -> bool:
        """Whether this step reconstructs alone (the first ``reconstruct_only_steps`` of the run, resumed or not)."""
        return self.loop is not None and self.loop.steps_done < self.reconstruct_only_steps

    def losses(self, batch):
        """(answer loss + reconstruct_weight x reconstruction loss, the retrieval loss: unused, weight 0);
        during the warm-up (reconstruction loss, 0)."""
        self.model.written = {}  # the answer's and the reconstruction's passes share each row's writing
        try:
            if self.warming_up():
                self.last_losses = {}
                reconstruct = self.reconstruct_gold(batch)
                return reconstruct, torch.zeros((), device=reconstruct.device)
            answer_loss, retrieval_loss = super().losses(batch)
            self.last_losses = {"answer_loss": float(answer_loss.detach())}
            if self.reconstruct_weight > 0:
                answer_loss = answer_loss + self.reconstruct_weight * self.reconstruct_gold(batch)
        finally:
            self.model.written = None
        return answer_loss, retrieval_loss

    def reconstruct_gold(self, batch) -> torch.Tensor:
        """The reconstruction loss of the batch's gold rows (recorded in ``last_losses``)."""
        gold = batch["gold_doc_ids"][:, 0]
        reconstruct = self.reconstruction(self.model, gold[gold >= 0])
        self.last_losses["reconstruct_loss"] = float(reconstruct.detach())
        return reconstruct

    def train_step(self, batch) -> Dict[str, float]:
        metrics = super().train_step(batch)
        for name in ("retrieval_loss", "gen_loss"):
            metrics.pop(name, None)
        metrics.update(self.last_losses)
        metrics.update({f"reconstruct_{k}": v for k, v in self.reconstruction.last_metrics().items()})
        return metrics


def reconstruction_objective(context: WriteContext, settings: PretrainSettings):
    """The ``reconstruct`` write objective on the first ``reconstruct_tokens`` tokens of each row, with the
    settings' contrast term."""
    from pqa_core.components import plugins

    objective = plugins.build("write_objective", "reconstruct", {
        "max_tokens": settings.reconstruct_tokens, "contrast_weight": settings.contrast_weight,
        "contrast_margin": settings.contrast_margin})
    objective.prepare(context)
    return objective

