"""Salient tokens of a passage: the words of highest inverse document frequency, kept in text order.

What ``model.content_init=keywords`` starts a document's soft tokens from: the input embeddings of
its rarest words (names, numbers, terms: what questions ask about), as prompt tuning starts soft
prompts from vocabulary embeddings. The write phase then moves them like any other z.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import List, Sequence

WORD = re.compile(r"[\w'’\-]+")


def salient_token_ids(texts: Sequence[str], tokenizer, budget: int) -> List[List[int]]:
    """Per text, the LLM token ids of its highest-idf distinct words (idf over ``texts``; English stop
    words never count), at most
    ``budget`` tokens, in the order the words appear; ties go to the earlier word."""
    from bm25s.stopwords import STOPWORDS_EN_PLUS  # NLTK's English stop words; a dependency already

    words = [[m for m in WORD.finditer(text) if m.group(0).lower() not in STOPWORDS_EN_PLUS] for text in texts]
    df = Counter(w for found in words for w in {m.group(0).lower() for m in found})
    n = len(texts)
    out = []
    for text_words in words:
        unique = {}
        for index, match in enumerate(text_words):
            unique.setdefault(match.group(0).lower(), (index, match.group(0)))
        ranked = sorted(unique.items(), key=lambda kv: (-math.log((n + 1) / (1 + df[kv[0]])), kv[1][0]))
        kept, used = [], 0
        for _, (index, word) in ranked:
            ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
            if used + len(ids) <= budget:
                kept.append((index, ids))
                used += len(ids)
            if used == budget:
                break
        out.append([t for _, ids in sorted(kept) for t in ids])
    return out
