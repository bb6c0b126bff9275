"""The component kinds, in one table.

Everything that lists the kinds is derived from ``KINDS``: the plugin hooks and built-in modules
(``plugins``), the config sections and their default components (``config``), the parameters the
model supplies to a factory (``contract``, ``builder``), what pre-flight builds and probes, the
Sacred config's component defaults and the parts a checkpoint holds. Adding a kind is one row here,
its interface in ``interfaces``, its hook in ``hookspecs`` and its built-ins in ``plugins/``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from pqa_core import interfaces

MODEL_CONTEXT = ("d_z", "output_dim", "d_model", "num_tokens", "llm", "vocab_size", "embedding_std",
                 "input_std", "pad_token_id")
"""Values the model supplies to the factories of model components that declare a parameter so named."""

WRITER_CONTEXT = MODEL_CONTEXT + ("tokenizer", "keyword_scoring", "lora_target_modules")
"""A writer also gets the LLM's tokenizer, ``model.keyword_scoring`` and the LoRA's target modules."""

CONTEXT_DOCS = {
    "d_z": "size of the vectors the component reads: all of z for a projection; the retrieval key (the "
           "projection's `key_dims`, else all of z) for a query encoder and a selector",
    "output_dim": "size of the query vectors a query encoder returns (= the selector's `d_z`)",
    "d_model": "the LLM's hidden size (its input embedding width)",
    "num_tokens": "soft tokens per document, m (`model.num_memory_tokens`)",
    "llm": "the LLM itself (with LoRA when enabled): reference it, do not own it (see `llm_mean`)",
    "vocab_size": "the LLM tokenizer's vocabulary size",
    "embedding_std": "std of the LLM's input embedding weights (the scale soft tokens should have)",
    "input_std": "std of the initial doc vectors z (MiniLM or random init)",
    "pad_token_id": "the LLM tokenizer's pad token id",
    "tokenizer": "the LLM's tokenizer (writers only)",
    "keyword_scoring": "`model.keyword_scoring`: which words are a passage's keywords, and so its salient sentences "
                       "(writers only)",
    "lora_target_modules": "`model.lora.target_modules`: the module names a LoRA adapts (writers only)",
}
"""What each ``MODEL_CONTEXT`` parameter means (the README's table of them; a test keeps the two equal)."""


@dataclass(frozen=True)
class Kind:
    """One kind of component a config chooses by name (``<name>.name=...``)."""

    name: str  # config section, and the kind's name in messages
    interface: type  # the contract its components implement (pqa_core.interfaces)
    hook: str  # the hook that registers its components (pqa_core.hookspecs)
    builtins: str  # module of the built-in components
    default: str  # the component a config picks unless told otherwise
    context: Tuple[str, ...] = ()  # model-supplied parameters its factories may declare
    model_attribute: Optional[str] = None  # where ParametricQA holds it (its tensors are in checkpoints)
    phases: Optional[Tuple[str, ...]] = None  # the run phases that build it (None: every run builds it)


KINDS: Tuple[Kind, ...] = (
    Kind("selector", interfaces.Selector, "pqa_register_selectors", "pqa_plugins.selectors", "cosine",
         MODEL_CONTEXT, "selector"),
    Kind("query_encoder", interfaces.QueryEncoder, "pqa_register_query_encoders", "pqa_plugins.query_encoders",
         "minilm", MODEL_CONTEXT, "query_encoder"),
    Kind("projection", interfaces.Projection, "pqa_register_projections", "pqa_plugins.projections",
         "hybrid", MODEL_CONTEXT, "z_to_embedding"),
    Kind("writer", interfaces.Writer, "pqa_register_writers", "pqa_plugins.writers", "keywords",
         WRITER_CONTEXT, "writer"),
    Kind("retrieval_loss", interfaces.RetrievalLoss, "pqa_register_retrieval_losses",
         "pqa_plugins.retrieval_losses", "gold_nll"),
    Kind("generation_loss", interfaces.GenerationLoss, "pqa_register_generation_losses",
         "pqa_plugins.generation_losses", "ce"),
    Kind("write_objective", interfaces.WriteObjective, "pqa_register_write_objectives",
         "pqa_plugins.write_objectives", "reconstruct", phases=("write",)),
    Kind("control", interfaces.Control, "pqa_register_controls", "pqa_plugins.controls", "bm25",
         phases=("control_read", "control")),
)

KIND: Dict[str, Kind] = {kind.name: kind for kind in KINDS}
"""Kind by config section name."""

COMPONENT_KINDS: Dict[str, type] = {kind.name: kind.interface for kind in KINDS}
"""Config section -> interface class."""

MODEL_KINDS: Tuple[Kind, ...] = tuple(kind for kind in KINDS if kind.model_attribute)
"""The kinds that are parts of the model (trained, saved in its checkpoints)."""


def kinds_for(phases) -> Tuple[Kind, ...]:
    """The kinds a run of ``phases`` builds (the model and the losses are built for every phase)."""
    return tuple(kind for kind in KINDS if kind.phases is None or set(kind.phases) & set(phases))
