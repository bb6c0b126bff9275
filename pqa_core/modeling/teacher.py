"""A trained text reader as a distillation teacher, in its own copy of the LLM.

Distilling the plain LLM reading the gold passage hurts on SQuAD (it answers in sentences, the task in
spans: README, Writers and pretraining); a teacher that answers as the task does is a reader trained on
passage text. ``kl_distill``'s ``teacher_adapter`` names one (the ``distill`` write objective's takes the
first two forms):

- a LoRA adapter folder (``adapter_config.json``), or a pqa checkpoint holding one in ``adapter/`` (a
  control's trained reader: ``pqa run control with train_reader control.name=oracle``);
- a text-reader artifact (``pqa run pretrain with pretrain.reader=text``), or a run folder holding one.

``load_teacher`` merges it into a fresh copy of the LLM (frozen, eval mode): the run's own model and its
adapter are never touched, at the cost of the LLM's weights once more in memory.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

import torch

from pqa_core.errors import CheckpointError, UsageError
from pqa_core.storage.atomic import sha256_file
from pqa_core.storage.pretrained import text_hash


def adapter_dir(path: str) -> Optional[Path]:
    """``path`` itself when it holds ``adapter_config.json``, else its (checkpoint's) ``adapter/`` folder, else None."""
    path = Path(path).expanduser()
    for candidate in (path, path / "adapter"):
        if (candidate / "adapter_config.json").exists():
            return candidate
    return None


def teacher_spec(config) -> str:
    """The teacher the run's generation loss names (its ``teacher_adapter``) when a phase of the run trains on
    that loss (a read phase, a pqa pretraining), else "" (none: a distilling loss reads the LLM, adapter off)."""
    phases = set(config.phases)
    distils = "read" in phases or ("pretrain" in phases and config.pretrain.reader == "pqa")
    return str(config.generation_loss.get("teacher_adapter") or "") if distils else ""


def check_teacher(spec: str, llm_name: str, eval_questions: Optional[Iterable] = None) -> Dict[str, Any]:
    """Pre-flight of a teacher (cheap: files and manifests, no model): what it is, or one line saying why it
    cannot be one. A text reader's artifact or checkpoint must be of this LLM and must not have trained on
    any of ``eval_questions`` (its passages may be the run's: the run's own reader trains on them too). A bare
    adapter folder records neither; it is taken as it is."""
    folder = adapter_dir(spec)
    if folder is not None:
        weights = folder / "adapter_model.safetensors"
        if not weights.exists():  # a pickled adapter_model.bin is never loaded
            raise UsageError(f"teacher_adapter={spec!r}: {folder} holds no adapter_model.safetensors")
        kind = "adapter"
        if folder.name == "adapter" and (folder.parent / "MANIFEST.json").exists():  # a pqa checkpoint's
            kind = "checkpoint"
            _check_checkpoint(spec, folder.parent, llm_name, eval_questions)
        digest = hashlib.sha256((sha256_file(folder / "adapter_config.json") + sha256_file(weights)).encode())
        return {"kind": kind, "path": str(folder.resolve()), "sha256": digest.hexdigest()}
    return _check_artifact(spec, llm_name, eval_questions)


def _check_checkpoint(spec: str, checkpoint: Path, llm_name: str, eval_questions) -> None:
    """The checkpoint of a text reader (a control's trained reader, a text pretraining) of this LLM, whose
    training questions are none of the evaluation's."""
    from pqa_core.storage.checkpoints import verified_manifest

    verified_manifest(checkpoint, "checkpoint", required="state.json")
    state = json.loads((checkpoint / "state.json").read_text())
    config, phase = state.get("config") or {}, state.get("phase")
    control = (config.get("control") or {}).get("name")
    reader = {"control_read": "closed_book" if control == "closed_book" else "text",
              "pretrain": (config.get("pretrain") or {}).get("reader", "pqa")}.get(phase, "pqa")
    if reader != "text":
        raise UsageError(f"teacher_adapter={spec!r}: the checkpoint of a {reader!r} reader ({phase} phase); a "
                         f"teacher reads the passage as text (a control's reader: pqa run control with "
                         f"train_reader control.name=oracle)")
    llm = (config.get("model") or {}).get("llm")
    if llm != llm_name:
        raise UsageError(f"teacher_adapter={spec!r}: trained on LLM {llm!r}, this run has {llm_name!r}")
    if eval_questions is not None:
        from pqa_core.pipeline import resolve_data_path

        qa = str((config.get("data") or {}).get("qa"))
        try:
            lines = resolve_data_path(qa).read_text(encoding="utf-8").splitlines()
            seen = {text_hash(json.loads(line)["question"]) for line in lines if line.strip()}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"teacher_adapter={spec!r}: its training questions (data.qa={qa}) cannot be read "
                             f"to check they hold none of this run's evaluation questions ({type(exc).__name__})"
                             ) from None
        _refuse_leaks(spec, seen, eval_questions)


