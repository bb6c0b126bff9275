"""The run configuration: plain nested dataclasses built from a nested dict, every value checked.

Sacred (or a test, or a notebook) hands over a dict such as
``{"model": {"llm": "tiny"}, "selector": {"name": "cosine", "temperature": 0.05}}``;
``PQAConfig.from_dict`` fills defaults and rejects, in one line naming the dotted key, unknown
keys, values of the wrong type (a boolean is not a number) and numbers outside their range
(``RANGES``, one entry per numeric key, beside the dataclasses so a new key gets its range where it
is declared). What depends on the data or the LLM (``top_k`` against the number of documents, the
memory tokens against the LLM's context and memory) is ``check_fits``. Component namespaces
(selector, query_encoder, ...) are free-form: ``name`` picks the plugin, the other keys are its
keyword arguments, checked against its signature at build time.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from pqa_core.errors import UsageError
from pqa_core.modeling.keywords import SCORINGS as KEYWORD_SCORINGS
from pqa_core.components.kinds import KIND
from pqa_core.storage.run_files import OUTPUT_NAME_KEYS, check_output_name


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
    d_z: int = 0  # 0 = the size the projection needs (hybrid, direct: m x d_model floats, + the key; others 384)
    num_memory_tokens: int = 32
    doc_init: str = "minilm"  # "minilm" (needs d_z=384) or "random" (scaled to the embedding std)
    # the soft-token part of z: "keywords" (the passage's rarest words' embeddings; hybrid, direct), "zero",
    # "auto" (keywords where z holds m x d_model free floats, else zero)
    content_init: str = "auto"
    # which words the keywords are (pqa_core.modeling.keywords): "tfidf_names" (frequent here, rare elsewhere,
    # names and numbers first), "idf" (the rarest)
    keyword_scoring: str = "tfidf_names"
    lora: LoraSettings = field(default_factory=LoraSettings)
    device: str = "auto"
    precision: str = "auto"  # auto: bfloat16 autocast on a CUDA GPU that has it, else float32; bf16; fp32
    # how doc_vectors (and the row-wise optimizer's moments of it) are stored: "float32", or "bfloat16"
    # (half the memory; rows are updated in float32 and stored by stochastic rounding), in "memory" or
    # "mmap" (files under the output folder, mapped: a table larger than the RAM; pqa_core.modeling.doc_table)
    doc_dtype: str = "float32"
    doc_storage: str = "memory"


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
    epochs: int = 3
    batch_size: int = 8
    lr_z: float = 1e-2  # Cramming's (2502.13063) lr and betas for memory vectors
    betas_z: List[float] = field(default_factory=lambda: [0.9, 0.9])  # row-wise Adam on z
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
    epochs: int = 2
    batch_size: int = 8
    lr_z: float = 1e-2
    lr_lora: float = 3e-4
    lr_selector: float = 1e-4
    lr_query_encoder: Optional[float] = None  # None = 0.1 x lr_lora, as the seed notebook
    lr_projection: Optional[float] = None  # None = lr_lora, as the seed notebook
    top_k: int = 3
    retrieval_weight: float = 0.1
    grad_clip: float = 1.0
    weight_decay: float = 0.0  # AdamW decay of every group but z
    checkpoint_every: int = 0
    eval_every: int = 1  # epochs between full evaluations on the eval questions (0 = Recall@k only)
    # whose retrieval keys the retrieval loss moves: "all" (every key, through the softmax over all
    # documents: a step costs O(N x d_z)) or "batch" (the batch's gold and selected documents only: a
    # step's cost and the rows it moves do not grow with the corpus; for large corpora)
    key_updates: str = "all"


@dataclass
class FaissSettings:
    """The faiss indexes' knobs (``eval.index=faiss_ivf`` / ``faiss_hnsw``; pqa_core.modeling.selection_index)."""
    nlist: int = 0  # IVF lists; 0 = 4 x sqrt(N) as a power of two
    nprobe: int = 32  # IVF lists searched per query
    hnsw_m: int = 32  # HNSW graph degree
    ef_construction: int = 80
    ef_search: int = 128


@dataclass
class EvalSettings:
    batch_size: int = 16
    max_new_tokens: int = 24
    top_k: Optional[int] = None  # None = read.top_k
    predictions_file: str = "predictions.jsonl"
    index: str = "exact"  # top-k search at evaluation: exact, faiss_flat, faiss_ivf, faiss_hnsw
    faiss: FaissSettings = field(default_factory=FaissSettings)


