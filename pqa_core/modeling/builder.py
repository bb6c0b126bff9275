"""Build a ParametricQA from a PQAConfig: LLM (+ LoRA), components by plugin name, doc-vector init."""
from __future__ import annotations

import logging
from typing import List, Optional

import torch

from pqa_core.components import plugins
from pqa_core.config import PQAConfig, check_choice
from pqa_core.data.loading import Document
from pqa_core.modeling.device import autocast_dtype, resolve_device
from pqa_core.modeling.doc_table import TableStorage, storage_of, table_std
from pqa_core.errors import UsageError
from pqa_core.interfaces import Writer, writer_trains
from pqa_core.modeling.llm import load_llm
from pqa_core.modeling.model import ParametricQA, retrieval_key_dims

log = logging.getLogger(__name__)


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


def enable_gradient_checkpointing(llm) -> None:
    """Training keeps only each layer's input and recomputes the rest in the backward pass (the
    non-reentrant form: soft-prompt embeddings and a frozen base need no input-gradient hooks)."""
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise UsageError(f"model.gradient_checkpointing=true: {type(base).__name__} does not support it")
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # its name from transformers 5 on
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


MINILM_DIMS = 384  # what model.doc_init=minilm fills


def _minilm_d_z(d_model: int, num_tokens: int, **_) -> int:
    return MINILM_DIMS


def _own_needed_d_z(config: PQAConfig):
    """The chosen projection's own ``needed_d_z`` (hybrid, direct: z holds its soft tokens), else None."""
    return getattr(plugins.lookup("projection", config.projection["name"]).factory, "needed_d_z", None)


def _needed_d_z(config: PQAConfig):
    """The chosen projection's ``needed_d_z``; a projection without one (``linear``, ``mlp2x_gelu``, most
    third-party ones) maps a MiniLM-sized z (384 floats)."""
    return _own_needed_d_z(config) or _minilm_d_z


def check_content_init(config: PQAConfig, d_model: Optional[int]) -> None:
    """Pre-flight: ``model.content_init=writer`` (or ``keywords``) needs a projection whose z holds the soft tokens
    (one that sizes z itself, ``needed_d_z``: hybrid, direct) at the size it asks for. So does a writer other
    than the default ``keywords``, named on purpose: with a projection that maps z (linear, mlp2x_gelu) it
    would write nothing in a run (``auto`` leaves z alone) and fail a pretraining's first step."""
    if d_model is None:
        return
    needed = _own_needed_d_z(config)
    holds = needed is not None and config.model.d_z in (0, _sized_z(config, d_model, needed))
    writer = config.writer.get("name", "keywords")
    if writer != "keywords" and not holds:
        raise UsageError(f"writer.name={writer!r} writes each document's soft tokens into z, but projection "
                         f"{config.projection['name']!r} with model.d_z={config.model.d_z} maps z and holds none: "
                         f"use projection.name=hybrid or direct (model.d_z=0)")
    if config.model.content_init not in ("keywords", "writer"):
        return
    if not holds:
        raise UsageError(f"model.content_init={config.model.content_init!r} needs z to hold num_memory_tokens x d_model free floats "
                         f"(projection direct or hybrid, model.d_z=0); projection {config.projection['name']!r} "
                         f"with model.d_z={config.model.d_z} does not: use model.content_init=auto or zero")


def resolve_d_z(config: PQAConfig, d_model: int) -> int:
    """``model.d_z``, or with ``model.d_z=0`` the size the projection needs (``needed_d_z`` of its class:
    ``direct`` and ``hybrid`` hold ``m x d_model`` floats, which depends on the LLM)."""
    if config.model.d_z:
        return int(config.model.d_z)
    return _sized_z(config, d_model, _needed_d_z(config))


def _sized_z(config: PQAConfig, d_model: int, needed) -> int:
    """What ``needed`` (a projection's ``needed_d_z``) asks for with this config's m and parameters."""
    return int(needed(d_model, config.model.num_memory_tokens, **component_kwargs(config.projection)))


