"""Pretrained artifacts: the reusable parts of a model (the reader LoRA, the writer, the projection), as
``pqa run pretrain`` leaves them, for any later run to start from (``model.pretrained``).

An artifact is a folder::

    model.safetensors   lora.<peft name>, writer.<name>, projection.<name>
    contents.json       hashes of the pretraining passages and questions (a run checks it is disjoint)
    MANIFEST.json       what made it (reader, LLM, shapes, components, data hashes, training, fingerprint),
                        the sha256 of the files above; written last

``model.pretrained`` names one: a folder, a run's output folder (its ``pretrained/``), ``shipped:NAME``
(``pqa_core/pretrained/NAME``, made by ``bench/pretrain.py``), or ``auto``: the shipped artifact for the
run's LLM and reader that fits its shape (``pqa demo``), else none. A run refuses, in one line and before it
exists, an artifact of another LLM, m, LoRA shape, writer or projection, of another reader than it
needs, or one whose pretraining data holds any of the run's evaluation questions or their passages.
``model.pretrained_slots=first`` lets an artifact of a larger m start a run with a smaller one: a writer
tensor with one row per soft token (the encoder's memory slots) keeps its first m rows, a projection tensor
with one block of d_model rows per soft token (the output layer of ``linear``, ``mlp2x_gelu``: their output
is laid out token by token) its first m blocks; the run records which tensors were cut
(``info.pretrained.fewer_slots``). A slot reads the passage and the slots before it, so the first m compute
what they did at the larger m, but for their anchors: the encoder anchors on the run's own m most salient
words (or sentences cut to m tokens). ``model.pretrained_slots=any`` also lets a run of a larger m start from
an artifact that holds nothing per soft token (the ``sentences`` or ``keywords`` writer's reader: its LoRA
alone, m only how many tokens it learnt to read; ``info.pretrained.more_slots``); one that does is refused.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

import torch
from safetensors.torch import load_file, save_file

from pqa_core.errors import CheckpointError, UsageError
from pqa_core.storage.atomic import atomic_directory, sha256_file
from pqa_core.storage.checkpoints import MANIFEST, verified_manifest

CONTENTS = "contents.json"
FORMAT = "pqa-pretrained/1"
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "pretrained"
PARTS = ("lora", "writer", "projection")


# --- names ------------------------------------------------------------------------------------
def artifact_path(config) -> Optional[Path]:
    """The folder ``config.model.pretrained`` names, or None (no artifact: unset, or ``auto`` with none shipped)."""
    spec = config.model.pretrained
    if not spec:
        return None
    if spec == "auto":
        return shipped_for(config)
    return resolve(spec)


def shipped_for(config) -> Optional[Path]:
    """The artifact ``auto`` takes: of those shipped for the run's LLM and reader, the one that fits the run's
    shape (m, writer, projection, LoRA), so ``writer.name=sentences model.num_memory_tokens=64`` picks
    ``pqa-sentences-m64``. The one named after the reader comes first, then one made with the run's own m
    (``model.pretrained_slots=first`` lets a larger m fit too); two that fit alike are refused, naming them.
    With none that fits, the reader's own (else its first variant by name), whose refusal names the
    difference; with none for the reader, None."""
    folder, needed = SHIPPED_DIR / config.model.llm, reader_needed(config)
    manifests = {file.parent: _shipped_manifest(file) for file in sorted(folder.glob(f"*/{MANIFEST}"))}
    ours = [path for path, manifest in manifests.items() if manifest.get("reader") == needed]
    fitting = [path for path in ours if shape_mismatch(config, manifests[path], None) is None]
    if folder / needed in fitting:
        return folder / needed
    exact = [path for path in fitting
             if saved_shape(manifests[path]).get("num_memory_tokens") == config.model.num_memory_tokens]
    best = exact or fitting
    if len(best) > 1:
        raise UsageError(f"model.pretrained='auto': {len(best)} shipped artifacts fit this run "
                         f"({', '.join(p.name for p in best)}); name one: model.pretrained=shipped:"
                         f"{config.model.llm}/{best[0].name}")
    if best:
        return best[0]
    return folder / needed if folder / needed in ours else (ours[0] if ours else None)


def _shipped_manifest(file: Path) -> Dict[str, Any]:
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: a shipped artifact's manifest cannot be read ({exc}); reinstall pqa") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{file}: a shipped artifact's manifest is not a JSON object; reinstall pqa")
    return manifest


def resolve(spec: str) -> Path:
    """``shipped:NAME`` -> the package's artifact; a run's output folder -> its ``pretrained/``; else the path."""
    if spec.startswith("shipped:"):
        name = spec[len("shipped:"):]
        path = SHIPPED_DIR / name
        if not re.fullmatch(r"[\w.-]+(/[\w.-]+)*", name) or not (path / MANIFEST).exists():
            have = sorted(str(p.parent.relative_to(SHIPPED_DIR)) for p in SHIPPED_DIR.rglob(MANIFEST))
            raise UsageError(f"model.pretrained={spec!r}: no such shipped artifact; shipped: {', '.join(have) or 'none'}")
        return path
    path = Path(spec).expanduser()
    return path / "pretrained" if (path / "pretrained" / MANIFEST).exists() else path


def text_hash(text: str) -> str:
    """A passage's or question's identity across files: its whitespace-normalised, lower-cased text."""
    return hashlib.sha256(" ".join(text.lower().split()).encode()).hexdigest()[:16]


def reader_needed(config) -> str:
    """The reader an artifact must hold for this run: soft tokens (pqa), passage text, or nothing."""
    phases = set(config.phases)
    if phases & {"control", "control_read"}:
        return "closed_book" if config.control.get("name") == "closed_book" else "text"
    if "pretrain" in phases:
        return config.pretrain.reader
    return "pqa"


SPEED_ONLY = ("batch_size", "precision")
"""Component parameters that change how fast (and a precision, the rounding), not which tensors: an
artifact fits whatever they are."""

MADE_BEFORE = {"writer": {"encoder": {"anchor": "none"}}}
"""kind -> component -> a parameter added after artifacts were made without it, and the value that
reproduces what those artifacts were made with (the encoder had no anchor before ``anchor``)."""


def saved_shape(manifest: Dict[str, Any]) -> Dict[str, Any]:
    """The artifact's shape as today's parameters name it (``MADE_BEFORE`` fills what it predates)."""
    saved = dict(manifest.get("shape") or {})
    for kind in ("writer", "projection"):
        if isinstance(saved.get(kind), dict):
            section = {k: v for k, v in saved[kind].items() if k not in SPEED_ONLY}
            saved[kind] = dict(sorted({**MADE_BEFORE.get(kind, {}).get(section.get("name"), {}), **section}.items()))
    return saved


def shape_of(config, d_model: Optional[int]) -> Dict[str, Any]:
    """What must match for an artifact's tensors to fit a model of ``config`` (components with their defaults)."""
    from pqa_core.components.plugins import with_component_defaults

    def section(kind):
        filled = with_component_defaults(kind, getattr(config, kind))
        return {k: v for k, v in sorted(filled.items()) if k not in SPEED_ONLY}

    m, lora = config.model, config.model.lora
    return {"d_model": d_model, "num_memory_tokens": m.num_memory_tokens,
            "lora": {"r": lora.r, "alpha": lora.alpha, "target_modules": sorted(lora.target_modules)}
            if lora.enabled else None,
            "writer": section("writer"), "projection": section("projection")}


