"""The run configuration: plain nested dataclasses built from a nested dict.

Sacred (or a test, or a notebook) hands over a dict such as
``{"model": {"llm": "tiny"}, "selector": {"name": "cosine", "temperature": 0.05}}``;
``PQAConfig.from_dict`` fills defaults and rejects unknown keys with their dotted path.
Component namespaces (selector, query_encoder, ...) are free-form: ``name`` picks the
plugin, the other keys are its keyword arguments, checked against its signature at build time.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .errors import UsageError
from .kinds import KIND


@dataclass
class LoraSettings:
    enabled: bool = True
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class ModelSettings:
    llm: str = "smollm2-135m"
    d_z: int = 384  # 0 = the size the projection needs (direct, hybrid: they hold m x d_model floats)
    num_memory_tokens: int = 4
    doc_init: str = "minilm"  # "minilm" (needs d_z=384) or "random" (scaled to the embedding std)
    content_init: str = "zero"  # the soft-token part of z (hybrid, direct): "zero" or "keywords"
    lora: LoraSettings = field(default_factory=LoraSettings)
    device: str = "auto"


@dataclass
class DataSettings:
    corpus: str = "sample:corpus.jsonl"
    qa: str = "sample:qa_train.jsonl"
    eval_qa: str = "sample:qa_eval.jsonl"
    max_doc_tokens: int = 256  # longer passages are split into several documents (rows) of one passage
    max_query_tokens: int = 64
    max_answer_tokens: int = 24
    prompt: str = "Question: {question}\nAnswer:"


@dataclass
class WriteSettings:
    epochs: int = 30
    batch_size: int = 8
    lr_z: float = 5e-2
    betas_z: List[float] = field(default_factory=lambda: [0.9, 0.999])  # row-wise Adam on z
    lr_projection: float = 3e-2
    lr_lora: float = 1e-3
    train_lora: bool = False
    train_projection: bool = True
    documents: str = "all"  # "new": only the documents init_from's checkpoint did not hold (a grown corpus)
    grad_clip: float = 1.0
    eval_docs: int = 8  # documents decoded greedily each evaluation
    eval_every: int = 1  # epochs between greedy-reconstruction checks (the last epoch always)
    eval_qa_every: int = 0  # epochs between answer evaluations on the eval questions (0 = none; a trained reader)
    checkpoint_every: int = 0  # steps; 0 = only at the end


@dataclass
class ReadSettings:
    epochs: int = 3
    batch_size: int = 8
    lr_z: float = 1e-4
    lr_lora: float = 5e-5
    lr_selector: float = 1e-4
    lr_query_encoder: Optional[float] = None  # None = 0.1 x lr_lora, as the seed notebook
    lr_projection: Optional[float] = None  # None = lr_lora, as the seed notebook
    top_k: int = 3
    retrieval_weight: float = 0.1
    grad_clip: float = 1.0
    weight_decay: float = 0.0  # AdamW decay of every group but z
    checkpoint_every: int = 0
    eval_every: int = 1  # epochs between full evaluations on the eval questions (0 = Recall@k only)


@dataclass
class EvalSettings:
    batch_size: int = 16
    max_new_tokens: int = 24
    top_k: Optional[int] = None  # None = read.top_k
    predictions_file: str = "predictions.jsonl"


def _component(kind: str) -> Dict[str, Any]:
    """A component section: ``name`` (the kind's default, ``kinds.KINDS``) plus keyword arguments
    (the component's own defaults apply)."""
    return field(default_factory=lambda: {"name": KIND[kind].default})


@dataclass
class PQAConfig:
    seed: int = 0
    threads: int = 0  # torch CPU threads; 0 = torch's default
    output_dir: Optional[str] = None  # None = outputs/run (the experiments give each run its own)
    phases: List[str] = field(default_factory=lambda: ["write", "read", "eval"])
    resume: Optional[str] = None  # an earlier run's output folder: continue it where it stopped
    init_from: Optional[str] = None  # a checkpoint folder or run output folder to start the phases from
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    selector: Dict[str, Any] = _component("selector")
    query_encoder: Dict[str, Any] = _component("query_encoder")
    projection: Dict[str, Any] = _component("projection")
    retrieval_loss: Dict[str, Any] = _component("retrieval_loss")
    generation_loss: Dict[str, Any] = _component("generation_loss")
    write_objective: Dict[str, Any] = _component("write_objective")
    control: Dict[str, Any] = _component("control")  # the baseline the "control" phase scores (pqa_core.controls)
    write: WriteSettings = field(default_factory=WriteSettings)
    read: ReadSettings = field(default_factory=ReadSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)

    @classmethod
    def from_dict(cls, values: Optional[Dict[str, Any]] = None) -> "PQAConfig":
        return _fill(cls, values or {}, prefix="")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def eval_top_k(self) -> int:
        return self.eval.top_k or self.read.top_k


COMPONENT_SECTIONS = tuple(KIND)


def _fill(cls, values: Dict[str, Any], prefix: str):
    if not isinstance(values, dict):
        raise UsageError(f"config key {prefix.rstrip('.') or '(root)'!r} must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        path = prefix + key
        if key not in fields:
            raise UsageError(f"unknown config key {path!r}; known keys under "
                             f"{prefix.rstrip('.') or 'the root'}: {', '.join(sorted(fields))}")
        ftype = fields[key].type
        default = fields[key].default_factory() if fields[key].default_factory is not dataclasses.MISSING \
            else fields[key].default
        if dataclasses.is_dataclass(default):
            kwargs[key] = _fill(type(default), value, path + ".")
        elif key in COMPONENT_SECTIONS:
            if not isinstance(value, dict) or not isinstance(value.get("name", default["name"]), str):
                raise UsageError(f"config key {path!r} must be a mapping with a string 'name'")
            kwargs[key] = {**default, **value}
        else:
            kwargs[key] = _coerce(value, default, path, ftype)
    return cls(**kwargs)


def _coerce(value, default, path, ftype):
    """Type-check a leaf against its default's type (ints accepted for floats)."""
    if value is None:
        if default is None or "Optional" in str(ftype):
            return None
        raise UsageError(f"config key {path!r} may not be null")
    if isinstance(default, bool) or "bool" == str(ftype):
        if not isinstance(value, bool):
            raise UsageError(f"config key {path!r} must be true/false, got {value!r}")
        return value
    expected = type(default) if default is not None else None
    if expected is None:
        text = str(ftype)
        expected = int if "int" in text else float if "float" in text else str if "str" in text else None
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is not None and expected is not list and not isinstance(value, expected):
        raise UsageError(f"config key {path!r} must be {expected.__name__}, got {value!r}")
    if isinstance(default, list) and not isinstance(value, (list, tuple)):
        raise UsageError(f"config key {path!r} must be a list, got {value!r}")
    return list(value) if isinstance(value, tuple) else value
