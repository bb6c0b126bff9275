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
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

import torch

from . import plugins
from .data import Document, QAExample, _pad_id, _token_ids, pad_sequences
from .evaluation import AnsweredBatch, decode_answers, score_answers
from .interfaces import Control
from .metrics import compute_recall_at_k


def build_control(section: Mapping[str, Any], corpus: Sequence[Document], tokenizer=None) -> Control:
    """The control named by ``section["name"]`` with the section's other keys as kwargs, indexed on ``corpus``."""
    control = plugins.build("control", section["name"], {k: v for k, v in section.items() if k != "name"})
    if not isinstance(control, Control):
        raise TypeError(f"control {section['name']!r} built a {type(control).__name__}, not a pqa Control")
    control.index(corpus, tokenizer)
    return control


@torch.no_grad()
def evaluate_control(model, control: Control, examples: Sequence[QAExample], *, top_k: int = 5,
                     batch_size: int = 16, max_new_tokens: int = 24, prompt: str = "Question: {question}\nAnswer:",
                     predictions_path: Optional[str] = None, doc_ids=None) -> Dict[str, float]:
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
            generated = model.generate_from(None, query_ids.to(device), query_mask.to(device),
                                            max_new_tokens=max_new_tokens)
            yield AnsweredBatch(
                indices=idx, predictions=decode_answers(tokenizer, generated),
                selected=[item.rows for item in inputs], scores=[item.scores for item in inputs],
                recalls=[compute_recall_at_k(item.rows, ex.gold_rows, top_k) for item, ex in zip(inputs, batch)],
                prompt_tokens=[len(row) for row in ids])

    metrics, _ = score_answers(examples, answered(), top_k=top_k, num_batches=-(-len(examples) // batch_size),
                               predictions_path=predictions_path, doc_ids=doc_ids, with_cost=True)
    return metrics
