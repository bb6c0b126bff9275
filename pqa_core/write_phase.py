"""Write phase: learn each document's z (and the projection; LoRA optional) so the LLM
reconstructs the document from its projected z alone.

Teacher-forced token accuracy is known to look good while free-running decoding fails, so
each evaluation also decodes a sample of documents greedily and reports that accuracy.
"""
from __future__ import annotations

import logging
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from .model import ParametricQA
from .training import EpochLoop, RunLogger, param_groups, to_device

log = logging.getLogger(__name__)


class WritePhaseTrainer:
    def __init__(self, model: ParametricQA, *, lr_z: float = 5e-2, lr_projection: float = 3e-2,
                 lr_lora: float = 1e-3, train_lora: bool = False, grad_clip: float = 1.0):
        self.model = model
        self.grad_clip = grad_clip
        self.device = model.doc_vectors.device
        groups = [("z", [model.doc_vectors], lr_z),
                  ("projection", list(model.z_to_embedding.parameters()), lr_projection)]
        if train_lora:
            groups.append(("lora", list(model.lora_parameters()), lr_lora))
        self.trainable = [p for _, params, _ in groups for p in params]
        self.optimizer = torch.optim.AdamW(param_groups((n, list(p), lr) for n, p, lr in groups), weight_decay=0.0)
        self.train_lora = train_lora

    def _logits(self, batch):
        rows = batch["doc_row"]
        prefix = self.model.soft_prompts(rows[:, None])
        empty = batch["doc_ids"][:, :0]
        return self.model.continuation_logits(prefix, empty, batch["doc_mask"][:, :0],
                                              batch["doc_ids"], batch["doc_mask"])

    def train_step(self, batch) -> Dict[str, float]:
        self.model.train()
        batch = to_device(batch, self.device)
        logits, labels = self._logits(batch)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, max_norm=self.grad_clip)
        self.optimizer.step()
        valid = labels != -100
        accuracy = ((logits.argmax(-1) == labels) & valid).sum() / valid.sum().clamp(min=1)
        return {"loss": loss.item(), "token_acc": accuracy.item()}

    @torch.no_grad()
    def greedy_hits(self, batch) -> tuple:
        """Decode each document of ``batch`` greedily from its soft prompt alone.

        Returns ``(hits, valid)``, both ``[B, L]`` bools: position t of the text (eos included) was
        decoded right, and is a real position. Decoding is free-running: a first mistake
        usually derails the rest, which is why this is the honest reconstruction measure.
        """
        self.model.eval()
        batch = to_device(batch, self.device)
        target, valid = batch["doc_ids"], batch["doc_mask"].bool()
        prefix = self.model.soft_prompts(batch["doc_row"][:, None])
        empty = target[:, :0]
        generated = self.model.generate_from(prefix, empty, batch["doc_mask"][:, :0], max_new_tokens=target.shape[1])
        padded = torch.full_like(target, -1)
        padded[:, :generated.shape[1]] = generated
        return (padded == target) & valid, valid

    @torch.no_grad()
    def reconstruction(self, dataset, rows, batch_size: int = 8) -> Dict[str, float]:
        """Teacher-forced and greedy token accuracy, and greedy exact match, on documents ``rows``."""
        self.model.eval()
        tf_correct = tf_total = g_correct = exact = 0
        for start in range(0, len(rows), batch_size):
            batch = to_device(dataset.collate([dataset[r] for r in rows[start:start + batch_size]]), self.device)
            logits, labels = self._logits(batch)
            valid = labels != -100
            tf_correct += int(((logits.argmax(-1) == labels) & valid).sum())
            tf_total += int(valid.sum())
            hits, real = self.greedy_hits(batch)
            g_correct += int(hits.sum())
            exact += int((hits | ~real).all(dim=1).sum())
        n = max(len(rows), 1)
        return {"tf_token_acc": tf_correct / max(tf_total, 1), "greedy_token_acc": g_correct / max(tf_total, 1),
                "greedy_exact": exact / n}

    def fit(self, dataset, *, epochs: int, batch_size: int, seed: int, checkpoint_root, config_dict,
            logger: Optional[RunLogger] = None, eval_docs: int = 8, eval_every: int = 10,
            checkpoint_every: int = 0) -> Dict[str, float]:
        logger = logger or RunLogger()
        generator = torch.Generator().manual_seed(seed)
        sample = sorted(torch.randperm(len(dataset), generator=generator)[:eval_docs].tolist())

        def epoch_end(epoch: int, step: int) -> Dict[str, float]:
            if eval_docs <= 0 or (epoch % max(eval_every, 1) and epoch != epochs):
                return {}
            return self.reconstruction(dataset, sample, batch_size)

        loop = EpochLoop(self.model, self.optimizer, phase="write", checkpoint_root=checkpoint_root,
                         config_dict=config_dict, logger=logger, checkpoint_every=checkpoint_every)
        return loop.run(dataset, epochs=epochs, batch_size=batch_size, seed=seed,
                        step_fn=self.train_step, epoch_end_fn=epoch_end)
