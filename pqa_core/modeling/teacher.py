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

import json
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

import torch

from pqa_core.errors import CheckpointError, UsageError
from pqa_core.storage.atomic import sha256_file


def adapter_dir(path: str) -> Optional[Path]:
    """``path`` itself when it holds ``adapter_config.json``, else its (checkpoint's) ``adapter/`` folder, else None."""
    path = Path(path).expanduser()
    for candidate in (path, path / "adapter"):
        if (candidate / "adapter_config.json").exists():
            return candidate
    return None


def teacher_spec(config) -> str:
    """The teacher the run's generation loss names (its ``teacher_adapter``), or "" (none: adapter off)."""
    return str(config.generation_loss.get("teacher_adapter") or "")


def check_teacher(spec: str, llm_name: str, eval_questions: Optional[Iterable] = None) -> Dict[str, Any]:
    """Pre-flight of a teacher (cheap: files and the manifest, no model): what it is, or one line saying why
    it cannot be one. A text-reader artifact must be made for this LLM, and must not have trained on any of
    ``eval_questions`` (its passages may be the run's: the run's own reader trains on them too)."""
    from pqa_core.modeling.llm import llm_identity
    from pqa_core.storage.pretrained import CONTENTS, read_manifest, resolve, text_hash

    folder = adapter_dir(spec)
    if folder is not None:
        weights = folder / "adapter_model.safetensors"
        if not weights.exists():  # a pickled adapter_model.bin is never loaded
            raise UsageError(f"teacher_adapter={spec!r}: {folder} holds no adapter_model.safetensors")
        return {"kind": "adapter", "path": str(folder), "sha256": sha256_file(weights)}
    path = resolve(spec)
    if not (path / "MANIFEST.json").exists():
        raise UsageError(f"teacher_adapter={spec!r}: neither a LoRA adapter folder (adapter_config.json), a pqa "
                         f"checkpoint holding one (adapter/), nor a pretrained text-reader artifact")
    manifest = read_manifest(spec, path)
    if manifest.get("reader") != "text":
        raise UsageError(f"teacher_adapter={spec!r}: a {manifest.get('reader')!r} reader; a teacher reads the "
                         f"passage as text (pqa run pretrain with pretrain.reader=text)")
    if manifest.get("llm") != llm_identity(llm_name):
        name = (manifest.get("llm") or {}).get("name")
        raise UsageError(f"teacher_adapter={spec!r}: made for LLM {name!r}, this run has {llm_name!r}")
    if eval_questions is not None:
        seen = set(json.loads((Path(manifest["path"]) / CONTENTS).read_text()).get("questions", ()))
        leaked = [q for q in eval_questions if text_hash(q.question) in seen]
        if leaked:
            raise UsageError(f"teacher_adapter={spec!r}: it was trained on {len(leaked)} of this run's evaluation "
                             f"questions (e.g. {leaked[0].id!r}): its answers would teach them")
    return {"kind": "artifact", "path": manifest["path"], "sha256": sha256_file(Path(manifest["path"]) / "MANIFEST.json"),
            "lora": (manifest.get("shape") or {}).get("lora")}


def load_teacher(spec: str, llm_name: str, device=None) -> torch.nn.Module:
    """The LLM with the teacher's LoRA merged in, frozen and in eval mode."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from pqa_core.config import LoraSettings
    from pqa_core.modeling.builder import apply_lora
    from pqa_core.modeling.llm import load_llm

    info = check_teacher(spec, llm_name)
    llm, _ = load_llm(llm_name)
    llm.requires_grad_(False)
    if info["kind"] == "adapter":
        try:
            teacher = PeftModel.from_pretrained(llm, info["path"]).merge_and_unload()
        except (ValueError, RuntimeError, KeyError) as exc:
            raise CheckpointError(f"teacher_adapter={spec!r}: its adapter does not fit {llm_name!r} "
                                  f"({str(exc).splitlines()[0]})") from None
    elif info["lora"]:
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
    else:  # a text reader trained without LoRA: the LLM itself
        teacher = llm
    teacher.requires_grad_(False)
    teacher.eval()
    return teacher.to(device) if device is not None else teacher
