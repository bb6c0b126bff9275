"""Built-in write objectives: what the write phase trains each document's z for.

- ``reconstruct``: the LLM reading z alone regenerates the document's text (token cross-entropy).
- ``distill``: the LLM reading z plus a question matches, by KL on the answer tokens, the same frozen
  LLM reading the document's *text* plus that question (the teacher). Trains z for what a reader asks,
  which reconstruction alone does not (xRAG's KL term, PISCO, Cartridges' context distillation). The
  teacher's targets are computed once in ``prepare`` (top-``top_k`` log-probabilities per answer token,
  cached on disk when the run has a cache folder), never during training.
- ``weighted``: a weighted sum of other objectives, ``objectives={"reconstruct": 1.0, "distill": 1.0}``
  (a value may also be ``{"weight": w, <the objective's own parameters>}``).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
import re
from pathlib import Path
from typing import Annotated, Dict, List, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from pqa_core.storage.atomic import sha256_file
from pqa_core.data.loading import _pad_id, _token_ids, pad_sequences
from pqa_core.training.distributed import batch_mean
from pqa_core.hookspecs import hookimpl
from pqa_core.modeling.teacher import adapter_dir
from pqa_core.interfaces import Range, WriteContext, WriteObjective
from pqa_core.training.loop import show_progress

log = logging.getLogger(__name__)
QUESTION_SOURCES = {"train", "cloze"}


def _zero(model, rows: torch.Tensor) -> torch.Tensor:
    """A zero loss still connected to the rows' z (a batch with nothing to learn)."""
    return model.doc_latents(rows).sum() * 0.0


class Reconstruct(WriteObjective):
    """Token cross-entropy of the document's text (then eos) given its soft prompt alone; with
    ``max_tokens`` > 0, of its first ``max_tokens`` tokens (pretraining keeps the step short).

    ``contrast_weight`` > 0 adds a contrastive term: each distinct document of the batch is also scored
    after *another* document's soft prompt, and ``softplus(contrast_margin - (other - own))`` (nats per
    token) is added with that weight. Reconstruction alone can be lowered by soft tokens that say what any
    passage looks like; this term pays only for what tells this passage from the others (measured by
    ``bench/carry.py``: training by reconstruction alone erodes it). Its metrics: ``carried``, the batch's
    mean other - own, and ``contrast_loss``, the term before its weight.
    """

    def __init__(self, max_tokens: Annotated[int, Range(0), "a document's first tokens reconstructed; 0 = all"] = 0,
                 contrast_weight: Annotated[float, Range(0), "+ this x the own-vs-another-document margin loss; "
                                                             "0 = off"] = 0.0,
                 contrast_margin: Annotated[float, Range(0), "nats per token the own soft prompt should beat "
                                                             "another's by"] = 1.0):
        super().__init__()
        self.max_tokens = int(max_tokens)
        self.contrast_weight, self.contrast_margin = float(contrast_weight), float(contrast_margin)

    def prepare(self, context: WriteContext) -> None:
        eos = context.tokenizer.eos_token_id
        cut = self.max_tokens or None
        self.targets = [list(ids)[:cut] + ([eos] if cut is None or len(ids) <= cut else [])
                        for ids in context.doc_tokens]
        self.pad = _pad_id(context.tokenizer)
        self._metrics: Dict[str, float] = {}

    def forward(self, model, rows: torch.Tensor) -> torch.Tensor:
        ids, mask = pad_sequences([self.targets[r] for r in rows.tolist()], self.pad, "right")
        ids, mask = ids.to(rows.device), mask.to(rows.device)
        prefix = model.soft_prompts(rows[:, None])
        logits, labels = model.continuation_logits(prefix, ids[:, :0], mask[:, :0], ids, mask)
        valid = labels != -100
        token_nll = F.cross_entropy(logits[valid].float(), labels[valid], reduction="none")
        loss = batch_mean(token_nll)
        self._metrics = {"token_acc": float((logits.argmax(-1)[valid] == labels[valid]).float().mean())}
        if self.contrast_weight > 0:
            own = torch.zeros(labels.shape, dtype=token_nll.dtype, device=labels.device)
            own[valid] = token_nll  # the same token losses, per row: each document's nats per token
            own = own.sum(1) / valid.sum(1).clamp(min=1)
            loss = loss + self.contrast_weight * self._contrast(model, rows, prefix, ids, mask, own, labels)
        return loss

    def _contrast(self, model, rows, prefix, ids, mask, own, labels) -> torch.Tensor:
        """The margin loss over the batch's distinct documents, each scored after the next one's prefix
        (``own``: each row's nats per token after its own)."""
        from pqa_core.modeling.model import nats_per_row

        first = {}
        for position, row in enumerate(rows.tolist()):
            first.setdefault(row, position)
        distinct = torch.tensor(sorted(first.values()), device=rows.device)
        if len(distinct) < 2:  # nothing to tell apart: no units, still connected to the graph
            return batch_mean(prefix.sum()[None][:0], key="reconstruct.contrast")
        partner = distinct.roll(1)
        other_logits, _ = model.continuation_logits(prefix[partner], ids[distinct, :0], mask[distinct, :0],
                                                    ids[distinct], mask[distinct])
        carried = nats_per_row(other_logits, labels[distinct]) - own[distinct]
        contrast = F.softplus(self.contrast_margin - carried)
        self._metrics.update(carried=float(carried.detach().mean()), contrast_loss=float(contrast.detach().mean()))
        return batch_mean(contrast, key="reconstruct.contrast")

    def last_metrics(self) -> dict:
        return dict(self._metrics)


