"""Read phase: train selection and answering together, Loss = L_gen + λ·L_retrieval.

The gold mask is one scatter (no Python loop over the batch), an out-of-range gold id is an error
naming the example (not a silent wrong mask), and both losses are plugins, chosen by name.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Optional

import torch

from pqa_core.config import ReadSettings, check_choice
from pqa_core.data.loading import gold_mask
from pqa_core.errors import DataError
from pqa_core.modeling.model import ParametricQA
from pqa_core.training import distributed
from pqa_core.training.optim import RowwiseAdamW
from pqa_core.training.loop import EpochLoop, RunLogger, apply_gradients, param_groups, to_device


class ReadPhaseTrainer:
    """``settings`` is the run's ``ReadSettings``: every knob is read from it, none has a default here."""

    def __init__(self, model: ParametricQA, settings: ReadSettings, *, retrieval_loss, generation_loss,
                 tokenizer=None, device=None, teacher_llm=None):
        self.model = model
        self.teacher_llm = teacher_llm  # a trained text reader (pqa_core.modeling.teacher); None: adapter off
        self.settings = s = settings
        self.tokenizer = tokenizer or model.tokenizer
        self.retrieval_loss = retrieval_loss
        self.generation_loss = generation_loss
        self.retrieval_weight = s.retrieval_weight
        self.top_k = s.top_k
        self.grad_clip = s.grad_clip
        self.device = device or model.doc_vectors.device
        self.loop: Optional[EpochLoop] = None  # the loop fit runs (its steps_done), once fit starts
        check_choice("read.key_updates", s.key_updates)
        decay = {"weight_decay": s.weight_decay}
        groups = param_groups([
            ("z", [model.doc_vectors], s.lr_z, {"rowwise": True}),
            ("projection", model.z_to_embedding.parameters(), s.lr_lora if s.lr_projection is None else s.lr_projection,
             decay),
            ("selector", model.selector.parameters(), s.lr_selector, decay),
            ("query_encoder", model.query_encoder.parameters(),
             s.lr_lora * 0.1 if s.lr_query_encoder is None else s.lr_query_encoder, decay),
            ("lora", model.lora_parameters(), s.lr_lora, decay),
        ])
        self.trainable = [p for g in groups for p in g["params"]]
        self.optimizer = RowwiseAdamW(groups, state_factory=model.table_storage.state)

    def compute_retrieval_loss(self, scores: torch.Tensor, gold_doc_ids: torch.Tensor, example_ids=None):
        """``gold_doc_ids [B, G]`` padded with -1 -> retrieval loss; unknown ids are an error."""
        try:
            mask = gold_mask(gold_doc_ids, scores.shape[1])
        except (DataError, ValueError) as exc:
            raise DataError(f"gold doc ids of example {_name_bad_example(gold_doc_ids, scores.shape[1], example_ids)}"
                            f" are outside the {scores.shape[1]} documents: {exc}") from None
        return self.retrieval_loss(scores, mask)

    def teacher_logits(self, batch):
        """Logits of the teacher reading the gold passage text, aligned with the answer: the trained text
        reader when the loss names one, else the run's LLM with its adapter off."""
        llm = self.model.llm
        adapter_off = llm.disable_adapter() if self.teacher_llm is None and hasattr(llm, "disable_adapter") \
            else contextlib.nullcontext()
        with torch.no_grad(), adapter_off:
            logits, _ = self.model.continuation_logits(None, batch["teacher_ids"], batch["teacher_mask"],
                                                       batch["answer_ids"], batch["answer_mask"], llm=self.teacher_llm)
        return logits

    def train_step(self, batch) -> Dict[str, float]:
        """One step on a global batch (this process's shard of it when several train)."""
        self.model.train()
        group = distributed.current()
        batch, weight = group.shard(batch)
        batch = to_device(batch, self.device)
        with group.forward(weight), self.model.autocast():
            gen_loss, retrieval_loss = self.losses(batch)
            loss = gen_loss + self.retrieval_weight * retrieval_loss
        apply_gradients(loss, self.optimizer, self.trainable, self.grad_clip)
        return group.mean_metrics({"total_loss": loss.item(), "gen_loss": gen_loss.item(),
                                   "retrieval_loss": retrieval_loss.item()}, weight)

    def losses(self, batch):
        """(generation loss, retrieval loss) of a batch on the model's device."""
        updates = self.settings.key_updates
        key_rows = batch["gold_doc_ids"] if updates == "batch" else None
        selected_ids, scores = self.model.select_documents(batch["encoder_ids"], batch["encoder_mask"], k=self.top_k,
                                                           key_rows=key_rows, move_keys=updates != "none")
        logits, labels = self.model.answer_logits(batch["query_ids"], selected_ids, batch["answer_ids"],
                                                  batch["query_mask"], batch["answer_mask"])
        teacher = self.teacher_logits(batch) if getattr(self.generation_loss, "needs_teacher", False) else None
        gen_loss = self.generation_loss(logits, labels, teacher_logits=teacher) if teacher is not None \
            else self.generation_loss(logits, labels)
        retrieval_loss = self.compute_retrieval_loss(scores, batch["gold_doc_ids"], batch.get("example_ids"))
        return gen_loss, retrieval_loss

    def fit(self, dataset, *, seed: int, checkpoint_root, config_dict, logger: Optional[RunLogger] = None,
            epoch_end_fn=None, phase: str = "read", max_steps: int = 0) -> Dict[str, float]:
        s = self.settings
        loop = EpochLoop(self.model, self.optimizer, phase=phase, checkpoint_root=checkpoint_root,
                         config_dict=config_dict, logger=logger or RunLogger(), checkpoint_every=s.checkpoint_every)
        self.loop = loop
        return loop.run(dataset, epochs=s.epochs, batch_size=s.batch_size, seed=seed,
                        step_fn=self.train_step, epoch_end_fn=epoch_end_fn, max_steps=max_steps)


def _name_bad_example(gold_doc_ids: torch.Tensor, num_docs: int, example_ids) -> str:
    bad_rows = ((gold_doc_ids >= num_docs) | (gold_doc_ids < -1)).any(dim=1).nonzero().flatten().tolist()
    row = bad_rows[0] if bad_rows else 0
    name = example_ids[row] if example_ids is not None else f"at batch position {row}"
    return f"{name!r}" if example_ids is not None else name
