"""Answer and retrieval metrics, as fractions in [0, 1]; callers turn them into percentages.

Answer metrics follow the official SQuAD v1.1 evaluation script (``evaluate-v1.1.py``
from https://rajpurkar.github.io/SQuAD-explorer/) so numbers compare with published ones:
answers are normalised (lower case, punctuation removed, articles a/an/the removed,
whitespace collapsed), EM is equality of the normalised strings, F1 is token-bag
overlap of the normalised strings, and a prediction scores its best match over all
gold answers. As in that script, F1 is 0 when either side normalises to no tokens.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from typing import Callable, List, Optional, Sequence, Union

import torch

Answers = Union[str, Sequence[str]]

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 ``normalize_answer``: lower, drop punctuation, drop articles, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _as_list(answers: Answers) -> List[str]:
    answers = [answers] if isinstance(answers, str) else list(answers)
    if not answers:
        raise ValueError("no gold answers to compare with")
    return answers


def _best(score: Callable[[str, str], float], prediction: str, answers: Answers) -> float:
    """SQuAD's ``metric_max_over_ground_truths``."""
    return max(score(prediction, answer) for answer in _as_list(answers))


def _exact(prediction: str, answer: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(answer))


def _f1(prediction: str, answer: str) -> float:
    predicted = normalize_answer(prediction).split()
    gold = normalize_answer(answer).split()
    same = sum((Counter(predicted) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision = same / len(predicted)
    recall = same / len(gold)
    return 2 * precision * recall / (precision + recall)


def _contains(prediction: str, answer: str) -> float:
    gold = normalize_answer(answer)
    predicted = normalize_answer(prediction)
    # an answer that normalises to nothing (e.g. "the") would be in every prediction; require equality then
    return float(gold in predicted if gold else predicted == "")


def compute_em(prediction: str, answers: Answers) -> float:
    """1.0 when the normalised prediction equals some normalised gold answer, else 0.0."""
    return _best(_exact, prediction, answers)


def compute_f1(prediction: str, answers: Answers) -> float:
    """Best token-overlap F1 of the prediction against the gold answers."""
    return _best(_f1, prediction, answers)


def compute_substring(prediction: str, answers: Answers) -> float:
    """1.0 when some normalised gold answer occurs inside the normalised prediction.

    Lenient on purpose: a generative reader may wrap a correct span in extra words.
    """
    return _best(_contains, prediction, answers)


def compute_recall_at_k(selected_ids: Sequence, gold_ids: Sequence, k: int) -> float:
    """Fraction of the distinct gold docs that appear among the first ``k`` selected."""
    if k < 1:
        raise ValueError(f"k={k}: expected k >= 1")
    gold = set(gold_ids)
    if not gold:
        raise ValueError("recall@k needs at least one gold document")
    return len(gold & set(list(selected_ids)[:k])) / len(gold)


def recall_at_k(selected: torch.Tensor, gold: torch.Tensor, k: Optional[int] = None) -> torch.Tensor:
    """Per-row recall ``[B]`` float of ``selected [B, K]`` (first ``k`` columns, default all)
    against ``gold [B, G]`` padded with -1; every row needs at least one gold id."""
    if selected.dim() != 2 or gold.dim() != 2 or selected.shape[0] != gold.shape[0]:
        raise ValueError(f"expected selected [B, K] and gold [B, G], got {tuple(selected.shape)} "
                         f"and {tuple(gold.shape)}")
    if k is not None:
        if k < 1:
            raise ValueError(f"k={k}: expected k >= 1")
        selected = selected[:, :k]
    is_gold = gold >= 0
    num_gold = is_gold.sum(1)
    if (num_gold == 0).any():
        raise ValueError(f"recall@k: row {int((num_gold == 0).nonzero()[0])} has no gold document")
    found = (gold.unsqueeze(2) == selected.unsqueeze(1)).any(2) & is_gold  # [B, G]
    return found.sum(1).float() / num_gold.float()