class Distill(WriteObjective):
    """KL(teacher reading the text + question || LLM reading z + question) on the answer tokens.

    ``questions``: ``"train"`` uses the training questions whose gold passage a row holds (a split
    passage: the rows whose text contains an answer, else all its rows). ``top_k``: how many teacher
    log-probabilities are kept per answer token (the rest of the mass is one bucket). ``temperature``
    softens both distributions (the loss is scaled by T^2). ``ce_weight`` adds cross-entropy on the
    gold answer. ``teacher_batch_size`` only sets how many teacher passes run at once.
    """

    def __init__(self, questions: Annotated[str, "the teacher's questions: train, cloze, or a '+'-joined mix"] = "train",
                 top_k: Annotated[int, Range(1), "teacher tokens kept per position"] = 32,
                 temperature: Annotated[float, Range(0, low_open=True), "softens the teacher"] = 1.0,
                 ce_weight: Annotated[float, Range(0), "+ this x cross-entropy on the answers"] = 0.0,
                 max_teacher_tokens: Annotated[int, Range(8), "the teacher's context, in tokens"] = 512,
                 teacher_batch_size: Annotated[int, Range(1), "teacher forward passes batched"] = 8,
                 cloze_per_doc: Annotated[int, Range(0), "cloze questions made per document"] = 4,
                 teacher_adapter: Annotated[str, "a LoRA adapter folder for the teacher; empty = none"] = ""):
        super().__init__()
        sources = set(questions.split("+"))
        if not sources or not sources <= QUESTION_SOURCES:
            raise ValueError(f"distill: questions={questions!r}; available: {', '.join(sorted(QUESTION_SOURCES))} "
                             f"or a '+'-joined mix")
        self.sources, self.cloze_per_doc, self.teacher_adapter = sources, int(cloze_per_doc), teacher_adapter
        self.questions, self.top_k, self.temperature = questions, int(top_k), float(temperature)
        self.ce_weight, self.max_teacher_tokens = float(ce_weight), int(max_teacher_tokens)
        self.teacher_batch_size = int(teacher_batch_size)
        self.teacher_passes = 0  # teacher forward passes run so far (all in prepare)
        self._metrics: Dict[str, float] = {}

    # --- prepare: items and the teacher's targets ------------------------------------------
    def prepare(self, context: WriteContext) -> None:
        tok = context.tokenizer
        self.pad = _pad_id(tok)
        eos = tok.eos_token_id
        pairs = []  # (row, question, answer)
        if "train" in self.sources:
            for i, question in enumerate(context.questions):
                rows = list(context.question_rows[i])
                holding = [r for r in rows
                           if any(a.lower() in context.documents[r].text.lower() for a in question.answers)]
                pairs += [(row, question.question, question.answers[0]) for row in holding or rows]
        if "cloze" in self.sources:
            for row, doc in enumerate(context.documents):
                pairs += [(row, q, a) for q, a in cloze_questions(doc.text, self.cloze_per_doc,
                                                                   seed=f"{context.seed}:{doc.doc_id}:{doc.part}")]
        prompts = [context.prompt.replace("{question}", q) for _, q, _ in pairs]
        queries = [ids[-context.max_query_tokens:] for ids in _token_ids(tok, prompts)]
        answers = [ids[:context.max_answer_tokens] + [eos] for ids in _token_ids(tok, [" " + a for _, _, a in pairs])]
        training = None if context.train_rows is None else set(context.train_rows)
        self.items: List[tuple] = [(row, q, a) for (row, _, _), q, a in zip(pairs, queries, answers)
                                   if training is None or row in training]
        self.items_of: Dict[int, List[int]] = {}
        for index, (row, _, _) in enumerate(self.items):
            self.items_of.setdefault(row, []).append(index)
        head = _token_ids(tok, ["Context:"])[0]
        newline = _token_ids(tok, ["\n"])[0]
        self.teacher_inputs = []
        for row, query, _ in self.items:
            budget = max(self.max_teacher_tokens - len(head) - len(newline) - len(query), 0)
            text = list(context.doc_tokens[row])[:budget]
            self.teacher_inputs.append(head + text + newline + query)
        self.targets = self._teacher_targets(context)
        log.info("distill: %d (document, question) pairs over %d documents; teacher targets ready",
                 len(self.items), len(self.items_of))

    def _cache_key(self, context: WriteContext) -> str:
        llm = context.model.llm
        base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
        weights = base.get_input_embeddings().weight
        digest = hashlib.sha256()
        digest.update(json.dumps({"llm": base.config.to_dict(), "top_k": self.top_k, "t": self.temperature},
                                 sort_keys=True, default=str).encode())
        digest.update(weights.detach()[:64].float().cpu().numpy().tobytes())
        if self.teacher_adapter:
            digest.update(sha256_file(_adapter_dir(self.teacher_adapter) / "adapter_model.safetensors").encode())
        for (_, _, answer), teacher in zip(self.items, self.teacher_inputs):
            digest.update(json.dumps([teacher, answer]).encode())
        return digest.hexdigest()[:24]

    def _teacher_targets(self, context: WriteContext) -> List[tuple]:
        path = Path(context.cache_dir) / f"distill-{self._cache_key(context)}.safetensors" \
            if context.cache_dir else None
        if path is not None and path.exists():
            saved = load_file(str(path))
            log.info("distill: teacher targets read from %s", path)
            return [(saved[f"{i}.logp"], saved[f"{i}.ids"]) for i in range(len(self.items))]
        targets = self._run_teacher(context.model)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tensors = {}
            for i, (logp, ids) in enumerate(targets):
                tensors[f"{i}.logp"], tensors[f"{i}.ids"] = logp.contiguous(), ids.contiguous()
            save_file(tensors, str(tmp))
            tmp.replace(path)
        return targets

    @torch.no_grad()
    def _run_teacher(self, model) -> List[tuple]:
        """The frozen LLM (adapters off) reading the text: top-k log-probs per answer token."""
        from tqdm.auto import tqdm

        llm = model.llm
        device = model.doc_vectors.device
        was_training = model.training
        model.eval()
        out: List[tuple] = []
        order = sorted(range(len(self.items)), key=lambda i: len(self.teacher_inputs[i]))
        results: Dict[int, tuple] = {}
        with teacher_weights(llm, self.teacher_adapter):
            for start in tqdm(range(0, len(order), self.teacher_batch_size), desc="distill teacher",
                              disable=not show_progress(), leave=False):
                chunk = order[start:start + self.teacher_batch_size]
                q, qm = pad_sequences([self.teacher_inputs[i] for i in chunk], self.pad, "left")
                a, am = pad_sequences([self.items[i][2] for i in chunk], self.pad, "right")
                logits, labels = model.continuation_logits(None, q.to(device), qm.to(device), a.to(device),
                                                           am.to(device))
                self.teacher_passes += 1
                logp = F.log_softmax(logits.float() / self.temperature, dim=-1)
                top = logp.topk(self.top_k, dim=-1)
                for j, i in enumerate(chunk):
                    n = int(am[j].sum())
                    results[i] = (top.values[j, :n].cpu(), top.indices[j, :n].to(torch.int32).cpu())
        model.train(was_training)
        out = [results[i] for i in range(len(self.items))]
        return out

    # --- training ---------------------------------------------------------------------------
    def forward(self, model, rows: torch.Tensor) -> torch.Tensor:
        chosen = [i for r in rows.tolist() for i in self.items_of.get(r, [])]
        if not chosen:
            self._metrics = {}
            return _zero(model, rows)
        device = rows.device
        item_rows = torch.tensor([self.items[i][0] for i in chosen], dtype=torch.long, device=device)
        q, qm = pad_sequences([self.items[i][1] for i in chosen], self.pad, "left")
        a, am = pad_sequences([self.items[i][2] for i in chosen], self.pad, "right")
        prefix = model.soft_prompts(item_rows[:, None])
        logits, labels = model.continuation_logits(prefix, q.to(device), qm.to(device), a.to(device), am.to(device))
        valid = labels != -100
        student = F.log_softmax(logits[valid].float() / self.temperature, dim=-1)  # [n, V]
        teacher_logp = torch.cat([self.targets[i][0] for i in chosen]).to(device)  # [n, K]
        teacher_ids = torch.cat([self.targets[i][1] for i in chosen]).to(device).long()
        loss = self.temperature ** 2 * topk_kl(teacher_logp, teacher_ids, student)
        if self.ce_weight:
            loss = loss + self.ce_weight * batch_mean(F.cross_entropy(logits[valid].float(), labels[valid],
                                                                      reduction="none"))
        self._metrics = {"answer_acc": float((logits.argmax(-1)[valid] == labels[valid]).float().mean()),
                         "questions": float(len(chosen))}
        return loss

    def last_metrics(self) -> dict:
        return dict(self._metrics)