def initial_keys(config: PQAConfig, documents: List[Document], embedding_std: float, d_z: int,
                 storage: Optional[TableStorage] = None) -> torch.Tensor:
    """What z (or its retrieval key) starts from: MiniLM embeddings of the text, or Gaussian noise at
    the LLM's embedding scale over all of ``d_z`` (drawn into ``storage``: it is the table)."""
    if check_choice("model.doc_init", config.model.doc_init) == "minilm":
        from pqa_core.modeling.minilm import embed_texts

        return embed_texts([(d.title.replace("_", " ") + ". " + d.text).strip(". ") for d in documents])
    return (storage or TableStorage()).random((len(documents), d_z), embedding_std)


def initial_doc_vectors(config: PQAConfig, keys: torch.Tensor, key_dims: int, d_z: int,
                        storage: Optional[TableStorage] = None) -> torch.Tensor:
    """The doc vector table before training: MiniLM embeddings fill the retrieval key, the rest of z
    (content only the LLM reads, when the projection splits z) starts at zero."""
    if config.model.doc_init == "random":
        return keys
    if keys.shape[1] != key_dims:
        raise UsageError(f"model.doc_init='minilm' needs a {keys.shape[1]}-float retrieval key; "
                         f"got model.d_z={d_z} with projection {config.projection['name']!r} keying on {key_dims}")
    storage = storage or TableStorage()
    table = storage.zeros("doc_vectors", (keys.shape[0], d_z))
    storage.fill_key(table, keys)
    return table


def model_context(config: PQAConfig, llm, tokenizer) -> dict:
    """What the model supplies to a projection's factory (``kinds.MODEL_CONTEXT``); ``input_std`` is the
    embedding std until the doc vectors exist."""
    embedding_std = float(llm.get_input_embeddings().weight.detach().float().std())
    d_model = llm.config.hidden_size if hasattr(llm.config, "hidden_size") else \
        llm.get_input_embeddings().weight.shape[1]
    d_z = resolve_d_z(config, d_model)
    return dict(d_z=d_z, output_dim=d_z, d_model=d_model, num_tokens=config.model.num_memory_tokens, llm=llm,
                vocab_size=len(tokenizer), embedding_std=embedding_std, input_std=embedding_std,
                pad_token_id=tokenizer.pad_token_id, tokenizer=tokenizer,
                keyword_scoring=config.model.keyword_scoring,
                lora_target_modules=list(config.model.lora.target_modules))


def key_context(context: dict, projection) -> dict:
    """The context of the query encoder and the selector: they see only the retrieval key."""
    key_dims = retrieval_key_dims(projection, context["d_z"])
    return {**context, "d_z": key_dims, "output_dim": key_dims}


def content_slice(table_width: int, key_dims: int) -> int:
    """Where the soft-token part of z starts: after the retrieval key, or at 0 for a keyless z."""
    return key_dims if key_dims < table_width else 0


def writes_content(config: PQAConfig, d_z: int, key_dims: int, d_model: int) -> bool:
    """Whether the writer fills z's soft-token part (``model.content_init``): ``writer``/``keywords``
    require room for ``m x d_model`` free floats, ``auto`` uses it where there is room, ``zero`` never."""
    name = config.model.content_init
    if name == "zero":
        return False
    m = config.model.num_memory_tokens
    width = d_z - content_slice(d_z, key_dims)
    if width == m * d_model:
        return True
    if name == "auto":  # a projection that maps z (linear, mlp2x_gelu): nothing to fill
        return False
    raise UsageError(f"model.content_init={name!r} needs z to hold num_memory_tokens x d_model = {m} x "
                     f"{d_model} free floats (projection direct or hybrid, model.d_z=0); this z has {width}")


def write_content(model: ParametricQA, rows, documents: List[Document], tokens, block: int = 4096) -> dict:
    """The writer writes ``rows`` of the table's soft-token part, a block of rows at a time (a large or
    memory-mapped table is never copied whole). Returns what the writer says of its speed."""
    table = model.doc_vectors
    start = content_slice(table.shape[1], model.key_dims)
    rows = list(rows)
    with torch.no_grad():
        for first in range(0, len(rows), block):
            part = rows[first:first + block]
            content = model.writer.write_documents([documents[r].text for r in part], [tokens[r] for r in part])
            table[torch.tensor(part), start:] = content.reshape(len(part), -1).to(table.dtype)
    return dict(getattr(model.writer, "last_write", {}) or {})