# --- writing ----------------------------------------------------------------------------------
def save_pretrained(path, model, config, *, llm_identity: dict, data: Dict[str, Any], passages: Iterable[str],
                    questions: Iterable[str], training: Dict[str, Any], fingerprint: Optional[str] = None,
                    started_from: Optional[Dict[str, Any]] = None) -> Path:
    """Write the artifact of ``model`` (trained by ``config``'s pretraining) at ``path``, atomically.
    ``started_from``: the artifact this pretraining started from (``load_pretrained``'s record); its
    pretraining data is this one's too, so its contents are joined to this artifact's (a run is then refused
    an artifact whose ancestor read its evaluation), and the manifest names it."""
    reader = config.pretrain.reader
    tensors: Dict[str, torch.Tensor] = {}
    for name, param in model.llm.named_parameters():
        if "lora_" in name:
            tensors[f"lora.{name}"] = param.detach()
    if reader == "pqa":
        for name, tensor in model.writer.state_dict().items():
            tensors[f"writer.{name}"] = tensor.detach()
        for name, tensor in shaping_state(model.z_to_embedding, model.doc_vectors.shape[1]).items():
            tensors[f"projection.{name}"] = tensor
    tensors = {k: v.float().contiguous().cpu() for k, v in tensors.items()}
    passages, questions = {text_hash(t) for t in passages}, {text_hash(t) for t in questions}
    base = None
    if started_from and started_from.get("path"):
        first = read_manifest(str(started_from["path"]))  # its files verified against its manifest
        if sha256_file(Path(first["path"]) / MANIFEST) != started_from.get("manifest_sha256"):
            raise CheckpointError(f"{started_from['path']}: the artifact this pretraining started from changed "
                                  f"since it was loaded; its data cannot be vouched for")
        inherited = json.loads((Path(first["path"]) / CONTENTS).read_text())
        passages |= set(inherited.get("passages", ()))
        questions |= set(inherited.get("questions", ()))
        base = {k: started_from.get(k) for k in ("path", "manifest_sha256", "reader", "fewer_slots")
                if started_from.get(k) is not None}
    d_model = model.llm.get_input_embeddings().weight.shape[1]
    manifest = {
        "format": FORMAT, "reader": reader, "llm": llm_identity, "shape": shape_of(config, int(d_model)),
        "data": data, "training": training, "fingerprint": fingerprint,
        **({"started_from": base} if base else {}),
        "made": {"pqa": _version("pqa"), "torch": torch.__version__, "transformers": _version("transformers"),
                 "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    }
    with atomic_directory(path) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"))
        (tmp / CONTENTS).write_text(json.dumps({"passages": sorted(passages), "questions": sorted(questions)}))
        manifest["files"] = {f.name: {"sha256": sha256_file(f), "bytes": f.stat().st_size}
                             for f in sorted(tmp.iterdir()) if f.is_file()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return Path(path)


def shaping_state(projection, d_z: int) -> Dict[str, torch.Tensor]:
    """The projection's tensors that shape the soft tokens: its buffers, and the parameters the output depends
    on (a gradient reaches them); a part it does not use (``hybrid``'s key map without ``key_in_prompt``) is
    left out of the artifact, and keeps the run's own values when loaded."""
    named = [(n, p) for n, p in projection.named_parameters()]
    with torch.enable_grad():
        z = torch.randn(1, 1, d_z, device=named[0][1].device if named else None)
        out = projection(z).float().sum()
        grads = torch.autograd.grad(out, [p for _, p in named], allow_unused=True) if named and out.requires_grad \
            else [None] * len(named)
    used = {n for (n, _), g in zip(named, grads) if g is not None}
    params = {n for n, _ in named}
    return {n: t.detach() for n, t in projection.state_dict().items() if n in used or n not in params}


def _version(name: str) -> Optional[str]:
    try:
        return package_version(name)
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return None


# --- reading ----------------------------------------------------------------------------------
def read_manifest(spec: str, path: Optional[Path] = None) -> Dict[str, Any]:
    """The artifact's manifest, its files checked against it (a torn or edited artifact is refused)."""
    path = path or resolve(spec)
    file = path / MANIFEST
    if not file.exists():
        raise CheckpointError(f"model.pretrained={spec!r}: {path} holds no pretrained artifact ({MANIFEST} missing)")
    manifest = verified_manifest(path, "pretrained artifact", required="model.safetensors")
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{file}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    manifest["path"] = str(path)
    return manifest


def check_fits_run(config, manifest: Dict[str, Any], llm_identity: dict, d_model: Optional[int]) -> None:
    """An artifact made for another LLM, shape, writer, projection or reader is refused, naming the difference."""
    spec = config.model.pretrained
    if spec == "auto" and manifest.get("path"):  # say which shipped artifact auto took
        spec = f"auto ({manifest['path']})"
    needed = reader_needed(config)
    if manifest.get("reader") != needed:
        raise UsageError(f"model.pretrained={spec!r}: a {manifest.get('reader')!r} reader; this run needs a "
                         f"{needed!r} one (pqa run pretrain with pretrain.reader={needed})")
    if manifest.get("llm") != llm_identity:
        raise UsageError(f"model.pretrained={spec!r}: made for LLM {_short(manifest.get('llm'))}, this run has "
                         f"{_short(llm_identity)}")
    mismatch = shape_mismatch(config, manifest, d_model)
    if mismatch is not None:
        key, saved, current = mismatch
        hint = ""
        if key == "num_memory_tokens" and config.model.pretrained_slots == "first" and isinstance(saved, int):
            hint = (" (model.pretrained_slots=first keeps the first slots: m can only shrink; "
                    "model.pretrained_slots=any lets it grow for an artifact with nothing per soft token)")
        elif key == "num_memory_tokens" and isinstance(saved, int) and current < saved:
            hint = " (model.pretrained_slots=first would keep its first slots)"
        elif key == "num_memory_tokens" and isinstance(saved, int):
            hint = " (model.pretrained_slots=any lets m grow for an artifact with nothing per soft token)"
        raise UsageError(f"model.pretrained={spec!r}: made for {key}={saved!r}, this run has {key}={current!r}{hint}")
    made = saved_shape(manifest)
    saved_m = made.get("num_memory_tokens")
    width = d_model or made.get("d_model")  # pre-flight has no model: the artifact's own
    if isinstance(saved_m, int) and config.model.num_memory_tokens > saved_m and manifest.get("path") and width:
        per_slot = per_slot_tensors(Path(manifest["path"]) / "model.safetensors", saved_m, int(width))
        if per_slot:
            raise UsageError(f"model.pretrained={spec!r}: made for num_memory_tokens={saved_m}, this run has "
                             f"num_memory_tokens={config.model.num_memory_tokens}, and its {per_slot[0]!r} holds "
                             f"one part per soft token: m can only shrink (model.pretrained_slots=first)")


def shape_mismatch(config, manifest: Dict[str, Any], d_model: Optional[int]):
    """The first part of the shape the artifact and the run differ in, as (key, saved, run's), or None
    (``d_model`` None: not compared)."""
    saved, current = saved_shape(manifest), shape_of(config, d_model)
    keys = ["d_model", "lora"] + (["num_memory_tokens", "writer", "projection"] if manifest.get("reader") == "pqa"
                                  else [])
    for key in keys:
        if key == "d_model" and d_model is None:
            continue
        if key == "num_memory_tokens" and other_slots_allowed(config, saved.get(key)):
            continue
        if saved.get(key) != current.get(key):
            return key, saved.get(key), current.get(key)
    return None


def fewer_slots_allowed(config, saved_m) -> bool:
    """``model.pretrained_slots=first`` (or ``any``) and this run's m is at most the artifact's."""
    return (config.model.pretrained_slots in ("first", "any") and isinstance(saved_m, int)
            and config.model.num_memory_tokens <= saved_m)


def other_slots_allowed(config, saved_m) -> bool:
    """m may differ from the artifact's: fewer under ``first``, any under ``any`` (a larger m is then held to
    an artifact with no per-slot tensors: ``per_slot_tensors``)."""
    return fewer_slots_allowed(config, saved_m) or (config.model.pretrained_slots == "any" and isinstance(saved_m, int))


def per_slot_tensors(file: Path, saved_m: int, d_model: int) -> list:
    """The names of ``file``'s writer and projection tensors laid out one part per soft token (``fit_slots``'s
    rule: saved_m rows, or saved_m x d_model), read from the safetensors header alone."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as opened:
            shapes = {key: opened.get_slice(key).get_shape() for key in opened.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{file}: not a valid safetensors file ({exc})") from None
    return sorted(key for key, shape in shapes.items() if key.partition(".")[0] in ("writer", "projection")
                  and shape and shape[0] in (saved_m, saved_m * d_model))


def fit_slots(key: str, tensor: torch.Tensor, target: torch.Tensor, saved_m, m: int,
              d_model: int) -> Optional[torch.Tensor]:
    """What belongs to the first ``m`` soft tokens of an artifact tensor made for ``saved_m``: a writer
    tensor's first m rows (one per soft token), a projection tensor's first m x d_model rows (one block per
    soft token); None where the run's tensor differs from it otherwise."""
    rows = {"writer": (saved_m, m), "projection": (saved_m * d_model, m * d_model)}.get(key.partition(".")[0])
    if (rows is not None and saved_m != m and tensor.dim() >= 1 and target.dim() == tensor.dim()
            and (tensor.shape[0], target.shape[0]) == rows and tensor.shape[1:] == target.shape[1:]):
        return tensor[:rows[1]]
    return None


def _short(identity) -> str:
    return repr(identity.get("name")) if isinstance(identity, dict) else repr(identity)


def check_disjoint(config, manifest: Dict[str, Any], eval_questions, passages_of) -> None:
    """The run's evaluation questions, and the passages they are about, must be absent from the artifact's
    pretraining data (``passages_of(question)``: the texts of its gold passages). A pretraining that goes on
    from an artifact is held to its questions only: its held-out questions are about the passages it trains
    on, by design (as the artifact's own were), and its artifact inherits the first one's data."""
    contents = json.loads((Path(manifest["path"]) / CONTENTS).read_text())
    seen_q, seen_p = set(contents.get("questions", ())), set(contents.get("passages", ()))
    questions = [q for q in eval_questions if text_hash(q.question) in seen_q]
    passages = set() if set(config.phases) == {"pretrain"} else \
        {text_hash(t) for q in eval_questions for t in passages_of(q)} & seen_p
    if questions or passages:
        example = f"e.g. question {questions[0].id!r}" if questions else "e.g. a gold passage"
        raise UsageError(f"model.pretrained={config.model.pretrained!r}: its pretraining data overlaps this run's "
                         f"evaluation ({len(questions)} of {len(eval_questions)} questions, {len(passages)} of their "
                         f"passages; {example}, data.eval_qa={config.data.eval_qa}): pretrain on a disjoint corpus")


def check_for_run(config, corpus, eval_questions, d_model: Optional[int] = None) -> Optional[Dict[str, Any]]:
    """Pre-flight of ``model.pretrained`` (cheap: the manifest and file hashes, no model): an artifact for
    this LLM, shape and reader, whose pretraining data is disjoint from the run's evaluation."""
    from pqa_core.modeling.llm import llm_identity

    path = artifact_path(config)
    if path is None:
        return None
    manifest = read_manifest(config.model.pretrained, path)
    check_fits_run(config, manifest, llm_identity(config.model.llm), d_model)
    texts = {d.doc_id: d.text for d in corpus}
    check_disjoint(config, manifest, eval_questions, lambda q: [texts[i] for i in q.gold_doc_ids if i in texts])
    return manifest


def load_pretrained(config, model) -> Dict[str, Any]:
    """Load ``config.model.pretrained`` into ``model`` (its reader LoRA, and for a pqa reader the writer and
    the projection); returns what the run records of it."""
    from pqa_core.modeling.llm import llm_identity

    path = artifact_path(config)
    if path is None:
        return {"path": None, "why": f"model.pretrained={config.model.pretrained!r}: no artifact shipped for "
                                     f"{config.model.llm!r} ({reader_needed(config)} reader); started untrained"}
    manifest = read_manifest(config.model.pretrained, path)
    d_model = int(model.llm.get_input_embeddings().weight.shape[1])
    check_fits_run(config, manifest, llm_identity(config.model.llm), d_model)
    file = Path(manifest["path"]) / "model.safetensors"
    try:
        tensors = load_file(str(file))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{file}: not a valid safetensors file ({exc})") from None
    targets = {"lora": {n: p for n, p in model.llm.named_parameters() if "lora_" in n},
               "writer": dict(model.writer.state_dict(keep_vars=True)),
               "projection": dict(model.z_to_embedding.state_dict(keep_vars=True))}
    loaded: Dict[str, int] = {}
    saved_m, m = saved_shape(manifest).get("num_memory_tokens"), config.model.num_memory_tokens
    cut = []
    for key, tensor in tensors.items():
        part, _, name = key.partition(".")
        target = targets.get(part, {}).get(name)
        if target is not None and fewer_slots_allowed(config, saved_m):
            first = fit_slots(key, tensor, target, saved_m, m, d_model)
            if first is not None:
                tensor = first
                cut.append(key)
        if target is None or tuple(target.shape) != tuple(tensor.shape):
            raise CheckpointError(f"{file}: tensor {key!r} {tuple(tensor.shape)} fits nothing in this model"
                                  + (f" (it has {tuple(target.shape)})" if target is not None else "")
                                  + (f"; model.pretrained_slots=first cuts only a writer's per-slot rows and a "
                                     f"projection's per-token blocks, and m can grow only where there are none"
                                     if saved_m != m else ""))
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{file}: tensor {key!r} holds NaN or inf")
        with torch.no_grad():
            target.copy_(tensor.to(target.dtype))
        loaded[part] = loaded.get(part, 0) + 1
    missing = [part for part in ("lora",) + (("writer",) if model.writer.state_dict() else ())
               if targets[part] and part not in loaded and manifest.get("reader") == "pqa"]
    if missing:
        raise CheckpointError(f"{file}: holds no {' or '.join(missing)} tensors for this model")
    return {"path": str(Path(manifest["path"]).resolve()), "reader": manifest.get("reader"), "manifest_sha256":
            sha256_file(Path(manifest["path"]) / MANIFEST), "tensors": loaded,
            "data": manifest.get("data"), "training": manifest.get("training"),
            **({"fewer_slots": {"from": saved_m, "to": m, "tensors": cut}}
               if isinstance(saved_m, int) and m < saved_m and manifest.get("reader") == "pqa" else {}),
            **({"more_slots": {"from": saved_m, "to": m}}
               if isinstance(saved_m, int) and m > saved_m and manifest.get("reader") == "pqa" else {})}


def data_summary(corpus_path: Path, qa_path: Path, passages: int, questions: int) -> Dict[str, Any]:
    """What the artifact records of its pretraining data."""
    return {"corpus": str(corpus_path), "corpus_sha256": sha256_file(corpus_path, remember=True), "qa": str(qa_path),
            "qa_sha256": sha256_file(qa_path, remember=True), "passages": passages, "questions": questions}

