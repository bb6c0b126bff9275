"""Batched evaluation: select, generate, score; one predictions JSONL line per question.

Unlike the seed notebook (one question at a time, padded to 128), questions go through in
batches with dynamic padding and the KV cache. Result keys: ``EM``, ``F1``, ``substring``,
``Recall@{k}``, as percentages.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Optional

import torch
from tqdm.auto import tqdm

from .metrics import compute_em, compute_f1, compute_substring, recall_at_k
from .training import show_progress, to_device


def decode_answers(tokenizer, token_ids: torch.Tensor):
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in token_ids.tolist()]


@torch.no_grad()
def evaluate_retrieval(model, dataset, top_k: int, batch_size: int = 32) -> float:
    """Gold-document Recall@k in percent, without generating."""
    model.eval()
    device = model.doc_vectors.device
    hits = []
    for start in range(0, len(dataset), batch_size):
        batch = to_device(dataset.collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]),
                          device)
        selected, _ = model.select_documents(batch["encoder_ids"], batch["encoder_mask"], k=top_k)
        hits.append(recall_at_k(selected, batch["gold_doc_ids"]))
    return 100.0 * float(torch.cat(hits).mean()) if hits else 0.0


@torch.no_grad()
def evaluate_qa(model, dataset, *, top_k: int = 5, batch_size: int = 16, max_new_tokens: int = 24,
                predictions_path: Optional[str] = None, doc_ids=None) -> Dict[str, float]:
    """EM / F1 / substring / Recall@k over ``dataset`` (a ReadPhaseDataset), in percent."""
    model.eval()
    device = model.doc_vectors.device
    tokenizer = model.tokenizer
    examples = dataset.examples
    sums = {"EM": 0.0, "F1": 0.0, "substring": 0.0, f"Recall@{top_k}": 0.0}
    tmp_path = None
    out = None
    if predictions_path:
        Path(predictions_path).parent.mkdir(parents=True, exist_ok=True)
        tmp_path = f"{predictions_path}.tmp-{os.getpid()}"
        out = open(tmp_path, "w", encoding="utf-8")
    try:
        order = range(len(dataset))
        for start in tqdm(range(0, len(dataset), batch_size), desc="evaluating", disable=not show_progress(),
                          leave=False):
            idx = list(order[start:start + batch_size])
            batch = to_device(dataset.collate([dataset[i] for i in idx]), device)
            selected, scores = model.select_documents(batch["encoder_ids"], batch["encoder_mask"], k=top_k)
            generated = model.generate(batch["query_ids"], selected, batch["query_mask"], max_new_tokens=max_new_tokens)
            predictions = decode_answers(tokenizer, generated)
            recalls = recall_at_k(selected, batch["gold_doc_ids"]).tolist()
            top_scores = scores.gather(1, selected).tolist()
            for j, i in enumerate(idx):
                example = examples[i]
                em = compute_em(predictions[j], example.answers)
                f1 = compute_f1(predictions[j], example.answers)
                sub = compute_substring(predictions[j], example.answers)
                sums["EM"] += em
                sums["F1"] += f1
                sums["substring"] += sub
                sums[f"Recall@{top_k}"] += recalls[j]
                if out is not None:
                    sel_rows = selected[j].tolist()
                    out.write(json.dumps({
                        "id": example.id, "question": example.question, "answers": example.answers,
                        "prediction": predictions[j],
                        "selected_ids": [doc_ids[r] for r in sel_rows] if doc_ids is not None else sel_rows,
                        "gold_ids": list(example.gold_doc_ids), "scores": top_scores[j],
                        "em": em, "f1": f1, "substring": sub,
                    }, ensure_ascii=False) + "\n")
        if out is not None:
            out.close()
            os.replace(tmp_path, predictions_path)
            out = None
    finally:
        if out is not None:
            out.close()
        if tmp_path and os.path.exists(tmp_path):
            os.remove(tmp_path)
    n = max(len(dataset), 1)
    return {k: 100.0 * v / n for k, v in sums.items()}
