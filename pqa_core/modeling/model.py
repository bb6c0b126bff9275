"""ParametricQA: documents as rows of ``doc_vectors``, read by a causal LM through soft prompts.

Sequence layout (one row):  [k*m soft tokens][left-padded question][right-padded answer].
Padding sits between the soft tokens and the question; the attention mask hides it and
``position_ids`` (cumsum of the mask) keep positions contiguous, so a batched row computes
exactly what the same example computes alone.
"""
from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from pqa_core.interfaces import Projection, QueryEncoder, Selector
from pqa_core.modeling.device import autocast
from pqa_core.modeling.doc_table import TableStorage
from pqa_core.modeling.selection_index import ExactIndex, SelectionIndex, block_scores, document_side_is_constant


@lru_cache(maxsize=None)
def _cache_argument(model_class) -> str:
    """transformers 5 renamed ``past_key_values`` to ``cache``; use whichever this version takes."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _returned_cache(output):
    return output.cache if "cache" in output.keys() else output.past_key_values


def nats_per_row(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[B]``: each row's mean token cross-entropy (nats per token) over its labelled positions, for
    ``continuation_logits``' aligned logits and labels."""
    nll = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return nll.sum(1) / (labels != -100).sum(1).clamp(min=1)


def retrieval_key_dims(projection: Projection, d_z: int) -> int:
    """How many leading coordinates of z the selector scores: the projection's ``key_dims``, else all of z."""
    return int(getattr(projection, "key_dims", None) or d_z)