def build_model(config: PQAConfig, documents: List[Document], llm_and_tokenizer=None,
                device: Optional[torch.device] = None, table_dir=None, row_tokens=None,
                live_writer: bool = False) -> ParametricQA:
    """Everything seeded from ``config.seed`` so two builds with one seed are identical. ``table_dir``:
    where a memory-mapped table's files go (``model.doc_storage=mmap``). ``row_tokens``: each document's
    LLM token ids, for the writer (tokenized here when not given). With ``model.pretrained``, the reader
    LoRA, the writer and the projection are loaded before the writer writes (``live_writer``: a pretraining
    run, whose writer, if it trains, writes each step's documents itself; one without parameters writes here)."""
    storage = storage_of(config, table_dir)
    torch.manual_seed(config.seed)
    llm, tokenizer = llm_and_tokenizer or load_llm(config.model.llm)
    llm.requires_grad_(False)
    context = model_context(config, llm, tokenizer)
    writer = build_component(config, "writer", context)  # before the LoRA: its layers are the LLM's own
    if config.model.lora.enabled:
        llm = apply_lora(llm, config.model.lora)
        context["llm"] = llm
    if config.model.gradient_checkpointing:
        enable_gradient_checkpointing(llm)
    d_z, embedding_std = context["d_z"], context["embedding_std"]
    keys = initial_keys(config, documents, embedding_std, d_z, storage)
    context["input_std"] = table_std(keys) if keys.numel() > 1 else embedding_std
    projection = build_component(config, "projection", context)
    key_dims = retrieval_key_dims(projection, d_z)
    doc_init = initial_doc_vectors(config, keys, key_dims, d_z, storage)
    keyed = key_context(context, projection)
    query_encoder = build_component(config, "query_encoder", keyed)
    selector = build_component(config, "selector", keyed)
    model = ParametricQA(llm, tokenizer, len(documents), d_z, query_encoder, selector, projection,
                         storage.stored(doc_init), storage=storage, writer=writer)
    device = device or resolve_device(config.model.device)
    model.autocast_dtype = autocast_dtype(config.model.precision, device)
    model = model.to(device)
    if config.model.pretrained:
        from pqa_core.storage.pretrained import load_pretrained

        model.pretrained = load_pretrained(config, model)
    writes = writes_content(config, d_z, key_dims, context["d_model"]) and not (live_writer and writer_trains(writer))
    prepares = type(writer).prepare is not Writer.prepare
    tokens = row_tokens or (_token_lists(tokenizer, documents) if writes or prepares else None)
    if prepares:
        writer.prepare([d.text for d in documents], tokens)
    if writes:
        with model.autocast():
            model.write_info = write_content(model, range(len(documents)), documents, tokens)
    return model


def _token_lists(tokenizer, documents: List[Document]) -> List[List[int]]:
    from pqa_core.data.loading import _token_ids

    return _token_ids(tokenizer, [d.text for d in documents])


def build_losses(config: PQAConfig):
    """(retrieval_loss, generation_loss) modules named in the config."""
    return (build_component(config, "retrieval_loss", {}), build_component(config, "generation_loss", {}))


def check_lora_targets(config: PQAConfig, llm) -> None:
    """Pre-flight: every ``model.lora.target_modules`` entry names a module of the LLM (its stand-in has
    the same module names), as peft matches them (the name, or its last dotted parts)."""
    lora = config.model.lora
    if not lora.enabled:
        return
    names = [name for name, _ in llm.named_modules() if name]
    missing = [t for t in lora.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if not lora.target_modules or missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in llm.named_modules() if isinstance(m, torch.nn.Linear)})
        what = f"{missing} match no module of" if missing else "is empty: LoRA needs modules of"
        raise UsageError(f"config key 'model.lora.target_modules' = {list(lora.target_modules)!r}: {what} "
                         f"model.llm={config.model.llm!r}; its linear layers: {', '.join(linear)}")
