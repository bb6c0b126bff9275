"""The component contracts every plugin implements.

The model components (selector, query encoder, projection, writer) and the losses are ``torch.nn.Module`` subclasses, so their parameters train with the
model, move with ``.to()`` and save with the checkpoint. A ``Control`` (a baseline that feeds the
LLM passage text, or nothing, instead of latents) trains nothing and is a plain object. Shapes below use
B = batch, N = number of documents, d_q = query-vector size, d_z = doc-vector
size, m = memory (soft) tokens per document, d_model = LLM hidden size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, List, Optional, Sequence

import torch
from torch import nn

from pqa_core.components.parameters import Range  # noqa: F401 - plugin authors declare parameters with it

__all__ = ["Range"]  # and the contracts below

DEFAULT_PROMPT = "Question: {question}\nAnswer:"
"""``data.prompt``'s default (the config declares it with this value; here so the contracts can default to it)."""


class QueryEncoder(nn.Module):
    """Token ids + mask -> query vectors ``[B, d_q]``.

    ``output_dim`` is set by the constructor. An encoder with its own
    vocabulary (e.g. MiniLM) sets ``tokenizer``; the data collator then
    tokenizes questions with it. Otherwise it reads the LLM's token ids.
    """

    output_dim: int
    tokenizer = None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Selector(nn.Module):
    """Query vectors ``[B, d_q]`` and doc vectors ``[N, d_z]`` -> scores ``[B, N]`` (higher is better).

    A selector whose score is a dot product of a query side and a document side,
    ``forward(q, z) == embed_queries(q) @ embed_documents(z).T``, implements both: evaluation then
    searches the document side with an index (``eval.index``, ``pqa_core.modeling.selection_index``). One
    that does not is scored by ``forward`` over blocks of documents (exact search only).
    """

    def forward(self, query_vectors: torch.Tensor, doc_vectors: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed_queries(self, query_vectors: torch.Tensor) -> torch.Tensor:
        """``[B, d_q]`` -> ``[B, e]``, the query side of the score."""
        raise NotImplementedError

    def embed_documents(self, doc_vectors: torch.Tensor) -> torch.Tensor:
        """``[N, d_z]`` -> ``[N, e]``, the document side of the score."""
        raise NotImplementedError


def is_factorised(selector: Selector) -> bool:
    """Whether the selector (or its class) implements ``embed_queries`` and ``embed_documents``."""
    cls = selector if isinstance(selector, type) else type(selector)
    return (getattr(cls, "embed_queries", None) not in (None, Selector.embed_queries)
            and getattr(cls, "embed_documents", None) not in (None, Selector.embed_documents))


class Projection(nn.Module):
    """Doc latents ``z [..., d_z]`` -> soft-prompt embeddings ``[..., m, d_model]`` the LLM reads.

    ``key_dims``: when set, only the first ``key_dims`` coordinates of z are the retrieval key the
    selector scores (and the query encoder's output size); the rest hold content for the LLM only.
    None (the default) means the selector scores the whole of z.
    """

    num_tokens: int
    key_dims: Optional[int] = None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class RetrievalLoss(nn.Module):
    """Scores ``[B, N]`` and a boolean gold mask ``[B, N]`` (one or more gold docs per row) -> scalar."""

    def forward(self, scores: torch.Tensor, gold_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class GenerationLoss(nn.Module):
    """Logits ``[B, T, V]`` aligned with labels ``[B, T]`` (``logits[:, t]`` predicts ``labels[:, t]``;
    -100 = ignore) -> scalar.

    A loss that sets ``needs_teacher = True`` also receives ``teacher_logits``
    ``[B, T, V]``, aligned the same way, from the LLM reading the gold passage
    text in context (xRAG-style distillation).
    """

    needs_teacher = False

    def forward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        teacher_logits: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        raise NotImplementedError


class Writer(nn.Module):
    """How a document's z is first made from its text: the soft-token part of z, ``[N, m, d_model]``.

    ``write_documents(texts, token_ids)`` writes N documents at once (their text and their LLM token
    ids, no eos) without gradient; the run calls it once when the model is built, and the write phase
    may refine what it wrote. A writer with trainable parameters (``trainable = True``) also implements
    ``forward(token_ids) -> [B, m, d_model]`` with gradient: ``pqa run pretrain`` trains it through the
    reader (ICAE/PISCO-style). One without (``keywords``, ``sentences``) has nothing to pretrain.
    """

    trainable = False

    def prepare(self, texts: Sequence[str], token_ids: Sequence[Sequence[int]]) -> None:
        """Once per run, before any writing, with every row of the corpus: a writer may keep corpus
        statistics (the ``encoder``'s anchor words use the corpus's idf). Nothing by default."""

    def write_documents(self, texts: Sequence[str], token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no trainable encoder")


def writer_trains(writer: Writer) -> bool:
    """A writer with parameters (``trainable``) is pretrained live, through the reader; one without writes
    the doc table once and stays as it is."""
    return bool(getattr(writer, "trainable", False)) and any(p.requires_grad for p in writer.parameters())


@dataclass
class WriteContext:
    """What a write objective may prepare from, once, before the write phase.

    ``documents`` are the rows of ``doc_vectors`` (a passage longer than ``data.max_doc_tokens`` spans
    several rows; ``doc_tokens[row]`` are a row's text tokens, no eos); ``questions`` are the training
    questions, ``question_rows[i]`` the rows holding question i's gold passages. ``train_rows`` are the
    rows this write phase trains (None: all). ``cache_dir`` is a folder the objective may keep computed
    targets in (it survives a resume), or None.
    """

    model: nn.Module
    tokenizer: object
    documents: Sequence
    doc_tokens: Sequence[Sequence[int]]
    questions: Sequence
    question_rows: Sequence[Sequence[int]]
    prompt: str = DEFAULT_PROMPT
    max_query_tokens: int = 64
    max_answer_tokens: int = 24
    seed: int = 0
    cache_dir: Optional[str] = None
    train_rows: Optional[Sequence[int]] = None


class WriteObjective(nn.Module):
    """What the write phase trains z (and the projection) for: ``(model, rows [B]) -> scalar loss``.

    ``rows`` are the ``doc_vectors`` rows of one batch; the loss must reach z only through
    ``model.soft_prompts`` / ``model.doc_latents`` of those rows, so that a step moves only them.
    ``prepare(context)`` runs once before training (tokenize, compute and cache teacher targets).
    ``last_metrics()`` may return floats about the last call, logged beside the loss.
    """

    def prepare(self, context: WriteContext) -> None:
        pass

    def forward(self, model: nn.Module, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def last_metrics(self) -> dict:
        return {}


@dataclass
class ControlInput:
    """What a control gives the LLM for one question."""

    rows: List[int]  # corpus rows whose text is the context, best first (empty: none)
    scores: Optional[List[float]]  # the control's scores of ``rows`` (None: it has none)
    context: Optional[str]  # the passages' text as the LLM reads it (None: no context)
    prompt: str  # the whole text the LLM reads before answering


class Control:
    """A baseline: which passages' text the LLM reads before the question (``pqa run control``).

    ``index(corpus, tokenizer)`` is called once with the corpus (``pqa_core.data.loading.Document`` list)
    and the LLM's tokenizer; ``select(examples, k)`` returns, per question (``QAExample``), up to
    ``k`` corpus rows best first and their scores (or ``None``). ``prepare`` turns that into the
    prompt ``"Context: <passage>\\n<passage>\\n<prompt>"`` (the distillation teacher's layout) or,
    with no rows, the bare prompt. ``max_passage_tokens`` (0: no limit) keeps the first that many
    LLM tokens of each passage.
    """

    def __init__(self, max_passage_tokens: Annotated[int, Range(0), "a passage's tokens read; 0 = all"] = 0):
        self.max_passage_tokens = max_passage_tokens
        self.passages: List[str] = []

    def index(self, corpus: Sequence, tokenizer=None) -> None:
        texts = [doc.text for doc in corpus]
        if self.max_passage_tokens and tokenizer is not None:
            ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
            texts = [text if len(row) <= self.max_passage_tokens
                     else tokenizer.decode(row[:self.max_passage_tokens]) for text, row in zip(texts, ids)]
        self.passages = texts

    def select(self, examples: Sequence, k: int):
        """``(rows [B][<=k], scores [B][<=k] or None)``."""
        raise NotImplementedError

    def prepare(self, examples: Sequence, k: int, prompt: str = DEFAULT_PROMPT) -> List[ControlInput]:
        rows, scores = self.select(examples, k)
        out = []
        for i, example in enumerate(examples):
            question = prompt.replace("{question}", example.question)  # no str.format: braces stay literal
            picked = [int(r) for r in rows[i]]
            context = "\n".join(self.passages[r] for r in picked) if picked else None
            out.append(ControlInput(picked, None if scores is None else [float(s) for s in scores[i]], context,
                                    question if context is None else f"Context: {context}\n{question}"))
        return out