def _check_artifact(spec: str, llm_name: str, eval_questions) -> Dict[str, Any]:
    """A text-reader artifact of this LLM whose pretraining questions are none of the evaluation's."""
    from pqa_core.modeling.llm import llm_identity
    from pqa_core.storage.pretrained import CONTENTS, read_manifest, resolve

    try:
        path = resolve(spec)
        if not (path / "MANIFEST.json").exists():
            raise UsageError(f"teacher_adapter={spec!r}: neither a LoRA adapter folder (adapter_config.json), a "
                             f"pqa checkpoint holding one (adapter/), nor a pretrained text-reader artifact")
        manifest = read_manifest(spec, path)
    except (UsageError, CheckpointError) as exc:  # their lines name model.pretrained: this is the teacher
        raise type(exc)(str(exc).replace("model.pretrained=", "teacher_adapter=")) from None
    if manifest.get("reader") != "text":
        raise UsageError(f"teacher_adapter={spec!r}: a {manifest.get('reader')!r} reader; a teacher reads the "
                         f"passage as text (pqa run pretrain with pretrain.reader=text)")
    if manifest.get("llm") != llm_identity(llm_name):
        name = (manifest.get("llm") or {}).get("name")
        raise UsageError(f"teacher_adapter={spec!r}: made for LLM {name!r}, this run has {llm_name!r}")
    lora = (manifest.get("shape") or {}).get("lora")
    if not lora:
        raise UsageError(f"teacher_adapter={spec!r}: the artifact holds no LoRA (a text reader without one is "
                         f"the LLM itself: leave teacher_adapter empty)")
    if eval_questions is not None:
        _refuse_leaks(spec, set(json.loads((Path(manifest["path"]) / CONTENTS).read_text()).get("questions", ())),
                      eval_questions)
    path = Path(manifest["path"]).resolve()
    return {"kind": "artifact", "path": str(path), "sha256": sha256_file(path / "MANIFEST.json"), "lora": lora}


def _refuse_leaks(spec: str, seen_questions: set, eval_questions: Iterable) -> None:
    leaked = [q for q in eval_questions if text_hash(q.question) in seen_questions]
    if leaked:
        raise UsageError(f"teacher_adapter={spec!r}: it was trained on {len(leaked)} of this run's evaluation "
                         f"questions (e.g. {leaked[0].id!r}): its answers would teach them")


def load_teacher(spec: str, llm_name: str, device=None, info: Optional[Dict[str, Any]] = None) -> torch.nn.Module:
    """The LLM with the teacher's LoRA merged in, frozen and in eval mode. ``info``: what ``check_teacher``
    said of ``spec`` (checked here when not given)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from pqa_core.config import LoraSettings
    from pqa_core.modeling.builder import apply_lora
    from pqa_core.modeling.llm import load_llm

    info = info or check_teacher(spec, llm_name)
    llm, _ = load_llm(llm_name)
    llm.requires_grad_(False)
    if info["kind"] in ("adapter", "checkpoint"):
        try:
            teacher = PeftModel.from_pretrained(llm, info["path"]).merge_and_unload()
        except (ValueError, RuntimeError, KeyError) as exc:
            raise CheckpointError(f"teacher_adapter={spec!r}: its adapter does not fit {llm_name!r} "
                                  f"({str(exc).splitlines()[0]})") from None
    else:
        lora = info["lora"]
        peft_llm = apply_lora(llm, LoraSettings(r=lora["r"], alpha=lora["alpha"], dropout=0.0,
                                                target_modules=list(lora["target_modules"])))
        tensors = {k.partition(".")[2]: v for k, v in load_file(str(Path(info["path"]) / "model.safetensors")).items()
                   if k.startswith("lora.")}
        own = dict(peft_llm.named_parameters())
        misfits = [n for n, t in tensors.items() if n not in own or tuple(own[n].shape) != tuple(t.shape)]
        if misfits or not tensors:
            raise CheckpointError(f"teacher_adapter={spec!r}: its LoRA tensors do not fit {llm_name!r}"
                                  + (f" (e.g. {misfits[0]!r})" if misfits else " (it holds none)"))
        with torch.no_grad():
            for name, tensor in tensors.items():
                own[name].copy_(tensor.to(own[name].dtype))
        teacher = peft_llm.merge_and_unload()
    teacher.requires_grad_(False)
    teacher.eval()
    return teacher.to(device) if device is not None else teacher
