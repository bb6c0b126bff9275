"""Write phase: learn each document's z (and the projection; LoRA optional) for a write objective
(``write_objective.name``: reconstruct the text from z, distil the LLM reading the text, or a mix).

Teacher-forced token accuracy is known to look good while free-running decoding fails, so
each evaluation also decodes a sample of documents greedily and reports that accuracy.
"""
from __future__ import annotations

import logging
from typing import Dict, Optional

import torch

from pqa_core.config import WriteSettings
from pqa_core.interfaces import WriteContext, WriteObjective
from pqa_core.modeling.model import ParametricQA
from pqa_core.training import distributed
from pqa_core.training.optim import RowwiseAdamW
from pqa_core.training.loop import EpochLoop, RunLogger, apply_gradients, param_groups, to_device

log = logging.getLogger(__name__)


class WritePhaseTrainer:
    """Trains z (row-wise: only the batch's documents move) and the projection for ``objective``."""

    def __init__(self, model: ParametricQA, settings: WriteSettings, objective: WriteObjective):
        self.model = model
        self.settings = settings
        self.objective = objective
        self.device = model.doc_vectors.device
        s = settings
        groups = param_groups([("z", [model.doc_vectors], s.lr_z, {"rowwise": True, "betas": tuple(s.betas_z)}),
                               ("projection", model.z_to_embedding.parameters() if s.train_projection else [],
                                s.lr_projection, {}),
                               ("lora", model.lora_parameters() if s.train_lora else [], s.lr_lora, {})])
        self.trainable = [p for g in groups for p in g["params"]]
        self.optimizer = RowwiseAdamW(groups, weight_decay=0.0, state_factory=model.table_storage.state)

    def train_step(self, batch) -> Dict[str, float]:
        """One step on a global batch (this process's shard of it when several train)."""
        self.model.train()
        group = distributed.current()
        batch, weight = group.shard(batch)
        rows = batch["doc_row"].to(self.device)
        with group.forward(weight), self.model.autocast():
            loss = self.objective(self.model, rows)
        apply_gradients(loss, self.optimizer, self.trainable, self.settings.grad_clip)
        return group.mean_metrics({"loss": loss.item(), **self.objective.last_metrics()}, weight)

    def _logits(self, batch):
        rows = batch["doc_row"]
        prefix = self.model.soft_prompts(rows[:, None])
        empty = batch["doc_ids"][:, :0]
        return self.model.continuation_logits(prefix, empty, batch["doc_mask"][:, :0],
                                              batch["doc_ids"], batch["doc_mask"])

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
    def reconstruction(self, dataset, rows, batch_size: int) -> Dict[str, float]:
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

    def fit(self, dataset, *, seed: int, checkpoint_root, config_dict, logger: Optional[RunLogger] = None,
            rows: Optional[list] = None, epoch_end_fn=None) -> Dict[str, float]:
        """Train over ``dataset`` (a WritePhaseDataset; ``rows``: only these documents) for
        ``settings.epochs``, checking greedy reconstruction every ``settings.eval_every`` epochs;
        ``epoch_end_fn(epoch, step) -> dict`` adds other end-of-epoch measurements."""
        s = self.settings
        logger = logger or RunLogger()
        train_set = dataset if rows is None else torch.utils.data.Subset(dataset, list(rows))
        if rows is not None:
            train_set.collate = dataset.collate
        generator = torch.Generator().manual_seed(seed)
        pool = list(range(len(dataset))) if rows is None else list(rows)
        picks = torch.randperm(len(pool), generator=generator)[:s.eval_docs].tolist()
        sample = sorted(pool[i] for i in picks)

        def epoch_end(epoch: int, step: int) -> Dict[str, float]:
            out = dict(epoch_end_fn(epoch, step)) if epoch_end_fn is not None else {}
            if s.eval_docs <= 0 or (epoch % max(s.eval_every, 1) and epoch != s.epochs):
                return out
            return {**self.reconstruction(dataset, sample, s.batch_size), **out}

        loop = EpochLoop(self.model, self.optimizer, phase="write", checkpoint_root=checkpoint_root,
                         config_dict=config_dict, logger=logger, checkpoint_every=s.checkpoint_every)
        return loop.run(train_set, epochs=s.epochs, batch_size=s.batch_size, seed=seed,
                        step_fn=self.train_step, epoch_end_fn=epoch_end)


def prepared_objective(name: str, model: ParametricQA, rows, questions=(), question_rows=(), **params) -> WriteObjective:
    """Write objective ``name`` built and prepared on ``rows`` (a ``DocumentRows``), outside a pipeline
    (tests, benchmarks, notebooks)."""
    from pqa_core.components import plugins

    objective = plugins.build("write_objective", name, params)
    objective.prepare(WriteContext(model=model, tokenizer=model.tokenizer, documents=rows.documents,
                                   doc_tokens=rows.tokens, questions=list(questions),
                                   question_rows=list(question_rows)))
    return objective