class ParametricQA(nn.Module):
    def __init__(self, llm: nn.Module, tokenizer, num_docs: int, d_z: int, query_encoder: QueryEncoder,
                 selector: Selector, projection: Projection, doc_init: Optional[torch.Tensor] = None,
                 storage: Optional[TableStorage] = None, writer: Optional[nn.Module] = None):
        super().__init__()
        self.llm = llm
        self.tokenizer = tokenizer
        self.query_encoder = query_encoder
        self.selector = selector
        self.z_to_embedding = projection
        self.writer = writer if writer is not None else nn.Module()  # a checkpoint part (kinds: writer)
        # pretraining: the soft-token part of z is the writer's reading of each row's tokens, made at
        # every step with gradient (``row_tokens`` the rows' LLM token ids), not the table's
        self.live_writer = False
        self.row_tokens = None
        self.written = None  # within a pretraining step: row -> what the writer wrote of it (with gradient)
        if doc_init is None:
            doc_init = torch.randn(num_docs, d_z) * self.embedding_std()
        if tuple(doc_init.shape) != (num_docs, d_z):
            raise ValueError(f"doc_init has shape {tuple(doc_init.shape)}, expected {(num_docs, d_z)}")
        # ``doc_init`` is the table itself (float32 or bfloat16, in memory or mapped from a file): not
        # copied; what reads it computes in float32. ``storage`` allocates the optimizer's moments of it.
        self.doc_vectors = nn.Parameter(doc_init if storage is not None else doc_init.clone().float())
        self.table_storage = storage or TableStorage()
        self.autocast_dtype: Optional[torch.dtype] = None  # model.precision (pqa_core.modeling.device); the builder sets it
        self.key_dims = retrieval_key_dims(projection, d_z)
        if not 0 < self.key_dims <= d_z:
            raise ValueError(f"projection key_dims={self.key_dims} must be in 1..d_z={d_z}")

    # --- helpers -------------------------------------------------------------------------
    def autocast(self):
        """The precision forward passes run in (``model.precision``): bfloat16 autocast, or float32."""
        return autocast(self.doc_vectors.device, self.autocast_dtype)

    @property
    def num_docs(self) -> int:
        return self.doc_vectors.shape[0]

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    def embedding_std(self) -> float:
        return float(self.llm.get_input_embeddings().weight.detach().float().std())

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm.get_input_embeddings()(ids)

    def doc_latents(self, doc_indices: torch.Tensor) -> torch.Tensor:
        """Rows of ``doc_vectors`` by index. The lookup's gradient is sparse (only these rows), so a
        training step's cost and the rows it moves do not depend on the size of the table."""
        return F.embedding(doc_indices, self.doc_vectors, sparse=self.doc_vectors.requires_grad).float()

    def soft_prompts(self, doc_indices: torch.Tensor) -> torch.Tensor:
        """``doc_indices [B, k]`` -> soft prompt ``[B, k*m, d_model]`` (documents in rank order)."""
        z = self.doc_latents(doc_indices)  # [B, k, d_z]
        if self.live_writer:
            z = self.written_latents(doc_indices, z)
        emb = self.z_to_embedding(z)  # [B, k, m, d_model]
        return emb.reshape(emb.shape[0], -1, emb.shape[-1])

    def written_latents(self, doc_indices: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """z with its soft-token part replaced by what the writer makes of the rows' tokens now."""
        start = self.key_dims if self.key_dims < z.shape[-1] else 0
        flat = doc_indices.reshape(-1).tolist()
        memo = self.written if self.written is not None else {}  # a step writes each row once
        todo = sorted({r for r in flat if r not in memo})
        if todo:
            memo.update(zip(todo, self.writer([self.row_tokens[r] for r in todo]).unbind(0)))
        content = torch.stack([memo[r] for r in flat]).to(z.dtype).reshape(*doc_indices.shape, -1)
        return torch.cat([z[..., :start], content], dim=-1) if start else content

    @staticmethod
    def assemble(prefix: Optional[torch.Tensor], parts, masks):
        """Concatenate soft prefix and embedded token parts; mask and contiguous position ids."""
        embeds = [p for p in parts]
        mask = list(masks)
        if prefix is not None:
            embeds.insert(0, prefix)
            mask.insert(0, torch.ones(prefix.shape[:2], dtype=masks[0].dtype, device=prefix.device))
        inputs_embeds = torch.cat(embeds, dim=1)
        attention_mask = torch.cat(mask, dim=1)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return inputs_embeds, attention_mask, position_ids

    # --- selection -------------------------------------------------------------------------
    def retrieval_keys(self) -> torch.Tensor:
        """What the selector scores: all of z, or its first ``key_dims`` coordinates (a view: gradients flow),
        in float32 (a bfloat16 table's keys are converted: the scoring's own size, N x key_dims)."""
        keys = self.doc_vectors if self.key_dims == self.doc_vectors.shape[1] else self.doc_vectors[:, :self.key_dims]
        return keys.float()

    def score_documents(self, query_ids: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
        query_vectors = self.query_encoder(query_ids, query_mask)
        return self.selector(query_vectors, self.retrieval_keys())

    def select_documents(self, query_ids: torch.Tensor, query_mask: torch.Tensor, k: int,
                         key_rows: Optional[torch.Tensor] = None,
                         move_keys: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        """Top-k doc ids ``[B, k]`` (best first) and all scores ``[B, N]`` (differentiable).

        With ``key_rows`` (doc rows, -1 = none) the scores' gradient reaches the retrieval keys of those
        rows and of the selected ones only, through a sparse lookup; every other key is scored as a
        constant. The scores, the selection and the gradient to the query side and the selector are
        those of the full scoring; what the keys receive, and so the rows a step moves, is the batch's.
        ``move_keys=False``: every key is scored as a constant (the scores' gradient reaches the query side
        and the selector only).
        """
        if move_keys and (key_rows is None or not self.doc_vectors.requires_grad or not torch.is_grad_enabled()):
            scores = self.score_documents(query_ids, query_mask)
            return scores.topk(min(k, scores.shape[-1]), dim=-1).indices, scores
        query_vectors = self.query_encoder(query_ids, query_mask)
        if document_side_is_constant(self.selector):  # every key scored a block at a time, as a constant
            table, key_dims, selector = self.doc_vectors, self.key_dims, self.selector
            scores = block_scores(selector.embed_queries(query_vectors),
                                  lambda a, b: selector.embed_documents(table[a:b, :key_dims].float()), self.num_docs)
        else:
            scores = self.selector(query_vectors, self.retrieval_keys().detach())
        selected = scores.topk(min(k, scores.shape[-1]), dim=-1).indices
        if not move_keys:
            return selected, scores
        rows = torch.cat([key_rows.flatten(), selected.flatten()])
        rows = rows[(rows >= 0) & (rows < self.num_docs)].unique()  # a bad gold row is the loss's error to report
        keys = self.doc_latents(rows)[:, :self.key_dims]  # sparse gradient: these rows only
        return selected, scores.index_copy(1, rows, self.selector(query_vectors, keys))

    @torch.no_grad()
    def top_documents(self, query_ids: torch.Tensor, query_mask: torch.Tensor, k: int,
                      index: Optional[SelectionIndex] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Top-k doc ids ``[B, k]`` and their scores ``[B, k]``, best first, for evaluation and inference:
        searched by ``index`` (exact by default), without the ``[B, N]`` score matrix."""
        query_vectors = self.query_encoder(query_ids, query_mask)
        scores, rows = (index or ExactIndex()).search(self.selector, self.retrieval_keys, query_vectors, k,
                                                      source=self.doc_vectors)
        return rows, scores

    # --- teacher-forced logits ---------------------------------------------------------------
    def continuation_logits(self, prefix: Optional[torch.Tensor], context_ids: torch.Tensor,
                            context_mask: torch.Tensor, target_ids: torch.Tensor, target_mask: torch.Tensor,
                            llm: Optional[nn.Module] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[B, T, V]`` aligned with labels ``[B, T]`` for the right-padded targets."""
        if prefix is None and context_ids.shape[1] == 0:  # the first target token would have no predictor
            raise ValueError("continuation_logits: nothing precedes the target; give it a context (a start token)")
        llm = llm or self.llm
        embed = llm.get_input_embeddings()  # a teacher's own (its adapter may have changed them)
        inputs_embeds, attention_mask, position_ids = self.assemble(
            prefix, [embed(context_ids), embed(target_ids)], [context_mask, target_mask])
        T = target_ids.shape[1]
        out = llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                  use_cache=False, logits_to_keep=T + 1)
        logits = out.logits[:, :T]
        labels = target_ids.masked_fill(target_mask == 0, -100)
        return logits, labels

    def answer_logits(self, query_ids, doc_indices, answer_ids, query_attention_mask, answer_attention_mask):
        prefix = self.soft_prompts(doc_indices) if doc_indices is not None else None
        return self.continuation_logits(prefix, query_ids, query_attention_mask, answer_ids, answer_attention_mask)

    def forward(self, query_ids, doc_indices, answer_ids, query_attention_mask, answer_attention_mask):
        """Token cross-entropy of the answer given the selected documents' soft prompts and the question."""
        logits, labels = self.answer_logits(query_ids, doc_indices, answer_ids,
                                            query_attention_mask, answer_attention_mask)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)

    # --- generation --------------------------------------------------------------------------
    @torch.no_grad()
    def generate_from(self, prefix: Optional[torch.Tensor], query_ids: torch.Tensor,
                      query_attention_mask: torch.Tensor, max_new_tokens: int = 32) -> torch.Tensor:
        """Batched greedy decoding with the KV cache; rows finished at EOS are padded. ``[B, <=max_new]``."""
        inputs_embeds, attention_mask, position_ids = self.assemble(
            prefix, [self.embed_tokens(query_ids)], [query_attention_mask])
        B = inputs_embeds.shape[0]
        out = self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=True, logits_to_keep=1)
        past = _returned_cache(out)
        base = self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm
        cache_arg = _cache_argument(type(base))
        finished = torch.zeros(B, dtype=torch.bool, device=inputs_embeds.device)
        generated = []
        next_pos = position_ids[:, -1:] + 1
        for _ in range(max_new_tokens):
            next_token = out.logits[:, -1].argmax(-1)
            next_token = next_token.masked_fill(finished, self.pad_token_id)
            generated.append(next_token)
            finished |= next_token == self.eos_token_id
            if bool(finished.all()) or len(generated) == max_new_tokens:
                break
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
            out = self.llm(input_ids=next_token[:, None], attention_mask=attention_mask, position_ids=next_pos,
                           use_cache=True, **{cache_arg: past})
            past = _returned_cache(out)
            next_pos = next_pos + 1
        if not generated:
            return torch.zeros(B, 0, dtype=torch.long, device=inputs_embeds.device)
        return torch.stack(generated, dim=1)

    def generate(self, query_ids, doc_indices, query_attention_mask, max_new_tokens: int):
        """Answer tokens for a batch of questions, reading the given documents' soft prompts."""
        prefix = self.soft_prompts(doc_indices) if doc_indices is not None else None
        return self.generate_from(prefix, query_ids, query_attention_mask, max_new_tokens)

    # --- parameters by role -------------------------------------------------------------------
    def lora_parameters(self):
        return [p for n, p in self.llm.named_parameters() if "lora_" in n and p.requires_grad]