@dataclass(frozen=True)
class Range:
    """The numbers a key allows: ``low``..``high`` (None: unbounded), ``low`` itself excluded with
    ``low_open``, ``high`` with ``high_open``. Floats must also be finite."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False

    def allows(self, value) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or (value < self.high or (not self.high_open and value == self.high))

    def describe(self, kind: str) -> str:
        """``an integer >= 1``, ``a finite number > 0``, ``a finite number in [0, 1)``."""
        what = "an integer" if kind == "int" else "a finite number"
        if self.low is not None and self.high is not None:
            return (f"{what} in {'(' if self.low_open else '['}{_num(self.low)}, "
                    f"{_num(self.high)}{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{what} {'>' if self.low_open else '>='} {_num(self.low)}"
        if self.high is not None:
            return f"{what} {'<' if self.high_open else '<='} {_num(self.high)}"
        return what


def _num(x) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


COUNT = Range(1)  # a positive integer: epochs, batch sizes, tokens, top_k
SOME = Range(0)  # zero or more: 0 turns the thing off (checkpoint_every, eval_every, eval_docs)
RATE = Range(0, low_open=True)  # a finite positive number: learning rates, gradient clipping
WEIGHT = Range(0)  # a finite number >= 0

# Every numeric config key and the values it allows (tests check that none is missing).
RANGES: Dict[str, Range] = {
    "seed": Range(0, 2 ** 32 - 1),  # numpy's seed range
    "threads": Range(0, 1024),
    "model.d_z": Range(0, 1 << 20),  # 0: the projection sizes z
    "model.num_memory_tokens": COUNT,  # and check_fits: the LLM's context and memory
    "model.lora.r": COUNT,
    "model.lora.alpha": RATE,
    "model.lora.dropout": Range(0, 1, high_open=True),
    "data.max_doc_tokens": COUNT,
    "data.max_query_tokens": COUNT,
    "data.max_answer_tokens": COUNT,
    "write.epochs": COUNT,
    "write.batch_size": COUNT,
    "write.lr_z": RATE,
    "write.lr_projection": RATE,
    "write.lr_lora": RATE,
    "write.grad_clip": RATE,
    "write.eval_docs": SOME,
    "write.eval_every": SOME,
    "write.eval_qa_every": SOME,
    "write.checkpoint_every": SOME,
    "read.epochs": COUNT,
    "read.batch_size": COUNT,
    "read.lr_z": RATE,
    "read.lr_lora": RATE,
    "read.lr_selector": RATE,
    "read.lr_query_encoder": RATE,
    "read.lr_projection": RATE,
    "read.top_k": COUNT,  # and check_fits: at most the number of documents
    "read.retrieval_weight": WEIGHT,
    "read.grad_clip": RATE,
    "read.weight_decay": WEIGHT,
    "read.checkpoint_every": SOME,
    "read.eval_every": SOME,
    "eval.batch_size": COUNT,
    "eval.max_new_tokens": COUNT,
    "eval.top_k": COUNT,  # and check_fits
    "eval.faiss.nlist": SOME,  # 0: 4 x sqrt(N)
    "eval.faiss.nprobe": COUNT,
    "eval.faiss.hnsw_m": COUNT,
    "eval.faiss.ef_construction": COUNT,
    "eval.faiss.ef_search": COUNT,
}

# List keys of numbers: their length and the range of every element.
LIST_RANGES: Dict[str, tuple] = {
    "write.betas_z": (2, Range(0, 1, high_open=True)),  # Adam's betas: a beta >= 1 makes z NaN
}

# String keys that take one of a few values.
CHOICES: Dict[str, tuple] = {
    "model.doc_init": ("minilm", "random"),
    "model.content_init": ("auto", "keywords", "zero"),
    "model.keyword_scoring": tuple(KEYWORD_SCORINGS),
    "write.documents": ("all", "new"),
}

PHASES = ("write", "read", "eval", "control_read", "control")
DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


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
    force_resume: bool = False  # resume although its checkpoints were made under another fingerprint (recorded)
    init_from: Optional[str] = None  # a checkpoint folder or run output folder to start the phases from
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    selector: Dict[str, Any] = _component("selector")
    query_encoder: Dict[str, Any] = _component("query_encoder")
    projection: Dict[str, Any] = _component("projection")
    retrieval_loss: Dict[str, Any] = _component("retrieval_loss")
    generation_loss: Dict[str, Any] = _component("generation_loss")
    write_objective: Dict[str, Any] = _component("write_objective")
    control: Dict[str, Any] = _component("control")  # the baseline the "control" phase scores (pqa_core.training.controls)
    write: WriteSettings = field(default_factory=WriteSettings)
    read: ReadSettings = field(default_factory=ReadSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)

    @classmethod
    def from_dict(cls, values: Optional[Dict[str, Any]] = None) -> "PQAConfig":
        config = _fill(cls, values or {}, prefix="")
        config.validate()
        return config

    def validate(self) -> None:
        """What a type and a range cannot show: known phases, a prompt with its question, a device of a known kind."""
        for phase in self.phases:
            if phase not in PHASES:
                raise UsageError(f"config key 'phases': unknown phase {phase!r}; phases: {', '.join(PHASES)}")
        if "{question}" not in self.data.prompt:
            raise UsageError(f"config key 'data.prompt' = {self.data.prompt!r}: must contain {{question}}, "
                             "where the question goes")
        if not DEVICE_RE.match(self.model.device):
            raise UsageError(f"config key 'model.device' = {self.model.device!r}: must be auto, cpu, cuda, cuda:N or mps")
        for key in OUTPUT_NAME_KEYS:  # outputs the config names stay in the run's folder
            section, name = key.split(".")
            check_output_name(key, getattr(getattr(self, section), name))

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
    """Type-check a leaf against its default's type (ints accepted for floats, booleans never for
    numbers), then against its range (``RANGES``) or choices (``CHOICES``)."""
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
    if expected in (int, float) and isinstance(value, bool):
        raise UsageError(f"config key {path!r} = {value!r}: must be {_describe(path, expected)}, not a boolean")
    if expected is float and isinstance(value, int):
        value = float(value)
    if expected is not None and expected is not list and not isinstance(value, expected):
        what = _describe(path, expected) if expected in (int, float) else expected.__name__
        raise UsageError(f"config key {path!r} must be {what}, got {value!r}")
    if isinstance(default, list) and not isinstance(value, (list, tuple)):
        raise UsageError(f"config key {path!r} must be a list, got {value!r}")
    if path in LIST_RANGES:
        _check_list(path, value)
    if expected in (int, float):
        allowed = RANGES.get(path, Range())
        if not allowed.allows(value):
            raise UsageError(f"config key {path!r} = {value!r}: must be {_describe(path, expected)}")
    if path in CHOICES and value not in CHOICES[path]:
        raise UsageError(f"config key {path!r} = {value!r}: must be one of {', '.join(CHOICES[path])}")
    return list(value) if isinstance(value, tuple) else value


def _check_list(path: str, value) -> None:
    """A list of numbers of ``LIST_RANGES[path]``'s length, every element in its range."""
    length, allowed = LIST_RANGES[path]
    if len(value) != length:
        raise UsageError(f"config key {path!r} = {list(value)!r}: must be a list of {length} numbers, "
                         f"got {len(value)}")
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, (int, float)) or not allowed.allows(item):
            raise UsageError(f"config key {path!r} = {list(value)!r}: element {i} ({item!r}) must be "
                             f"{allowed.describe('float')}")


