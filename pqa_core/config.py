"""The run configuration: plain nested dataclasses built from a nested dict, every value checked.

Each key is declared once, on its dataclass field (``setting``): its type (the annotation), default,
range (numbers) or choices (strings) and a one-line help. Everything that checks, prints or
documents a key reads that field: ``KEYS`` (every key, ``pqa config``), ``RANGES`` and ``CHOICES``
are derived from it, and the modules that act on a string key take its choices from ``CHOICES``.

Sacred (or a test, or a notebook) hands over a dict such as
``{"model": {"llm": "tiny"}, "selector": {"name": "cosine", "temperature": 0.05}}``;
``PQAConfig.from_dict`` fills defaults and rejects, in one line naming the dotted key, unknown
keys (suggesting the nearest), values of the wrong type (a boolean is not a number), numbers
outside their range and strings outside their choices. What depends on the data or the LLM
(``top_k`` against the number of documents, the memory tokens against the LLM's context and memory)
is ``check_fits``. Component namespaces (selector, query_encoder, ...) are free-form: ``name`` picks
the plugin, the other keys are its keyword arguments, checked against its declared parameters.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from pqa_core.errors import UsageError
from pqa_core.modeling.keywords import SCORINGS as KEYWORD_SCORINGS
from pqa_core.components.kinds import KIND
from pqa_core.components.parameters import Range
from pqa_core.interfaces import DEFAULT_PROMPT
from pqa_core.storage.run_files import OUTPUT_NAME_KEYS, check_output_name

COUNT = Range(1)  # a positive integer: epochs, batch sizes, tokens, top_k
SOME = Range(0)  # zero or more: 0 turns the thing off (checkpoint_every, eval_every, eval_docs)
RATE = Range(0, low_open=True)  # a finite positive number: learning rates, gradient clipping
WEIGHT = Range(0)  # a finite number >= 0


def setting(default: Any = dataclasses.MISSING, help: str = "", *, range: Optional[Range] = None,
            choices: Optional[typing.Iterable[str]] = None, factory: Any = dataclasses.MISSING,
            length: Optional[int] = None):
    """A config key's one declaration: ``default`` (or ``factory`` for a list), ``help`` (one line, what
    ``pqa config`` prints), ``range`` for a number or every number of a list, ``choices`` for a string,
    ``length`` for a list of numbers."""
    metadata: Dict[str, Any] = {"help": help}
    if length is not None:
        metadata["length"] = length
    if range is not None:
        metadata["range"] = range
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class LoraSettings:
    """``model.lora``: the reader's LoRA on the LLM."""
    enabled: bool = setting(True, "train a LoRA on the LLM (the reader)")
    r: int = setting(8, "LoRA rank", range=COUNT)
    alpha: int = setting(16, "LoRA scale numerator (scale = alpha / r)", range=RATE)
    dropout: float = setting(0.0, "LoRA dropout", range=Range(0, 1, high_open=True))
    target_modules: List[str] = setting(help="the LLM's module names the LoRA adapts",
                                        factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class ModelSettings:
    """``model``: the LLM, the doc vectors z and how they start, where and how precisely the run computes."""
    llm: str = setting("smollm2-135m", "the LLM: a known name (tiny, smollm2-135m, ...), a Hub id or a folder")
    d_z: int = setting(0, "doc-vector size; 0 = the size the projection needs (hybrid, direct: m x d_model "
                          "floats + the key; others 384)", range=Range(0, 1 << 20))
    num_memory_tokens: int = setting(32, "soft tokens per document, m (also bounded by the LLM's context and "
                                         "memory)", range=COUNT)
    doc_init: str = setting("minilm", "doc-vector init: minilm (MiniLM embeddings, into the retrieval key) or "
                                      "random (scaled to the embedding std)", choices=("minilm", "random"))
    content_init: str = setting("auto", "the soft-token part of z: writer (the writer section's component writes "
                                        "it), keywords (its older name), zero, auto (the writer where z holds "
                                        "m x d_model free floats, else zero)",
                                choices=("auto", "writer", "keywords", "zero"))
    pretrained: Optional[str] = setting(None, "a pretrained artifact (pqa run pretrain's output folder, a run, "
                                              "shipped:NAME, auto): the reader LoRA, writer and projection start "
                                              "from it")
    pretrained_slots: str = setting("exact", "exact: model.pretrained must have been made with this m; first: an "
                                             "artifact made with more soft tokens per document starts a run with "
                                             "fewer, keeping what belongs to its first m soft tokens (the "
                                             "encoder's first m memory slots, a projection's first m output "
                                             "blocks); the encoder's anchors are the run's own m tokens; any: "
                                             "as first, and a larger m too where the artifact holds nothing per "
                                             "soft token (a reader of extractive tokens: only its LoRA)",
                                    choices=("exact", "first", "any"))
    keyword_scoring: str = setting("tfidf_names", "which words are a passage's keywords (and so its salient "
                                                  "sentences): tfidf_names (frequent here, rare elsewhere, names "
                                                  "and numbers first), idf (the rarest)",
                                   choices=KEYWORD_SCORINGS)
    lora: LoraSettings = setting(help="the reader's LoRA", factory=LoraSettings)
    device: str = setting("auto", "where the run computes: auto, cpu, cuda, cuda:N, mps")
    precision: str = setting("auto", "auto: bfloat16 autocast on a CUDA GPU that has it, else float32; bf16; fp32",
                             choices=("auto", "bf16", "fp32"))
    doc_dtype: str = setting("float32", "how the doc table and its optimizer moments are stored: float32, or "
                                        "bfloat16 (half the memory; updated in float32, stochastic rounding)",
                             choices=("float32", "bfloat16"))
    doc_storage: str = setting("memory", "where the doc table lives: memory, or mmap (files under the output "
                                         "folder: a table larger than the RAM)", choices=("memory", "mmap"))
    gradient_checkpointing: bool = setting(False, "recompute each LLM layer's activations in the backward pass "
                                                  "instead of keeping them: about a third more compute for a "
                                                  "fraction of the memory (a reader of long text prompts)")


@dataclass
class DataSettings:
    """``data``: the files (JSONL, or ``sample:NAME``, the shipped sample) and how much of each text is read."""
    corpus: str = setting("sample:corpus.jsonl", "the documents: a JSONL file (doc_id, text) or sample:NAME")
    qa: str = setting("sample:qa_train.jsonl", "training questions: a JSONL file (question, answer, doc_ids)")
    eval_qa: str = setting("sample:qa_eval.jsonl", "evaluation questions, as data.qa")
    max_doc_tokens: int = setting(256, "longer passages are split into several documents (rows) of one passage",
                                  range=COUNT)
    max_query_tokens: int = setting(64, "a question's tokens kept", range=COUNT)
    max_answer_tokens: int = setting(24, "an answer's tokens trained on", range=COUNT)
    prompt: str = setting(DEFAULT_PROMPT, "the prompt around a question (must hold {question})")


@dataclass
class PretrainSettings:
    """``pqa run pretrain``: the reusable parts learn their jobs on a disjoint corpus (data.corpus, data.qa)."""
    reader: str = setting("pqa", "what is pretrained: pqa (reader LoRA, writer and projection together), text "
                                 "(a reader of passage text) or closed_book (a reader of nothing)",
                          choices=("pqa", "text", "closed_book"))
    epochs: int = setting(1, "pretraining epochs", range=COUNT)
    batch_size: int = setting(8, "questions per step", range=COUNT)
    lr_lora: float = setting(3e-4, "learning rate of the reader LoRA", range=RATE)
    lr_writer: float = setting(1e-3, "learning rate of the writer", range=RATE)
    lr_projection: float = setting(1e-3, "learning rate of the projection", range=RATE)
    top_k: int = setting(3, "passages the reader reads per question (the gold one among them when retrieved)",
                         range=COUNT)
    reconstruct_weight: float = setting(0.5, "+ this x reconstruction of the gold passages from their soft "
                                             "tokens (ICAE)", range=WEIGHT)
    reconstruct_tokens: int = setting(64, "the first tokens of each gold passage reconstructed", range=COUNT)
    contrast_weight: float = setting(1.0, "+ this x a margin loss that each gold passage is likelier after its own "
                                          "soft tokens than after another passage's (the reconstruct objective's "
                                          "contrast_weight); 0 = off", range=WEIGHT)
    contrast_margin: float = setting(1.0, "nats per token the own soft tokens should beat another passage's by",
                                     range=WEIGHT)
    reconstruct_only_steps: int = setting(0, "the first steps train by reconstruction alone (ICAE's order: the "
                                             "writer learns to carry the passage before it answers questions)",
                                          range=SOME)
    grad_clip: float = setting(1.0, "gradient norm clipping", range=RATE)
    checkpoint_every: int = setting(50, "steps between resumable checkpoints; 0 = only at the end", range=SOME)
    max_steps: int = setting(0, "> 0: stop after this many steps in all (a budget); 0: every step of the epochs",
                             range=SOME)


@dataclass
class WriteSettings:
    """``write``: the write phase trains z (row-wise) and the projection so that the soft tokens hold
    their documents (the write objective, ``write_objective.name``)."""
    epochs: int = setting(3, "write-phase epochs; 0: z stays as the writer wrote it", range=SOME)
    batch_size: int = setting(8, "documents per step", range=COUNT)
    lr_z: float = setting(1e-2, "learning rate of z (Cramming's, 2502.13063)", range=RATE)
    betas_z: List[float] = setting(help="the row-wise Adam's betas on z (a beta >= 1 makes z NaN)",
                                   factory=lambda: [0.9, 0.9], length=2, range=Range(0, 1, high_open=True))
    lr_projection: float = setting(3e-2, "learning rate of the projection", range=RATE)
    lr_lora: float = setting(1e-3, "learning rate of the LoRA (write.train_lora)", range=RATE)
    train_lora: bool = setting(False, "train the LoRA in the write phase too")
    train_projection: bool = setting(True, "train the projection in the write phase")
    documents: str = setting("all", "which rows are trained: all, or new (only those init_from's checkpoint did "
                                    "not hold: a grown corpus)", choices=("all", "new"))
    grad_clip: float = setting(1.0, "gradient norm clipping", range=RATE)
    eval_docs: int = setting(8, "documents decoded greedily each evaluation", range=SOME)
    eval_every: int = setting(1, "epochs between greedy-reconstruction checks (the last epoch always)", range=SOME)
    eval_qa_every: int = setting(0, "epochs between answer evaluations on the eval questions (0 = none)",
                                 range=SOME)
    checkpoint_every: int = setting(0, "steps between resumable checkpoints; 0 = only at the end", range=SOME)


@dataclass
class ReadSettings:
    """``read``: the read phase trains selection and answering together, ``L_gen + λ·L_retrieval``."""
    epochs: int = setting(2, "read-phase epochs", range=COUNT)
    batch_size: int = setting(8, "questions per step", range=COUNT)
    lr_z: float = setting(1e-2, "learning rate of z; 0: the read phase leaves z as written, keys included "
                                "(bench (a): soft tokens that are the LLM's embeddings, writer=keywords or "
                                "sentences, are read far better so; the encoder's are read better moving)",
                          range=WEIGHT)
    lr_lora: float = setting(3e-4, "learning rate of the LoRA", range=RATE)
    lr_selector: float = setting(1e-4, "learning rate of the selector", range=RATE)
    lr_query_encoder: Optional[float] = setting(None, "learning rate of the query encoder; null = 0.1 x lr_lora",
                                                range=RATE)
    lr_projection: Optional[float] = setting(None, "learning rate of the projection; null = lr_lora", range=RATE)
    top_k: int = setting(3, "documents read per question (at most the number of documents)", range=COUNT)
    retrieval_weight: float = setting(0.0, "λ in L_gen + λ·L_retrieval; 0: retrieval (keys, query encoder, "
                                           "selector) keeps what it was given, > 0 trains it on the questions "
                                           "(bench (a): 0.1 cost answers)", range=WEIGHT)
    grad_clip: float = setting(1.0, "gradient norm clipping", range=RATE)
    weight_decay: float = setting(0.0, "AdamW decay of every group but z", range=WEIGHT)
    checkpoint_every: int = setting(0, "steps between resumable checkpoints; 0 = only at the end", range=SOME)
    eval_every: int = setting(1, "epochs between full evaluations (0 = Recall@k only)", range=SOME)
    key_updates: str = setting("all", "whose retrieval keys the retrieval loss moves: all (every key, O(N x d_z) "
                                      "a step), batch (the batch's gold and selected ones: for large corpora) or "
                                      "none (the retrieval loss moves no key, only the query side and selector; the answer "
                                      "loss still moves keys that shape the soft tokens: z without a separate "
                                      "key, key_in_prompt)",
                               choices=("all", "batch", "none"))


@dataclass
class FaissSettings:
    """The faiss indexes' knobs (``eval.index=faiss_ivf`` / ``faiss_hnsw``; pqa_core.modeling.selection_index)."""
    nlist: int = setting(0, "IVF lists; 0 = 4 x sqrt(N) as a power of two", range=SOME)
    nprobe: int = setting(32, "IVF lists searched per query", range=COUNT)
    hnsw_m: int = setting(32, "HNSW graph degree", range=COUNT)
    ef_construction: int = setting(80, "HNSW candidates kept while building", range=COUNT)
    ef_search: int = setting(128, "HNSW candidates kept while searching", range=COUNT)


@dataclass
class EvalSettings:
    """``eval``: answers generated for the eval questions and scored (EM, F1, Recall@k, intervals)."""
    batch_size: int = setting(16, "questions per generation batch (and per Recall@k batch)", range=COUNT)
    max_new_tokens: int = setting(24, "tokens generated per answer", range=COUNT)
    top_k: Optional[int] = setting(None, "documents read per question at evaluation; null = read.top_k",
                                   range=COUNT)
    predictions_file: str = setting("predictions.jsonl", "per-question predictions, in the output folder")
    index: str = setting("exact", "top-k search at evaluation: exact, faiss_flat, faiss_ivf, faiss_hnsw",
                         choices=("exact", "faiss_flat", "faiss_ivf", "faiss_hnsw"))
    faiss: FaissSettings = setting(help="the faiss indexes' knobs", factory=FaissSettings)


PHASES = ("pretrain", "write", "read", "eval", "control_read", "control")
TRAINED_PHASES = ("pretrain", "write", "read", "control_read")  # phases that end in a checkpoint
EXPERIMENT_PHASES = {"pretrain": ["pretrain"], "write": ["write"], "read": ["read"], "eval": ["eval"],
                     "pipeline": ["write", "read", "eval"], "control": ["control"]}
"""The experiments users run (``pqa run NAME``) and the phases each runs: named here, once."""
DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _component(kind: str):
    """A component section: ``name`` (the kind's default, ``kinds.KINDS``) plus keyword arguments
    (the component's own defaults apply)."""
    return setting(help=f"the {kind} component: name, then its own parameters (pqa plugins --verbose)",
                   factory=lambda: {"name": KIND[kind].default})


@dataclass
class PQAConfig:
    seed: int = setting(0, "seeds every generator (numpy's range)", range=Range(0, 2 ** 32 - 1))
    threads: int = setting(0, "torch CPU threads; 0 = torch's default", range=Range(0, 1024))
    output_dir: Optional[str] = setting(None, "the run's folder; null = a folder of its own under outputs/")
    phases: List[str] = setting(help=f"the phases to run, in order ({', '.join(PHASES)}); set by the experiment",
                                factory=lambda: ["write", "read", "eval"])
    resume: Optional[str] = setting(None, "an earlier run's output folder or run id: continue it where it stopped")
    force_resume: bool = setting(False, "resume although its checkpoints were made under another fingerprint "
                                        "(recorded)")
    init_from: Optional[str] = setting(None, "a checkpoint folder or run output folder to start the phases from")
    model: ModelSettings = setting(help="the model", factory=ModelSettings)
    data: DataSettings = setting(help="the data files", factory=DataSettings)
    selector: Dict[str, Any] = _component("selector")
    query_encoder: Dict[str, Any] = _component("query_encoder")
    projection: Dict[str, Any] = _component("projection")
    writer: Dict[str, Any] = _component("writer")
    retrieval_loss: Dict[str, Any] = _component("retrieval_loss")
    generation_loss: Dict[str, Any] = _component("generation_loss")
    write_objective: Dict[str, Any] = _component("write_objective")
    control: Dict[str, Any] = _component("control")  # the baseline the "control" phase scores (training.controls)
    pretrain: PretrainSettings = setting(help="pqa run pretrain", factory=PretrainSettings)
    write: WriteSettings = setting(help="the write phase", factory=WriteSettings)
    read: ReadSettings = setting(help="the read phase", factory=ReadSettings)
    eval: EvalSettings = setting(help="evaluation", factory=EvalSettings)

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
        if self.pretrain.reconstruct_only_steps and self.pretrain.reader != "pqa" and "pretrain" in self.phases:
            raise UsageError(f"config key 'pretrain.reconstruct_only_steps' = {self.pretrain.reconstruct_only_steps}: "
                             f"only a pqa reader has a writer to warm up (pretrain.reader={self.pretrain.reader})")
        for key in OUTPUT_NAME_KEYS:  # outputs the config names stay in the run's folder
            section, name = key.split(".")
            check_output_name(key, getattr(getattr(self, section), name))

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def eval_top_k(self) -> int:
        return self.eval.top_k or self.read.top_k


COMPONENT_SECTIONS = tuple(KIND)


@dataclass(frozen=True)
class Key:
    """One config key as its field declares it (``pqa config`` prints these)."""

    path: str
    type: Any
    default: Any
    help: str
    range: Optional[Range] = None
    choices: Optional[Tuple[str, ...]] = None

    @property
    def type_name(self) -> str:
        return str(self.type).replace("typing.", "") if not isinstance(self.type, type) else self.type.__name__

    @property
    def allowed(self) -> str:
        """``an integer >= 1``, ``one of all, batch``, or ``''``."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.range is not None:
            return self.range.describe("int" if _base(self.type) is int else "float")
        return ""


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _base(hint: Any) -> Any:
    """``Optional[float]`` -> ``float``; ``List[str]`` -> ``list``; ``int`` -> ``int``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union and len(args) == 1:
        return _base(args[0])
    return typing.get_origin(hint) or hint


def _keys(cls, prefix: str = "") -> Dict[str, Key]:
    keys: Dict[str, Key] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default, path = _default(f), prefix + f.name
        if dataclasses.is_dataclass(default):
            keys.update(_keys(type(default), path + "."))
        elif f.name in COMPONENT_SECTIONS and not prefix:
            keys[path + ".name"] = Key(path + ".name", str, default["name"], f.metadata.get("help", ""))
        else:
            keys[path] = Key(path, hints[f.name], default, f.metadata.get("help", ""),
                             f.metadata.get("range"), f.metadata.get("choices"))
    return keys


KEYS: Dict[str, Key] = _keys(PQAConfig)
"""Every config key (a component section by its ``name``), as its field declares it."""

RANGES: Dict[str, Range] = {path: key.range for path, key in KEYS.items() if key.range is not None}
"""Every numeric config key and the values it allows (derived from the fields; tests check none is missing)."""

CHOICES: Dict[str, tuple] = {path: key.choices for path, key in KEYS.items() if key.choices}
"""String keys that take one of a few values (derived from the fields)."""


def check_choice(path: str, value: str) -> str:
    """``value`` if it is one of ``CHOICES[path]``, else the one-line error ``from_dict`` gives: for the
    modules that act on a string key and can be called with settings that did not come from ``from_dict``."""
    if value not in CHOICES[path]:
        raise UsageError(f"config key {path!r} = {value!r}: must be one of {', '.join(CHOICES[path])}")
    return value


def did_you_mean(given: str, known: typing.Iterable[str]) -> str:
    """``"did you mean 'x'? "`` for the nearest of ``known`` (difflib; else the one name ``given`` abbreviates,
    ``temp`` for ``temperature``), or ``""``."""
    known = list(known)
    close = difflib.get_close_matches(given, known, n=1, cutoff=0.6)
    if not close and len(str(given)) >= 3:
        close = [name for name in known if name.startswith(str(given))][:2]
        close = close if len(close) == 1 else []
    return f"did you mean {close[0]!r}? " if close else ""


def _unknown_key(path: str, prefix: str, fields) -> UsageError:
    hint = did_you_mean(path, [prefix + name for name in fields])
    if not hint:  # a key in the wrong section (top_k at the root): the same name elsewhere
        leaf = path.rsplit(".", 1)[-1]
        hint = did_you_mean(leaf, [k for k in KEYS if k.rsplit(".", 1)[-1] == leaf]) or did_you_mean(path, KEYS)
    return UsageError(f"unknown config key {path!r}; {hint}known keys under {prefix.rstrip('.') or 'the root'}: "
                      f"{', '.join(sorted(fields))}")


def _fill(cls, values: Dict[str, Any], prefix: str):
    if not isinstance(values, dict):
        raise UsageError(f"config key {prefix.rstrip('.') or '(root)'!r} must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        path = prefix + key
        if key not in fields:
            raise _unknown_key(path, prefix, fields)
        default = _default(fields[key])
        if dataclasses.is_dataclass(default):
            kwargs[key] = _fill(type(default), value, path + ".")
        elif key in COMPONENT_SECTIONS and not prefix:
            if not isinstance(value, dict) or not isinstance(value.get("name", default["name"]), str):
                raise UsageError(f"config key {path!r} must be a mapping with a string 'name'")
            kwargs[key] = {**default, **value}
        else:
            kwargs[key] = _coerce(value, path, hints[key], fields[key].metadata)
    return cls(**kwargs)


def _coerce(value, path: str, hint: Any, declared: typing.Mapping[str, Any]):
    """Check a leaf against its declared type (``hint``: ints accepted for floats, booleans never for
    numbers, null only where ``Optional``), then against its declared range or choices."""
    if value is None:
        if type(None) in typing.get_args(hint):
            return None
        raise UsageError(f"config key {path!r} may not be null")
    expected = _base(hint)
    if expected is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):  # `with key=false` on a command line
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise UsageError(f"config key {path!r} must be true/false, got {value!r}")
        return value
    if expected in (int, float) and isinstance(value, bool):
        raise UsageError(f"config key {path!r} = {value!r}: must be {_describe(path, expected)}, not a boolean")
    if expected is float and isinstance(value, int):
        value = float(value)
    if expected is list:
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"config key {path!r} must be a list, got {value!r}")
        if "length" in declared:
            _check_numbers(path, list(value), declared["length"], declared.get("range", Range()))
        return list(value)
    if expected in (int, float, str) and not isinstance(value, expected):
        what = _describe(path, expected) if expected in (int, float) else expected.__name__
        raise UsageError(f"config key {path!r} must be {what}, got {value!r}")
    if expected in (int, float) and not declared.get("range", Range()).allows(value):
        raise UsageError(f"config key {path!r} = {value!r}: must be {_describe(path, expected)}")
    if declared.get("choices") and value not in declared["choices"]:
        hint = did_you_mean(value, declared["choices"]).rstrip()
        raise UsageError(f"config key {path!r} = {value!r}: must be one of {', '.join(declared['choices'])}"
                         f"{'; ' + hint if hint else ''}")
    return value


def _check_numbers(path: str, value: list, length: int, allowed: Range) -> None:
    """A list of ``length`` numbers, every element in ``allowed``."""
    if len(value) != length:
        raise UsageError(f"config key {path!r} = {value!r}: must be a list of {length} numbers, got {len(value)}")
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, (int, float)) or not allowed.allows(item):
            raise UsageError(f"config key {path!r} = {value!r}: element {i} ({item!r}) must be "
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

