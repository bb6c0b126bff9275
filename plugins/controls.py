"""Built-in controls: what the LLM reads before the question when it reads text instead of latents.

- ``closed_book``: nothing; the LLM answers from its own weights.
- ``random_docs``: ``k`` passages drawn at random per question (seeded by ``seed`` and the question id,
  so the draw does not depend on batching or order).
- ``oracle``: the gold passage(s), at most ``k`` (Recall@k is 100 by construction).
- ``bm25``: BM25 top-k over ``title. text`` with the ``bm25s`` library (Lucene scoring, English stop words).
- ``dense_minilm``: cosine top-k between MiniLM (all-MiniLM-L6-v2) embeddings of the question and of
  ``title. text``, the embeddings pqa initialises its doc vectors with.

Every one takes ``max_passage_tokens`` (0: whole passages; see ``pqa_core.interfaces.Control``); their
other keyword arguments are their own parameters. All are config: ``control.name=bm25 control.k1=1.2``.
"""
from __future__ import annotations

import logging
import random
from typing import Annotated, List, Sequence

import torch
import torch.nn.functional as F

from pqa_core.hookspecs import hookimpl
from pqa_core.interfaces import Control, Range


def _title_and_text(doc) -> str:
    """The text retrieval indexes, as ``pqa_core.modeling.builder.initial_keys`` embeds it."""
    return (doc.title.replace("_", " ") + ". " + doc.text).strip(". ")


class ClosedBook(Control):
    """No context: the bare prompt."""

    def select(self, examples, k):
        return [[] for _ in examples], None


class RandomDocs(Control):
    """``k`` distinct random passages per question; ``seed`` and the question id fix the draw."""

    def __init__(self, seed: Annotated[int, Range(0), "with the question id, fixes the draw"] = 0,
                 max_passage_tokens: Annotated[int, Range(0), "a passage's tokens read; 0 = all"] = 0):
        super().__init__(max_passage_tokens)
        self.seed = seed

    def select(self, examples, k):
        n = len(self.passages)
        return [random.Random(f"{self.seed}:{ex.id}").sample(range(n), min(k, n)) for ex in examples], None


class Oracle(Control):
    """The gold passages (the first ``k`` of them): an upper bound for any retriever."""

    def select(self, examples, k):
        return [list(ex.gold_rows[:k]) for ex in examples], None


class BM25(Control):
    """BM25 top-k with ``bm25s``; ``k1``, ``b`` and ``method`` are its scoring parameters."""

    def __init__(self, k1: Annotated[float, Range(0), "term-frequency saturation"] = 1.5,
                 b: Annotated[float, Range(0, 1), "length normalisation"] = 0.75,
                 method: Annotated[str, "bm25s's variant: lucene, robertson, atire, bm25l, bm25+"] = "lucene",
                 stopwords: Annotated[str, "bm25s's stopword list"] = "en",
                 max_passage_tokens: Annotated[int, Range(0), "a passage's tokens read; 0 = all"] = 0):
        super().__init__(max_passage_tokens)
        self.k1, self.b, self.method, self.stopwords = k1, b, method, stopwords
        self._tokenizer = self._retriever = None

    def index(self, corpus, tokenizer=None):
        super().index(corpus, tokenizer)
        import bm25s
        from bm25s.tokenization import Tokenizer

        bm25s_log = logging.getLogger("bm25s")
        if bm25s_log.level == logging.DEBUG:  # bm25s sets DEBUG on import; follow pqa's logging instead
            bm25s_log.setLevel(logging.NOTSET)

        self._tokenizer = Tokenizer(stopwords=self.stopwords or None)
        ids = self._tokenizer.tokenize([_title_and_text(d) for d in corpus], update_vocab=True,
                                       return_as="ids", show_progress=False)
        self._retriever = bm25s.BM25(k1=self.k1, b=self.b, method=self.method)
        self._retriever.index(ids, show_progress=False)

    def select(self, examples, k):
        if self._retriever is None:
            raise RuntimeError("bm25 control: call index(corpus) first")
        k = min(k, len(self.passages))
        if k < 1:
            return [[] for _ in examples], [[] for _ in examples]
        query = self._tokenizer.tokenize([ex.question for ex in examples], update_vocab=False,
                                         return_as="ids", show_progress=False)
        rows, scores = self._retriever.retrieve(query, k=k, show_progress=False, n_threads=1)
        return rows.tolist(), scores.tolist()


class DenseMiniLM(Control):
    """Cosine top-k between MiniLM embeddings of the question and of each ``title. text``."""

    def __init__(self, max_passage_tokens: Annotated[int, Range(0), "a passage's tokens read; 0 = all"] = 0,
                 batch_size: Annotated[int, Range(1), "passages embedded per MiniLM batch"] = 64):
        super().__init__(max_passage_tokens)
        self.batch_size = batch_size
        self._encoder = None
        self.doc_embeddings = None

    @torch.no_grad()
    def _embed(self, texts: Sequence[str], max_length: int) -> torch.Tensor:
        from pqa_core.modeling.minilm import MINILM_DIM, mean_pool

        model, tokenizer = self._encoder
        out: List[torch.Tensor] = []
        for start in range(0, len(texts), self.batch_size):
            enc = tokenizer(list(texts[start:start + self.batch_size]), padding=True, truncation=True,
                            max_length=max_length, return_tensors="pt")
            out.append(F.normalize(mean_pool(model(**enc).last_hidden_state, enc["attention_mask"]), dim=-1))
        return torch.cat(out) if out else torch.zeros(0, MINILM_DIM)

    def index(self, corpus, tokenizer=None):
        super().index(corpus, tokenizer)
        from pqa_core.modeling.minilm import load_minilm

        self._encoder = load_minilm()  # once: embed_texts would reload it on every call
        self.doc_embeddings = self._embed([_title_and_text(d) for d in corpus], max_length=256)

    def select(self, examples, k):
        if self.doc_embeddings is None:
            raise RuntimeError("dense_minilm control: call index(corpus) first")
        k = min(k, len(self.passages))
        queries = self._embed([ex.question for ex in examples], max_length=64)
        scores, rows = (queries @ self.doc_embeddings.T).topk(k, dim=-1)
        return rows.tolist(), scores.tolist()


@hookimpl
def pqa_register_controls(register):
    register("closed_book", ClosedBook)
    register("random_docs", RandomDocs)
    register("oracle", Oracle)
    register("bm25", BM25)
    register("dense_minilm", DenseMiniLM)