@contextlib.contextmanager
def teacher_weights(llm, adapter: str):
    """The teacher: the base LLM (adapters off), or with ``adapter`` (a LoRA adapter folder or a pqa
    checkpoint holding one, e.g. a control's trained text reader) in place of the run's own adapter."""
    if not adapter:
        with (llm.disable_adapter() if hasattr(llm, "disable_adapter") else contextlib.nullcontext()):
            yield
        return
    if not hasattr(llm, "load_adapter"):
        raise ValueError("distill: teacher_adapter needs the LLM to have LoRA (model.lora.enabled=true)")
    trainable = {name: p.requires_grad for name, p in llm.named_parameters()}
    active = llm.active_adapter
    llm.load_adapter(str(_adapter_dir(adapter)), adapter_name="distill_teacher")
    try:
        llm.set_adapter("distill_teacher")
        yield
    finally:
        llm.set_adapter(active)
        llm.delete_adapter("distill_teacher")
        for name, p in llm.named_parameters():
            p.requires_grad_(trainable.get(name, False))


def _adapter_dir(path: str) -> Path:
    """``path`` itself when it holds ``adapter_config.json``, else its (checkpoint's) ``adapter/`` folder."""
    folder = adapter_dir(path)
    if folder is None:
        raise ValueError(f"distill: teacher_adapter={str(Path(path).expanduser())!r} holds no LoRA adapter "
                         f"(adapter_config.json)")
    if not (folder / "adapter_model.safetensors").exists():  # a pickled adapter_model.bin is never loaded
        raise ValueError(f"distill: teacher_adapter={str(folder)!r} holds no adapter_model.safetensors")
    return folder


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
_SPAN = re.compile(r"\b(?:\d[\d,.]*\d|\d)\b(?:\s+(?:percent|%|million|billion|years?))?"
                   r"|\b[A-Z][\w'\-]+(?:\s+(?:of|the|and|de|da|von|van)?\s*[A-Z][\w'\-]+)*")


