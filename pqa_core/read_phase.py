"""Read phase: train selection and answering together, Loss = L_gen + λ·L_retrieval.

The seed notebook's ReadPhaseTrainer, with its flaws fixed: the gold mask is one scatter (no
Python loops), an out-of-range gold id is an error naming the example, and the losses are plugins.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from .data import gold_mask
from .errors import DataError
from .model import ParametricQA
from .training import EpochLoop, RunLogger, param_groups, to_device


class ReadPhaseTrainer:
    def __init__(self, model: ParametricQA, tokenizer=None, *, retrieval_loss, generation_loss,
                 lr_z: float = 1e-4, lr_lora: float = 5e-5, lr_selector: float = 1e-4,
                 lr_query_encoder: Optional[float] = None, lr_projection: Optional[float] = None,
                 retrieval_weight: float = 0.1, top_k: int = 5, grad_clip: float = 1.0, device=None):
        self.model = model
        self.tokenizer = tokenizer or model.tokenizer
        self.retrieval_loss = retrieval_loss
        self.generation_loss = generation_loss
        self.retrieval_weight = retrieval_weight
        self.top_k = top_k
        self.grad_clip = grad_clip
        self.device = device or model.doc_vectors.device
        groups = param_groups([
            ("z", [model.doc_vectors], lr_z),
            ("projection", model.z_to_embedding.parameters(), lr_lora if lr_projection is None else lr_projection),
            ("selector", model.selector.parameters(), lr_selector),
            ("query_encoder", model.query_encoder.parameters(),
             lr_lora * 0.1 if lr_query_encoder is None else lr_query_encoder),
            ("lora", model.lora_parameters(), lr_lora),
        ])
        self.trainable = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(groups)

    def compute_retrieval_loss(self, scores: torch.Tensor, gold_doc_ids: torch.Tensor, example_ids=None):
        """``gold_doc_ids [B, G]`` padded with -1 -> retrieval loss; unknown ids are an error."""
        try:
            mask = gold_mask(gold_doc_ids, scores.shape[1])
        except (DataError, ValueError) as exc:
            raise DataError(f"gold doc ids of example {_name_bad_example(gold_doc_ids, scores.shape[1], example_ids)}"
                            f" are outside the {scores.shape[1]} documents: {exc}") from None
        return self.retrieval_loss(scores, mask)

    def teacher_logits(self, batch):
        """Logits of the LLM reading the gold passage text (adapter off), aligned with the answer."""
        llm = self.model.llm
        with torch.no_grad():
            if hasattr(llm, "disable_adapter"):
                with llm.disable_adapter():
                    logits, _ = self.model.continuation_logits(None, batch["teacher_ids"], batch["teacher_mask"],
                                                               batch["answer_ids"], batch["answer_mask"])
            else:
                logits, _ = self.model.continuation_logits(None, batch["teacher_ids"], batch["teacher_mask"],
                                                           batch["answer_ids"], batch["answer_mask"])
        return logits

    def train_step(self, batch) -> Dict[str, float]:
        self.model.train()
        batch = to_device(batch, self.device)
        selected_ids, scores = self.model.select_documents(batch["encoder_ids"], batch["encoder_mask"], k=self.top_k)
        logits, labels = self.model.answer_logits(batch["query_ids"], selected_ids, batch["answer_ids"],
                                                  batch["query_mask"], batch["answer_mask"])
        teacher = self.teacher_logits(batch) if getattr(self.generation_loss, "needs_teacher", False) else None
        gen_loss = self.generation_loss(logits, labels, teacher_logits=teacher) if teacher is not None \
            else self.generation_loss(logits, labels)
        retrieval_loss = self.compute_retrieval_loss(scores, batch["gold_doc_ids"], batch.get("example_ids"))
        loss = gen_loss + self.retrieval_weight * retrieval_loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, max_norm=self.grad_clip)
        self.optimizer.step()
        return {"total_loss": loss.item(), "gen_loss": gen_loss.item(), "retrieval_loss": retrieval_loss.item()}

    def fit(self, dataset, *, epochs: int, batch_size: int, seed: int, checkpoint_root, config_dict,
            logger: Optional[RunLogger] = None, checkpoint_every: int = 0, epoch_end_fn=None) -> Dict[str, float]:
        loop = EpochLoop(self.model, self.optimizer, phase="read", checkpoint_root=checkpoint_root,
                         config_dict=config_dict, logger=logger or RunLogger(), checkpoint_every=checkpoint_every)
        return loop.run(dataset, epochs=epochs, batch_size=batch_size, seed=seed,
                        step_fn=self.train_step, epoch_end_fn=epoch_end_fn)


def _name_bad_example(gold_doc_ids: torch.Tensor, num_docs: int, example_ids) -> str:
    bad_rows = ((gold_doc_ids >= num_docs) | (gold_doc_ids < -1)).any(dim=1).nonzero().flatten().tolist()
    row = bad_rows[0] if bad_rows else 0
    name = example_ids[row] if example_ids is not None else f"at batch position {row}"
    return f"{name!r}" if example_ids is not None else name
