"""Controls: baselines scored through pqa's own generation, metrics and predictions file.

A control (``pqa_core.interfaces.Control``, chosen by name like any component: ``closed_book``,
``random_docs``, ``oracle``, ``bm25``, ``dense_minilm`` or a plugin's) decides which passages' *text*
the LLM reads before the question. Everything else is pqa's: the prompt template, the LLM and its
batched greedy decoding with the KV cache (``ParametricQA.generate_from`` with no soft prefix), and
``evaluation.score_answers`` (EM, F1, substring, Recall@k, the predictions JSONL). So a control's
numbers compare with a pqa run's (``evaluate_qa(..., with_cost=True)``) key for key:

``EM``, ``F1``, ``substring``, ``Recall@{k}`` (percent), ``latency_ms_per_question`` (wall time of
selection, prompt tokenization, generation and decoding at the evaluation batch size, per question)
and ``prompt_tokens_per_question`` (tokens the LLM reads before its answer).

A control's reader can be trained for its own input (``ControlReaderTrainer``, the ``control_read``
phase: ``pqa run control with control.name=oracle train_reader``), with the read phase's settings, so
that text RAG is compared with pqa reader for reader rather than through a LoRA trained on soft tokens.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from pqa_core.training import distributed
from pqa_core.components import plugins
from pqa_core.data.loading import Document, QAExample, _pad_id, _token_ids, pad_sequences
from pqa_core.errors import UsageError
from pqa_core.evaluation.qa import AnsweredBatch, decode_answers, score_answers
from pqa_core.interfaces import Control
from pqa_core.training.distributed import batch_mean
from pqa_core.evaluation.metrics import compute_recall_at_k
from pqa_core.training.optim import RowwiseAdamW
from pqa_core.training.loop import EpochLoop, RunLogger, apply_gradients, param_groups, to_device


def build_control(section: Mapping[str, Any], corpus: Sequence[Document], tokenizer=None) -> Control:
    """The control named by ``section["name"]`` with the section's other keys as kwargs, indexed on ``corpus``."""
    control = plugins.build("control", section["name"], {k: v for k, v in section.items() if k != "name"})
    if not isinstance(control, Control):
        raise TypeError(f"control {section['name']!r} built a {type(control).__name__}, not a pqa Control")
    control.index(corpus, tokenizer)
    return control


