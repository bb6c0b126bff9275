"""Build a ParametricQA from a PQAConfig: LLM (+ LoRA), components by plugin name, doc-vector init."""
from __future__ import annotations

import logging
from typing import List, Optional

import torch

from . import plugins
from .config import PQAConfig
from .data import Document
from .errors import UsageError
from .llm import load_llm
from .model import ParametricQA

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def component_kwargs(section: dict) -> dict:
    return {k: v for k, v in section.items() if k != "name"}


def build_component(config: PQAConfig, kind: str, context: dict):
    section = getattr(config, kind)
    return plugins.build(kind, section["name"], component_kwargs(section), context)


def apply_lora(llm, lora_settings):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=lora_settings.r, lora_alpha=lora_settings.alpha, lora_dropout=lora_settings.dropout,
                      target_modules=list(lora_settings.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(llm, lora)


def initial_doc_vectors(config: PQAConfig, documents: List[Document], embedding_std: float) -> torch.Tensor:
    """Doc vectors before training: MiniLM embeddings of the text, or Gaussian at the LLM's embedding scale."""
    d_z = config.model.d_z
    if config.model.doc_init == "minilm":
        from .minilm import MINILM_DIM, embed_texts

        if d_z != MINILM_DIM:
            raise UsageError(f"model.doc_init='minilm' needs model.d_z={MINILM_DIM}, got {d_z}")
        return embed_texts([(d.title.replace("_", " ") + ". " + d.text).strip(". ") for d in documents])
    if config.model.doc_init == "random":
        return torch.randn(len(documents), d_z) * embedding_std
    raise UsageError(f"model.doc_init must be 'minilm' or 'random', got {config.model.doc_init!r}")


def build_model(config: PQAConfig, documents: List[Document], llm_and_tokenizer=None,
                device: Optional[torch.device] = None) -> ParametricQA:
    """Everything seeded from ``config.seed`` so two builds with one seed are identical."""
    torch.manual_seed(config.seed)
    llm, tokenizer = llm_and_tokenizer or load_llm(config.model.llm)
    llm.requires_grad_(False)
    if config.model.lora.enabled:
        llm = apply_lora(llm, config.model.lora)
    embedding_std = float(llm.get_input_embeddings().weight.detach().float().std())
    d_z = config.model.d_z
    context = dict(d_z=d_z, output_dim=d_z, d_model=llm.config.hidden_size if hasattr(llm.config, "hidden_size")
                   else llm.get_input_embeddings().weight.shape[1],
                   num_tokens=config.model.num_memory_tokens, llm=llm, vocab_size=len(tokenizer),
                   embedding_std=embedding_std, pad_token_id=tokenizer.pad_token_id)
    doc_init = initial_doc_vectors(config, documents, embedding_std)
    context["input_std"] = float(doc_init.std()) if doc_init.numel() > 1 else embedding_std
    query_encoder = build_component(config, "query_encoder", context)
    selector = build_component(config, "selector", context)
    projection = build_component(config, "projection", context)
    model = ParametricQA(llm, tokenizer, len(documents), d_z, query_encoder, selector, projection, doc_init)
    return model.to(device or resolve_device(config.model.device))


def build_losses(config: PQAConfig):
    """(retrieval_loss, generation_loss) modules named in the config."""
    return (build_component(config, "retrieval_loss", {}), build_component(config, "generation_loss", {}))