def cloze_questions(text: str, limit: int, seed: str) -> List[tuple]:
    """Up to ``limit`` fill-in-the-blank questions about ``text``: a sentence with one name or number
    (what SQuAD answers mostly are) blanked out, and that span as the answer. Deterministic in ``seed``."""
    candidates = []
    for sentence in _SENTENCE_END.split(text.strip()):
        for match in _SPAN.finditer(sentence):
            span = match.group(0).strip(" .,")
            if match.start() == 0 or len(span) < 2 or len(sentence.split()) < 6:
                continue  # a sentence's first word is capitalised anyway; short sentences say too little
            blanked = sentence[:match.start()] + "____" + sentence[match.start() + len(span):]
            candidates.append((f"Fill in the blank: {blanked.strip()}", span))
    random.Random(seed).shuffle(candidates)
    chosen, seen = [], set()
    for question, answer in candidates:
        if answer not in seen:
            chosen.append((question, answer))
            seen.add(answer)
        if len(chosen) == limit:
            break
    return chosen


def topk_kl(teacher_logp: torch.Tensor, teacher_ids: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per token, averaged, with the teacher known on its top-k tokens only:
    those k tokens plus one bucket for the rest of the mass, on both sides."""
    student_top = student_logp.gather(1, teacher_ids)  # [n, K]
    p = teacher_logp.exp()
    p_rest = (1 - p.sum(1)).clamp(min=1e-8)
    q_rest = (1 - student_top.exp().sum(1)).clamp(min=1e-8)
    kl = (p * (teacher_logp - student_top)).sum(1) + p_rest * (p_rest.log() - q_rest.log())
    return batch_mean(kl)


class Weighted(WriteObjective):
    """``sum(weight * objective)`` over named objectives, each built like a top-level one."""

    def __init__(self, objectives: Optional[dict] = None):
        super().__init__()
        from pqa_core.components import plugins

        objectives = objectives or {"reconstruct": 1.0, "distill": 1.0}
        if not isinstance(objectives, dict) or not objectives:
            raise ValueError(f"weighted: objectives must be a non-empty mapping name -> weight, got {objectives!r}")
        self.weights: Dict[str, float] = {}
        parts = {}
        for name, spec in objectives.items():
            params = dict(spec) if isinstance(spec, dict) else {"weight": spec}
            weight = params.pop("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
                raise ValueError(f"weighted: weight of {name!r} must be a number >= 0, got {weight!r}")
            if name == "weighted":
                raise ValueError("weighted: an objective cannot contain 'weighted'")
            parts[name] = plugins.build("write_objective", name, params)
            self.weights[name] = float(weight)
        self.parts = torch.nn.ModuleDict(parts)
        self._metrics: Dict[str, float] = {}

    def prepare(self, context: WriteContext) -> None:
        for part in self.parts.values():
            part.prepare(context)

    def forward(self, model, rows: torch.Tensor) -> torch.Tensor:
        total = 0.0
        self._metrics = {}
        for name, part in self.parts.items():
            loss = part(model, rows)
            total = total + self.weights[name] * loss
            self._metrics[f"{name}_loss"] = float(loss.detach())
            self._metrics.update({f"{name}_{k}": v for k, v in part.last_metrics().items()})
        return total

    def last_metrics(self) -> dict:
        return dict(self._metrics)


@hookimpl
def pqa_register_write_objectives(register):
    register("reconstruct", Reconstruct)
    register("distill", Distill)
    register("weighted", Weighted)
