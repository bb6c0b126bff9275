"""Built-in writers: how a document's soft tokens (the content part of z) are first made from its text.

- ``keywords``: the input embeddings of the passage's most salient words (``pqa_core.modeling.keywords``);
  nothing to train.
- ``sentences``: the input embeddings of the passage's most salient sentences, cut to m tokens: readable
  text (extractive compression); nothing to train.
- ``encoder``: ICAE/PISCO-style. The LLM's first ``layers`` transformer layers, with a LoRA of the
  writer's own, read the passage followed by m learned memory slots; the slots' last hidden states,
  through a small map (LayerNorm + Linear), are the m soft tokens. One batched forward pass writes
  N documents. Its layers are a frozen copy of the LLM's, so the reader's LoRA never touches them and
  only the writer's LoRA, slots and map are its parameters (what a checkpoint or artifact holds).
  ``layers`` trades quality for speed: the whole 135M LLM costs about 69 GFLOP per 256-token passage;
  ``precision=bf16`` writes (no gradient) under bfloat16 autocast, about 1.8x the documents per second
  of float32 on a CPU with native bfloat16 (bench/RESULTS.md (k)).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from typing import List, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pqa_core.hookspecs import hookimpl
from pqa_core.interfaces import Writer

log = logging.getLogger(__name__)


class KeywordsWriter(Writer):
    """The passage's ``num_tokens`` most salient words (tf-idf over the corpus, names and numbers first:
    ``scoring``), as the LLM's input embeddings, in text order; zero where fewer."""

    name, unit = "keywords", "words"  # unit: what is selected (pqa_core.modeling.keywords.SELECTIONS)

    def __init__(self, llm, tokenizer, num_tokens: int, keyword_scoring: str = "tfidf_names"):
        super().__init__()
        from pqa_core.modeling.keywords import SCORINGS

        if keyword_scoring not in SCORINGS:
            raise ValueError(f"{self.name} writer: scoring {keyword_scoring!r}; available: {', '.join(SCORINGS)}")
        self._llm = [llm]  # referenced, not owned: its weights are not the writer's
        self.tokenizer, self.num_tokens, self.scoring = tokenizer, int(num_tokens), keyword_scoring
        self.frequencies = None  # the corpus's word counts (prepare); else those of the passages written together

    def prepare(self, texts: Sequence[str], token_ids: Sequence[Sequence[int]]) -> None:
        """The corpus's idf: a passage's words are the same whichever block of rows it is written in."""
        from pqa_core.modeling.keywords import document_frequencies

        self.frequencies = document_frequencies(texts)

    def write_documents(self, texts: Sequence[str], token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        from pqa_core.modeling.keywords import salient_embeddings

        weight = self._llm[0].get_input_embeddings().weight.detach().float().cpu()
        return salient_embeddings(texts, self.tokenizer, weight, self.num_tokens, self.scoring, self.frequencies,
                                  unit=self.unit)


class SentencesWriter(KeywordsWriter):
    """The passage's most salient sentences (``salient_sentence_ids``: tf-idf over the corpus of their words
    per token, ``scoring``), cut to ``num_tokens`` tokens, as the LLM's input embeddings, in text order; zero where
    shorter. Readable text where ``keywords`` gives a bag of words: the extractive-compression start a
    learned writer should beat at the same number of soft tokens."""

    name, unit = "sentences", "sentences"


class LoraLinear(nn.Module):
    """``base(x) + (alpha / r) * B(A(x))`` around a frozen ``nn.Linear`` it does not own (the base is
    kept out of the module tree, so only A and B are the writer's parameters)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        object.__setattr__(self, "base", base)
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scale = alpha / r

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scale

    def _apply(self, fn, *args, **kwargs):
        self.base._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)


def truncated_decoder(llm, layers: int):
    """A frozen copy of the LLM's decoder (no LM head) with its first ``layers`` layers; the input
    embeddings stay the LLM's own (shared, not copied)."""
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    decoder = base.get_decoder()
    embeddings = decoder.embed_tokens
    config = copy.deepcopy(decoder.config)
    layers = min(int(layers), int(config.num_hidden_layers))
    config.num_hidden_layers = layers
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:layers]
    kept = {}
    for key, value in decoder.state_dict().items():  # a LoRA-wrapped LLM's base weights, under their own names
        if "lora_" in key or key.startswith("embed_tokens.") or (
                key.startswith("layers.") and int(key.split(".")[1]) >= layers):
            continue
        kept[key.replace(".base_layer.", ".")] = value
    with torch.device("meta"):  # no memory: the kept weights are the LLM's own tensors, shared
        copy_ = type(decoder)(config)
    copy_.load_state_dict(kept, strict=False, assign=True)
    copy_.embed_tokens = embeddings
    copy_.requires_grad_(False)
    rotary = getattr(copy_, "rotary_emb", None)
    if rotary is not None:  # its buffers were built on the meta device: rebuild them for real
        copy_.rotary_emb = type(rotary)(config=config).to(embeddings.weight.device)
    left = [name for name, t in list(copy_.named_parameters()) + list(copy_.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"encoder writer: cannot copy the first layers of {type(decoder).__name__} "
                         f"(not filled: {', '.join(left[:3])})")
    return copy_, layers


ANCHORS = {"keywords": KeywordsWriter.unit, "sentences": SentencesWriter.unit, "none": None}
"""The encoder's ``anchor`` -> the unit its slots start from: that writer's (``pqa_core.modeling.keywords.SELECTIONS``)."""


class EncoderWriter(Writer):
    """The LLM's first ``layers`` layers with a LoRA (``lora_r``, ``lora_alpha``, on ``lora_target_modules``)
    read ``[passage][m memory slots]``; the slots' last hidden states -> LayerNorm -> Linear = the soft tokens.
    ``max_tokens``: the passage tokens read (the first ones). ``batch_size``: documents per forward pass
    when writing. ``precision``: what writing (``write_documents``, no gradient) computes in: ``model``
    follows ``model.precision``, ``bf16`` is bfloat16 autocast, ``fp32`` float32; a training step always
    follows ``model.precision``.

    ``anchor=keywords`` (default): slot j starts as the passage's j-th salient word (the ``keywords``
    writer's tokens, idf over the run's corpus) and the soft token is that word's embedding plus the map
    of the slot's hidden state, the map starting at zero: the writer starts exactly where ``keywords``
    is and learns only what it adds. ``anchor=sentences``: the same from the ``sentences`` writer's tokens
    (a passage's most salient sentences, cut to m tokens), whose m = 64 hold the answer of 56% of bench
    (a)'s held-out questions: the slots also read the rest of the passage. Measured why anchors: slots
    that start as shared noise (``anchor=none``) learned one prefix for every passage (reconstruction
    with another passage's tokens was as good, bench/RESULTS.md (l))."""

    trainable = True

    def __init__(self, llm, d_model: int, num_tokens: int, embedding_std: float, pad_token_id: int,
                 lora_target_modules: Optional[List[str]] = None, layers: int = 4, lora_r: int = 8,
                 lora_alpha: float = 16.0, max_tokens: int = 256, batch_size: int = 16,
                 anchor: Literal["keywords", "sentences", "none"] = "keywords", tokenizer=None,
                 keyword_scoring: str = "tfidf_names", precision: Literal["model", "bf16", "fp32"] = "model"):
        super().__init__()
        if layers < 1 or lora_r < 1 or max_tokens < 1 or batch_size < 1 or not lora_alpha > 0:
            raise ValueError(f"encoder writer: layers, lora_r, max_tokens, batch_size must be >= 1 and lora_alpha "
                             f"> 0; got {layers}, {lora_r}, {max_tokens}, {batch_size}, {lora_alpha}")
        if anchor not in ANCHORS or (anchor != "none" and tokenizer is None):
            raise ValueError(f"encoder writer: anchor must be keywords or sentences (both need the LLM's tokenizer) "
                             f"or none, got {anchor!r}")
        self.anchor, self.tokenizer, self.scoring, self.precision = anchor, tokenizer, keyword_scoring, precision
        self.frequencies = None  # the corpus's word counts (prepare); else those of the passages written together
        self.d_model, self.num_tokens, self.pad_token_id = int(d_model), int(num_tokens), int(pad_token_id or 0)
        self.max_tokens, self.batch_size, self.lora_r = int(max_tokens), int(batch_size), int(lora_r)
        decoder, self.layers = truncated_decoder(llm, layers)
        targets = set(lora_target_modules or ["q_proj", "k_proj", "v_proj", "o_proj"])
        adapters = []
        for name, module in list(decoder.named_modules()):
            if name.startswith("layers.") and name.rsplit(".", 1)[-1] in targets and isinstance(module, nn.Linear):
                parent = decoder.get_submodule(name.rsplit(".", 1)[0])
                adapter = LoraLinear(module, int(lora_r), float(lora_alpha))
                setattr(parent, name.rsplit(".", 1)[-1], adapter)
                adapters.append(adapter)
        if not adapters:
            raise ValueError(f"encoder writer: no linear layer named {sorted(targets)} in the LLM's first layers")
        object.__setattr__(self, "decoder", decoder)  # frozen and rebuilt from the LLM: not the writer's state
        self.adapters = nn.ModuleList(adapters)
        anchored = anchor != "none"
        self.memory = nn.Parameter(torch.zeros(self.num_tokens, self.d_model) if anchored
                                   else torch.randn(self.num_tokens, self.d_model) * float(embedding_std))
        self.norm = nn.LayerNorm(self.d_model, elementwise_affine=False)
        self.map = nn.Linear(self.d_model, self.d_model)
        nn.init.normal_(self.map.weight, std=0.0 if anchored else float(embedding_std) / math.sqrt(self.d_model))
        nn.init.zeros_(self.map.bias)

    def prepare(self, texts: Sequence[str], token_ids: Sequence[Sequence[int]]) -> None:
        """The corpus's word counts: a passage's salient words are chosen with the corpus's idf, whether
        it is written with the others or alone inside a training step."""
        from pqa_core.modeling.keywords import document_frequencies

        if self.anchor != "none":
            self.frequencies = document_frequencies(texts)

    def anchors(self, rows: Sequence[Sequence[int]], device) -> torch.Tensor:
        """``[B, m, d_model]``: each passage's salient words' (or sentences') input embeddings in text order
        (zero where fewer), or zeros without an anchor. No gradient: the embeddings are the LLM's."""
        if self.anchor == "none":
            return torch.zeros(len(rows), self.num_tokens, self.d_model, device=device)
        from pqa_core.modeling.keywords import salient_embeddings

        texts = [self.tokenizer.decode(list(row)) for row in rows]
        return salient_embeddings(texts, self.tokenizer, self.decoder.embed_tokens.weight, self.num_tokens,
                                  self.scoring, self.frequencies, unit=ANCHORS[self.anchor]).to(device)

    def _apply(self, fn, *args, **kwargs):
        self.decoder._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def forward(self, token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """``B`` token lists -> ``[B, m, d_model]``, with gradient to the LoRA, the slots and the map."""
        device = self.memory.device
        rows = [list(ids)[:self.max_tokens] for ids in token_ids]
        width = max([len(r) for r in rows] + [1])
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):  # left-padded: the slots follow each passage's last token
            if row:
                ids[i, width - len(row):] = torch.tensor(row)
                mask[i, width - len(row):] = 1
        ids, mask = ids.to(device), mask.to(device)
        embeds = self.decoder.embed_tokens(ids)
        anchors = self.anchors(rows, device)
        slots = (anchors + self.memory).to(embeds.dtype)
        inputs = torch.cat([embeds, slots], dim=1)
        mask = torch.cat([mask, torch.ones(len(rows), self.num_tokens, dtype=mask.dtype, device=device)], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = self.decoder(inputs_embeds=inputs, attention_mask=mask, position_ids=positions,
                              use_cache=False).last_hidden_state[:, -self.num_tokens:]
        return anchors + self.map(self.norm(hidden.float()))

    @torch.no_grad()
    def write_documents(self, texts: Sequence[str], token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """All documents, ``batch_size`` per forward pass (longest first, so a batch pads little)."""
        order = sorted(range(len(token_ids)), key=lambda i: -min(len(token_ids[i]), self.max_tokens))
        out = torch.zeros(len(token_ids), self.num_tokens, self.d_model)
        was_training = self.training
        self.eval()
        start = time.perf_counter()
        with self._write_precision():
            for first in tqdm(range(0, len(order), self.batch_size), desc="writing documents", leave=False,
                              disable=len(order) <= self.batch_size):
                batch = order[first:first + self.batch_size]
                out[batch] = self([token_ids[i] for i in batch]).float().cpu()
        self.train(was_training)
        seconds = time.perf_counter() - start
        self.last_write = {"documents": len(order), "seconds": round(seconds, 3),
                           "documents_per_second": round(len(order) / seconds, 2) if seconds > 0 else None}
        log.info("encoder writer: %d documents in %.1f s (%.1f per second, %d layers)", len(order), seconds,
                 len(order) / max(seconds, 1e-9), self.layers)
        return out

    def _write_precision(self):
        """``precision``'s autocast for writing; ``model``: whatever the caller (the model's autocast) set."""
        if self.precision == "model":
            return contextlib.nullcontext()
        device = self.memory.device.type
        if self.precision == "fp32":
            return torch.autocast(device_type=device, enabled=False)
        return torch.autocast(device_type=device, dtype=torch.bfloat16)

    def extra_repr(self) -> str:
        return (f"layers={self.layers}, num_tokens={self.num_tokens}, lora_r={self.lora_r}, anchor={self.anchor}, "
                f"precision={self.precision}")


@hookimpl
def pqa_register_writers(register):
    register("keywords", KeywordsWriter)
    register("sentences", SentencesWriter)
    register("encoder", EncoderWriter)