def _describe(path: str, expected: type) -> str:
    return RANGES.get(path, Range()).describe("int" if expected is int else "float")


def check_fits(config: "PQAConfig", num_docs: int, corpus: str, llm_shape: Optional[tuple] = None) -> None:
    """Ranges that depend on the data and the LLM, checked before a run exists: ``top_k`` at most the
    number of documents; ``model.num_memory_tokens`` (m) small enough that ``top_k`` soft prompts
    plus the question and answer fit the LLM's context (``llm_shape`` = (d_model, context length),
    when known), and that a float per dimension of every document's soft prompt, with two
    optimizer states, fits in memory; ``model.device`` available."""
    for path, value in (("read.top_k", config.read.top_k), ("eval.top_k", config.eval.top_k)):
        if value is not None and value > num_docs:
            raise UsageError(f"config key {path!r} = {value}: must be an integer in [1, {num_docs}] "
                             f"(the number of documents in {corpus})")
    m, k = config.model.num_memory_tokens, config.eval_top_k
    if llm_shape is not None:
        d_model, context = llm_shape
        data = config.data
        limits = [((context - data.max_query_tokens - data.max_answer_tokens - PROMPT_TOKENS) // max(k, 1),
                   f"{k} soft prompts of m tokens (top_k), the question and the answer must fit "
                   f"{config.model.llm}'s {context}-token context"),
                  (context - data.max_doc_tokens - 1, f"m tokens and a {data.max_doc_tokens}-token document "
                   f"must fit {config.model.llm}'s {context}-token context"),
                  (memory_bytes() // (FLOAT_COPIES * 4 * d_model * max(num_docs, 1)),
                   f"{num_docs} documents x m x {d_model} floats, {FLOAT_COPIES} copies, must fit in memory")]
        high, why = min(limits, key=lambda limit: limit[0])
        if m > high:
            raise UsageError(f"config key 'model.num_memory_tokens' = {m}: must be an integer in [1, {max(high, 0)}] "
                             f"({why})")
    check_device(config.model.device)


PROMPT_TOKENS = 16  # the prompt's own words around the question
FLOAT_COPIES = 3  # a trained soft prompt, and Adam's two moments


def memory_bytes() -> int:
    """Physical memory of this machine (the bound on m is a sanity check, not an allocation plan)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 1 << 40


def check_device(name: str) -> None:
    """``model.device`` must exist on this machine (``auto`` always does)."""
    if name in ("auto", "cpu"):
        return
    import torch

    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= count:
            have = f"{count} CUDA device{'s' if count != 1 else ''}" if count else "no CUDA device"
            raise UsageError(f"config key 'model.device' = {name!r}: this machine has {have}; use auto or cpu")
    elif name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError(f"config key 'model.device' = {name!r}: MPS is not available here; use auto or cpu")

