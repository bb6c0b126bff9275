"""Batched evaluation: select, generate, score; one predictions JSONL line per question.

Questions go through in batches with dynamic padding and the KV cache (a batched question is
answered as it would be alone: tests/test_pipeline.py), so evaluation costs batches, not questions. Result keys: ``EM``, ``F1``, ``substring``,
``Recall@{k}``, as percentages, each with its 95% bootstrap interval (``F1_ci95_low``, ``F1_ci95_high``),
and ``questions``; with ``with_cost`` also ``latency_ms_per_question`` and
``prompt_tokens_per_question``. ``score_answers`` is the scoring loop pqa and the controls
(``pqa_core.training.controls``) share.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from pqa_core.evaluation.metrics import compute_em, compute_f1, compute_substring, recall_at_k
from pqa_core.modeling.selection_index import ExactIndex, SelectionIndex
from pqa_core.evaluation.stats import intervals
from pqa_core.storage.atomic import atomic_file
from pqa_core.storage.tensor_files import check_mapped
from pqa_core.training.loop import show_progress, to_device


def decode_answers(tokenizer, token_ids: torch.Tensor):
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in token_ids.tolist()]


@dataclass
class AnsweredBatch:
    """What one batch of questions produced; lists run parallel to ``indices``."""

    indices: List[int]  # positions in the examples being scored
    predictions: List[str]
    selected: List[List[int]]  # corpus rows read, best first (empty: none)
    scores: List[Optional[List[float]]]  # the selector's scores of ``selected`` (None: no scores)
    recalls: List[float]  # gold-document recall of ``selected``, a fraction
    prompt_tokens: Optional[List[int]] = None  # tokens the LLM read before answering (soft tokens included)


def score_answers(examples: Sequence, batches: Iterable[AnsweredBatch], *, top_k: int, num_batches: int = 0,
                  predictions_path: Optional[str] = None, doc_ids=None,
                  with_cost: bool = False, seed: int = 0) -> Tuple[Dict[str, float], float]:
    """Score answered batches: ``(metrics in percent, wall seconds spent producing the batches)``.

    Each metric comes with its 95% bootstrap interval over the questions (``<metric>_ci95_low`` /
    ``_high``, seeded by ``seed``; ``pqa_core.evaluation.stats``), and ``questions`` is how many were scored.

    The seconds are those spent inside ``batches`` (selection, prompt building, generation,
    decoding), not scoring or writing. The predictions file, when asked for, is written under a
    temporary name and renamed at the end, so it is never half-written.
    """
    per_question: Dict[str, List[float]] = {"EM": [], "F1": [], "substring": [], f"Recall@{top_k}": []}
    prompt_tokens = 0
    seconds = 0.0
    with contextlib.ExitStack() as files:  # the file closes, then replaces the old one; never half-written
        out = None
        if predictions_path:
            out = files.enter_context(open(files.enter_context(atomic_file(predictions_path)), "w", encoding="utf-8"))
        iterator = iter(batches)
        progress = tqdm(total=num_batches or None, desc="evaluating", disable=not show_progress(), leave=False)
        while True:
            start = time.perf_counter()
            batch = next(iterator, None)
            seconds += time.perf_counter() - start
            if batch is None:
                break
            progress.update(1)
            for j, i in enumerate(batch.indices):
                example = examples[i]
                prediction = batch.predictions[j]
                em = compute_em(prediction, example.answers)
                f1 = compute_f1(prediction, example.answers)
                sub = compute_substring(prediction, example.answers)
                for name, value in (("EM", em), ("F1", f1), ("substring", sub),
                                    (f"Recall@{top_k}", batch.recalls[j])):
                    per_question[name].append(value)
                if batch.prompt_tokens is not None:
                    prompt_tokens += batch.prompt_tokens[j]
                if out is not None:
                    sel_rows = batch.selected[j]
                    record = {
                        "id": example.id, "question": example.question, "answers": example.answers,
                        "prediction": prediction,
                        "selected_ids": [doc_ids[r] for r in sel_rows] if doc_ids is not None else sel_rows,
                        "gold_doc_ids": list(example.gold_doc_ids), "scores": batch.scores[j],
                        "em": em, "f1": f1, "substring": sub,
                    }
                    if with_cost and batch.prompt_tokens is not None:
                        record["prompt_tokens"] = batch.prompt_tokens[j]
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
        progress.close()
    n = max(len(examples), 1)
    metrics = intervals(per_question, seed=seed) if examples else {k: 0.0 for k in per_question}
    metrics["questions"] = len(examples)
    if with_cost:
        metrics["latency_ms_per_question"] = 1000.0 * seconds / n
        metrics["prompt_tokens_per_question"] = prompt_tokens / n
    return metrics, seconds


def selected_passages(dataset, selected: torch.Tensor) -> torch.Tensor:
    """The corpus rows (passages) of selected ``doc_vectors`` rows: Recall@k counts a split passage
    as found when any of its pieces is selected."""
    mapping = getattr(dataset, "passage_of_row", None)
    return selected if mapping is None else mapping.to(selected.device)[selected]


@torch.no_grad()
def evaluate_retrieval(model, dataset, *, top_k: int, batch_size: int,
                       index: Optional[SelectionIndex] = None) -> float:
    """Gold-document Recall@k in percent, without generating; documents searched by ``index`` (exact by default)."""
    model.eval()
    device = model.doc_vectors.device
    index = index or ExactIndex()
    hits = []
    for start in range(0, len(dataset), batch_size):
        check_mapped()  # a mapped table cut short would be a SIGBUS here
        batch = to_device(dataset.collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]),
                          device)
        selected, _ = model.top_documents(batch["encoder_ids"], batch["encoder_mask"], top_k, index)
        hits.append(recall_at_k(selected_passages(dataset, selected), batch["gold_passages"]))
    return 100.0 * float(torch.cat(hits).mean()) if hits else 0.0


@torch.no_grad()
def evaluate_qa(model, dataset, *, top_k: int, batch_size: int, max_new_tokens: int,
                predictions_path: Optional[str] = None, doc_ids=None, with_cost: bool = False,
                seed: int = 0, index: Optional[SelectionIndex] = None) -> Dict[str, float]:
    """EM / F1 / substring / Recall@k over ``dataset`` (a ReadPhaseDataset), in percent; documents
    searched by ``index`` (``eval.index``; exact by default).

    ``with_cost`` adds ``latency_ms_per_question`` (wall time of collation, selection, generation and
    decoding at this batch size, per question) and ``prompt_tokens_per_question`` (``k*m`` soft
    tokens plus the question's tokens), measured as ``pqa_core.training.controls.evaluate_control`` measures them.
    """
    model.eval()
    device = model.doc_vectors.device
    tokenizer = model.tokenizer
    index = index or ExactIndex()

    def answered():
        for start in range(0, len(dataset), batch_size):
            check_mapped()
            idx = list(range(start, min(start + batch_size, len(dataset))))
            batch = to_device(dataset.collate([dataset[i] for i in idx]), device)
            with model.autocast():
                selected, scores = model.top_documents(batch["encoder_ids"], batch["encoder_mask"], top_k, index)
                generated = model.generate(batch["query_ids"], selected, batch["query_mask"],
                                           max_new_tokens=max_new_tokens)
            prompt_tokens = None
            if with_cost:  # Projection.num_tokens soft tokens per selected document, then the question
                soft = selected.shape[1] * model.z_to_embedding.num_tokens
                prompt_tokens = (batch["query_mask"].sum(1) + soft).tolist()
            yield AnsweredBatch(
                indices=idx, predictions=decode_answers(tokenizer, generated), selected=selected.tolist(),
                scores=scores.tolist(),
                recalls=recall_at_k(selected_passages(dataset, selected), batch["gold_passages"]).tolist(),
                prompt_tokens=prompt_tokens)

    metrics, _ = score_answers(dataset.examples, answered(), top_k=top_k,
                               num_batches=-(-len(dataset) // batch_size), predictions_path=predictions_path,
                               doc_ids=doc_ids, with_cost=with_cost, seed=seed)
    return metrics