@torch.no_grad()
def evaluate_control(model, control: Control, examples: Sequence[QAExample], *, top_k: int,
                     batch_size: int, max_new_tokens: int, prompt: str,
                     predictions_path: Optional[str] = None, doc_ids=None, seed: int = 0) -> Dict[str, float]:
    """Answer ``examples`` with the LLM of ``model`` (a ``ParametricQA``) reading what ``control`` picks.

    ``control`` must already be indexed on the corpus whose rows the examples' ``gold_rows`` name.
    Returns the metrics listed in the module docstring; the predictions file (if asked for) has
    ``evaluate_qa``'s fields plus ``prompt_tokens``.
    """
    if "{question}" not in prompt:
        raise ValueError(f"prompt {prompt!r} must contain '{{question}}'")
    model.eval()
    device = model.doc_vectors.device
    tokenizer = model.tokenizer
    pad = _pad_id(tokenizer)

    def answered():
        for start in range(0, len(examples), batch_size):
            idx = list(range(start, min(start + batch_size, len(examples))))
            batch = [examples[i] for i in idx]
            inputs = control.prepare(batch, top_k, prompt)
            ids = _token_ids(tokenizer, [item.prompt for item in inputs])
            query_ids, query_mask = pad_sequences(ids, pad, "left")
            with model.autocast():
                generated = model.generate_from(None, query_ids.to(device), query_mask.to(device),
                                                max_new_tokens=max_new_tokens)
            yield AnsweredBatch(
                indices=idx, predictions=decode_answers(tokenizer, generated),
                selected=[item.rows for item in inputs], scores=[item.scores for item in inputs],
                recalls=[compute_recall_at_k(item.rows, ex.gold_rows, top_k) for item, ex in zip(inputs, batch)],
                prompt_tokens=[len(row) for row in ids])

    metrics, _ = score_answers(examples, answered(), top_k=top_k, num_batches=-(-len(examples) // batch_size),
                               predictions_path=predictions_path, doc_ids=doc_ids, with_cost=True, seed=seed)
    return metrics


class ControlReaderDataset(torch.utils.data.Dataset):
    """One item per training question: the prompt a control builds (its passages' text, or nothing, then
    the question) and the answer, tokenized once; the selection is fixed, so every epoch reads the same."""

    def __init__(self, control: Control, examples: Sequence[QAExample], tokenizer, *, top_k: int, prompt: str,
                 max_answer_tokens: int, prepare_chunk: int = 64):
        self.tokenizer = tokenizer
        self.pad = _pad_id(tokenizer)
        eos = tokenizer.eos_token_id
        prompts = []
        for start in range(0, len(examples), prepare_chunk):  # questions a control selects for at once
            prompts += [item.prompt for item in control.prepare(examples[start:start + prepare_chunk], top_k, prompt)]
        self.prompt_ids = _token_ids(tokenizer, prompts)
        self.answer_ids = [ids[:max_answer_tokens] + [eos]
                           for ids in _token_ids(tokenizer, [" " + ex.answers[0] for ex in examples])]

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def __getitem__(self, index: int) -> dict:
        return {"prompt_ids": self.prompt_ids[index], "answer_ids": self.answer_ids[index]}

    def collate(self, batch) -> Dict[str, torch.Tensor]:
        query_ids, query_mask = pad_sequences([b["prompt_ids"] for b in batch], self.pad, "left")
        answer_ids, answer_mask = pad_sequences([b["answer_ids"] for b in batch], self.pad, "right")
        return {"query_ids": query_ids, "query_mask": query_mask, "answer_ids": answer_ids, "answer_mask": answer_mask}


class ControlReaderTrainer:
    """Trains the LLM's LoRA to answer from what a control gives it (text passages, or nothing), with the
    read phase's settings (epochs, batch size, LoRA learning rate, clipping): the same training questions,
    steps and learning rate as pqa's reader, each reader trained for its own input."""

    def __init__(self, model, settings):
        self.model = model
        self.settings = settings
        self.loop: Optional[EpochLoop] = None  # the loop fit runs (its training time), once fit starts
        lora = model.lora_parameters()
        if not lora:
            raise UsageError("training a control's reader needs LoRA (model.lora.enabled=true)")
        self.trainable = lora
        self.optimizer = RowwiseAdamW(param_groups([("lora", lora, settings.lr_lora,
                                                     {"weight_decay": settings.weight_decay})]))

    def train_step(self, batch) -> Dict[str, float]:
        self.model.train()
        group = distributed.current()
        batch, weight = group.shard(batch)
        batch = to_device(batch, self.model.doc_vectors.device)
        with group.forward(weight), self.model.autocast():
            logits, labels = self.model.continuation_logits(None, batch["query_ids"], batch["query_mask"],
                                                            batch["answer_ids"], batch["answer_mask"])
            valid = labels != -100
            loss = batch_mean(F.cross_entropy(logits[valid].float(), labels[valid], reduction="none"))
        apply_gradients(loss, self.optimizer, self.trainable, self.settings.grad_clip)
        return group.mean_metrics({"loss": loss.item()}, weight)

    def fit(self, dataset: ControlReaderDataset, *, seed: int, checkpoint_root, config_dict,
            logger: Optional[RunLogger] = None, phase: str = "control_read", max_steps: int = 0) -> Dict[str, float]:
        s = self.settings
        self.loop = EpochLoop(self.model, self.optimizer, phase=phase, checkpoint_root=checkpoint_root,
                              config_dict=config_dict, logger=logger or RunLogger(),
                              checkpoint_every=s.checkpoint_every)
        return self.loop.run(dataset, epochs=s.epochs, batch_size=s.batch_size, seed=seed, step_fn=self.train_step,
                             max_steps=max_steps)
