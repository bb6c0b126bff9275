"""Built-in query encoders: question token ids + mask ``[B, T]`` -> query vectors ``[B, output_dim]``.

Frozen pretrained parts (the LLM's input embeddings, MiniLM) are kept *outside*
the module tree: they are not parameters of the encoder, so they are not
trained, not counted twice in the model's ``state_dict`` and not saved in its
checkpoint. Only the small heads (and the whole of ``transformer``) train.
"""
from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from pqa_core.hookspecs import hookimpl
from pqa_core.interfaces import QueryEncoder, Range
from pqa_core.modeling.minilm import MINILM_DIM, load_minilm, mean_pool


class LLMMeanEncoder(QueryEncoder):
    """Mean of the LLM's (frozen) input embeddings over the question tokens, then a trainable
    ``Linear(d_model, output_dim)``. Reads the LLM's token ids (no own tokenizer).

    The LLM is referenced, not owned: its embedding table is looked up at every
    call (so resized or edited embeddings are seen) and is never a parameter of
    this encoder.
    """

    def __init__(self, llm: nn.Module, d_model: int, output_dim: int):
        super().__init__()
        object.__setattr__(self, "_llm", llm)  # not a submodule: no duplicate weights in state_dict
        self.output_dim = int(output_dim)
        self.head = nn.Linear(d_model, self.output_dim)

    @property
    def llm(self) -> nn.Module:
        return self._llm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        embedding = self._llm.get_input_embeddings()
        with torch.no_grad():
            hidden = embedding(input_ids)
        pooled = mean_pool(hidden.to(self.head.weight.dtype), attention_mask)
        return self.head(pooled)


class MiniLMEncoder(QueryEncoder):
    """Frozen all-MiniLM-L6-v2 sentence embedding (mean pool, L2-normalised unless ``normalize=False``),
    then a trainable ``Linear(384, output_dim)`` that starts as the identity when ``output_dim == 384``.

    Sets ``tokenizer`` to MiniLM's, so the data collator tokenizes questions with it.
    MiniLM itself sits outside the module tree (not trained, not saved); ``.to()``
    and dtype casts of the encoder are forwarded to it.
    """

    def __init__(self, output_dim: int, normalize: bool = True):
        super().__init__()
        model, tokenizer = load_minilm()
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        object.__setattr__(self, "_minilm", model)  # frozen, excluded from parameters() and state_dict()
        self.tokenizer = tokenizer
        self.output_dim = int(output_dim)
        self.normalize = bool(normalize)
        self.head = nn.Linear(MINILM_DIM, self.output_dim)
        if self.output_dim == MINILM_DIM:
            with torch.no_grad():
                self.head.weight.copy_(torch.eye(MINILM_DIM))
                self.head.bias.zero_()

    @property
    def minilm(self) -> nn.Module:
        return self._minilm

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._minilm._apply(fn, recurse)  # keep the frozen encoder on the head's device/dtype
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            hidden = self._minilm(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            pooled = mean_pool(hidden, attention_mask)
            if self.normalize:
                pooled = F.normalize(pooled, dim=-1)
        return self.head(pooled.to(self.head.weight.dtype))


class TransformerEncoder(QueryEncoder):
    """A small trainable Transformer over its own token + position embeddings (LLM token ids),
    masked mean pool, ``Linear(dim, output_dim)``."""

    def __init__(self, vocab_size: int, output_dim: int, layers: Annotated[int, Range(1), "Transformer layers"] = 2,
                 dim: Annotated[int, Range(1), "width (a multiple of heads)"] = 128,
                 heads: Annotated[int, Range(1), "attention heads"] = 4,
                 dropout: Annotated[float, Range(0, 1, high_open=True), "dropout"] = 0.1,
                 max_positions: Annotated[int, Range(1), "question tokens read"] = 512):
        super().__init__()
        if dim % heads:
            raise ValueError(f"transformer query encoder: dim ({dim}) must be divisible by heads ({heads})")
        self.output_dim = int(output_dim)
        self.max_positions = int(max_positions)
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.position_embedding = nn.Embedding(self.max_positions, dim)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.02)
        layer = nn.TransformerEncoderLayer(d_model=dim, nhead=heads, dim_feedforward=4 * dim, dropout=dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=layers, norm=nn.LayerNorm(dim),
                                             enable_nested_tensor=False)
        self.head = nn.Linear(dim, self.output_dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        if length > self.max_positions:
            raise ValueError(f"transformer query encoder: sequence length {length} exceeds "
                             f"max_positions={self.max_positions}")
        positions = torch.arange(length, device=input_ids.device)
        x = self.token_embedding(input_ids) + self.position_embedding(positions)
        mask = attention_mask.bool()
        padding = ~mask
        padding[:, 0] &= mask.any(dim=1)  # an all-padding row attends to position 0 instead of giving NaN
        x = self.encoder(x, src_key_padding_mask=padding)
        return self.head(mean_pool(x, mask))


@hookimpl
def pqa_register_query_encoders(register):
    register("llm_mean", LLMMeanEncoder)
    register("minilm", MiniLMEncoder)
    register("transformer", TransformerEncoder)
