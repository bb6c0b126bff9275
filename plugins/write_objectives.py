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

import hashlib
import json
import logging
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from pqa_core.data import _pad_id, _token_ids, pad_sequences
from pqa_core.hookspecs import hookimpl
from pqa_core.interfaces import WriteContext, WriteObjective
from pqa_core.training import show_progress

log = logging.getLogger(__name__)


def _zero(model, rows: torch.Tensor) -> torch.Tensor:
    """A zero loss still connected to the rows' z (a batch with nothing to learn)."""
    return model.doc_latents(rows).sum() * 0.0


class Reconstruct(WriteObjective):
    """Token cross-entropy of the document's text (then eos) given its soft prompt alone."""

    def prepare(self, context: WriteContext) -> None:
        eos = context.tokenizer.eos_token_id
        self.targets = [list(ids) + [eos] for ids in context.doc_tokens]
        self.pad = _pad_id(context.tokenizer)
        self._metrics: Dict[str, float] = {}

    def forward(self, model, rows: torch.Tensor) -> torch.Tensor:
        ids, mask = pad_sequences([self.targets[r] for r in rows.tolist()], self.pad, "right")
        ids, mask = ids.to(rows.device), mask.to(rows.device)
        prefix = model.soft_prompts(rows[:, None])
        logits, labels = model.continuation_logits(prefix, ids[:, :0], mask[:, :0], ids, mask)
        valid = labels != -100
        loss = F.cross_entropy(logits[valid].float(), labels[valid])
        self._metrics = {"token_acc": float((logits.argmax(-1)[valid] == labels[valid]).float().mean())}
        return loss

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

    def __init__(self, questions: str = "train", top_k: int = 32, temperature: float = 1.0,
                 ce_weight: float = 0.0, max_teacher_tokens: int = 512, teacher_batch_size: int = 8):
        super().__init__()
        if questions != "train":
            raise ValueError(f"distill: questions={questions!r}; available: 'train'")
        if top_k < 1 or not temperature > 0 or max_teacher_tokens < 8:
            raise ValueError(f"distill: need top_k >= 1, temperature > 0, max_teacher_tokens >= 8; got "
                             f"{top_k}, {temperature}, {max_teacher_tokens}")
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
        prompts = [context.prompt.replace("{question}", q.question) for q in context.questions]
        queries = [ids[-context.max_query_tokens:] for ids in _token_ids(tok, prompts)]
        answers = [ids[:context.max_answer_tokens] + [eos]
                   for ids in _token_ids(tok, [" " + q.answers[0] for q in context.questions])]
        self.items: List[tuple] = []  # (row, query ids, answer ids)
        for i, question in enumerate(context.questions):
            rows = list(context.question_rows[i])
            holding = [r for r in rows if any(a.lower() in context.documents[r].text.lower() for a in question.answers)]
            for row in holding or rows:
                self.items.append((row, queries[i], answers[i]))
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
        adapter_off = llm.disable_adapter() if hasattr(llm, "disable_adapter") else _Nothing()
        with adapter_off:
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
            loss = loss + self.ce_weight * F.cross_entropy(logits[valid].float(), labels[valid])
        self._metrics = {"answer_acc": float((logits.argmax(-1)[valid] == labels[valid]).float().mean()),
                         "questions": float(len(chosen))}
        return loss

    def last_metrics(self) -> dict:
        return dict(self._metrics)


def topk_kl(teacher_logp: torch.Tensor, teacher_ids: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per token, averaged, with the teacher known on its top-k tokens only:
    those k tokens plus one bucket for the rest of the mass, on both sides."""
    student_top = student_logp.gather(1, teacher_ids)  # [n, K]
    p = teacher_logp.exp()
    p_rest = (1 - p.sum(1)).clamp(min=1e-8)
    q_rest = (1 - student_top.exp().sum(1)).clamp(min=1e-8)
    kl = (p * (teacher_logp - student_top)).sum(1) + p_rest * (p_rest.log() - q_rest.log())
    return kl.mean()


class Weighted(WriteObjective):
    """``sum(weight * objective)`` over named objectives, each built like a top-level one."""

    def __init__(self, objectives: Optional[dict] = None):
        super().__init__()
        from pqa_core import plugins

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
            self._metrics[f"{name}_loss"] = float(loss)
            self._metrics.update({f"{name}_{k}": v for k, v in part.last_metrics().items()})
        return total

    def last_metrics(self) -> dict:
        return dict(self._metrics)


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@hookimpl
def pqa_register_write_objectives(register):
    register("reconstruct", Reconstruct)
    register("distill", Distill)
    register("weighted", Weighted)
