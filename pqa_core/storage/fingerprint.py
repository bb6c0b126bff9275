"""What produced a checkpoint's weights, as one digest: a checkpoint is only ever continued under it.

The fingerprint is every key of the resolved run config (new sections and keys are included by
themselves) except those listed in ``NOT_WEIGHTS``, which cannot change the weights, plus what
the config names but does not hold: the sha256 of the training data files, the LLM's identity,
the content of the ``init_from`` checkpoint, of the ``model.pretrained`` artifact and of a distillation
teacher (``teacher_adapter``), each component's plugin, package, version and source hash (edited plugin
code is another fingerprint), and the pqa
version (the ``pretrain`` section counts only in a run that pretrains). Every checkpoint's manifest
records it. A run that would load checkpoints from its own folder (``resume``) must have the
same fingerprint, else one line names the keys that differ; ``force_resume=True`` continues
anyway and the run records the differences. A key the checkpoint does not hold because pqa added it
later (a config key or a component's parameter) is no difference while the run leaves it at its default:
a new key's default is what pqa did before it existed. A run pointed at a folder that already holds
checkpoints without ``resume`` is refused: it would load another run's weights as its own.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional

from pqa_core.storage.atomic import sha256_file
from pqa_core.errors import CheckpointError, UsageError

CONFIG_KEY = "_fingerprint"  # where the pipeline hands the fingerprint to save_checkpoint in its config dict

# Config keys (a section stands for all its keys) that cannot change a checkpoint's weights, and why.
NOT_WEIGHTS: Dict[str, str] = {
    "output_dir": "where the run writes",
    "resume": "which folder is continued",
    "force_resume": "the override of this check",
    "init_from": "a path: the content of the checkpoint it names counts instead",
    "model.pretrained": "a path: the content of the artifact it names counts instead",
    "generation_loss.teacher_adapter": "a path: the content of the teacher it names counts instead",
    "data.corpus": "a path: the file's sha256 counts instead",
    "data.qa": "a path: the file's sha256 counts instead",
    "data.eval_qa": "the evaluation questions are scored, never trained on",
    "eval": "evaluation settings",
    "write.eval_docs": "evaluation during training (its own random generator, no gradient)",
    "write.eval_every": "evaluation during training",
    "read.eval_every": "evaluation during training",
    "write.eval_qa_every": "evaluation during training",
    "write.checkpoint_every": "when checkpoints are written (resuming from any of them gives the same weights)",
    "read.checkpoint_every": "when checkpoints are written",
    "pretrain.checkpoint_every": "when checkpoints are written",
    "pretrain.max_steps": "where training stops, not what a step does (the artifact records its steps)",
    "pretrain.epochs": "how long pretraining goes on, not what a step does (no schedule depends on it)",
    "write.epochs": "how long the write phase goes on (no schedule depends on it): resume with more to train on",
    "read.epochs": "how long the read phase goes on (no schedule depends on it): resume with more to train on",
    "threads": "how many CPU threads compute the same steps (float rounding may differ)",
    "model.device": "which device computes the same steps (float rounding may differ)",
}
TRAINING_DATA = ("corpus", "qa")  # data files whose content the weights depend on
COMPONENT_IDENTITY = ("plugin", "package", "version", "source_sha256")  # of each component the run builds


def compute(config_dict: Mapping[str, Any], data_files: Mapping[str, Path], llm: Mapping[str, Any],
            init_checkpoint: Optional[Path] = None, pretrained: Optional[Path] = None,
            components: Optional[Mapping[str, Mapping[str, Any]]] = None,
            teacher: Optional[str] = None) -> Dict[str, Any]:
    """``{"digest": sha256, "values": {dotted key: value}}`` of what determines the weights.
    ``components``: kind -> the provenance of the code that builds it (``plugins.components_of_run``);
    ``teacher``: the sha256 of the distillation teacher's weights (``pqa_core.modeling.teacher``)."""
    pretrains = "pretrain" in (config_dict.get("phases") or ())
    values = {key: value for key, value in flatten(config_dict).items()
              if not excluded(key) and (pretrains or not key.startswith("pretrain."))}
    for name, path in sorted(data_files.items()):
        values[f"data.{name}.sha256"] = sha256_file(path, remember=True)
    values.update({f"llm.{k}": v for k, v in flatten(llm).items()})
    if init_checkpoint is not None:
        values["init_from.content"] = content_digest(init_checkpoint)
    if pretrained is not None:
        values["model.pretrained.content"] = content_digest(pretrained)
    if teacher is not None:
        values["generation_loss.teacher_adapter.content"] = teacher
    for kind, source in sorted((components or {}).items()):  # the code behind each name, not only the name
        values.update({f"components.{kind}.{k}": source.get(k) for k in COMPONENT_IDENTITY})
    values["pqa_version"] = pqa_version()
    return {"digest": _digest(values), "values": values}


def excluded(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in NOT_WEIGHTS)


def content_digest(checkpoint: Path) -> str:
    """A digest of a checkpoint's content: the sha256 of each file as its manifest lists them."""
    try:
        files = json.loads((Path(checkpoint) / "MANIFEST.json").read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "unreadable"
    return _digest({name: entry.get("sha256") for name, entry in files.items()})


def pqa_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pqa")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree that is not installed
        return "unknown"


def check_resume(checkpoints: Iterable[Path], fingerprint: Mapping[str, Any], force: bool,
                 what: str, defaults: Optional[Mapping[str, Any]] = None) -> List[str]:
    """Refuse (CheckpointError, one line) to continue ``checkpoints`` under another fingerprint, unless
    ``force``; returns the differences that ``force`` let through, one line per checkpoint. ``defaults``:
    the config's default values (dotted keys), to recognise keys added since a checkpoint was written."""
    forced = []
    for checkpoint in checkpoints:
        saved = saved_fingerprint(checkpoint)
        if saved is not None and saved.get("digest") == fingerprint["digest"]:
            continue
        if saved is None:
            why = "was written by a pqa that did not record what produced it"
        else:
            values = saved.get("values") or {}
            keys = differences(values, fingerprint["values"], defaults or {})
            if not keys:
                continue
            why = "was made under another configuration: " + describe_differences(values, fingerprint["values"], keys)
        if force:
            forced.append(f"{checkpoint} {why}")
            continue
        raise CheckpointError(f"{what}: {checkpoint} {why}; resume with the same configuration and data, or add "
                              "force_resume=True to continue it anyway (recorded in the run)")
    return forced


def check_fresh(output_dir: Path) -> None:
    """A run that is not a resume must not start in a folder that already holds checkpoints."""
    found = sorted(Path(output_dir).glob("checkpoints/*/*/MANIFEST.json"))
    if found:
        raise UsageError(f"output_dir={output_dir} already holds checkpoints ({found[0].parent}): this run would "
                         f"load them as its own; continue that run with resume={output_dir}, or choose another "
                         "output_dir")


def saved_fingerprint(checkpoint: Path) -> Optional[Dict[str, Any]]:
    try:
        saved = json.loads((Path(checkpoint) / "MANIFEST.json").read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None
    return saved if isinstance(saved, dict) else None


def differences(saved: Mapping[str, Any], current: Mapping[str, Any], defaults: Mapping[str, Any]) -> List[str]:
    """The keys whose values differ, less a key the saved fingerprint lacks (added to pqa later) that the
    run leaves at its default, and a key a checkpoint recorded before it joined ``NOT_WEIGHTS``: neither
    can have changed the weights."""
    def added_at_default(key):
        return key not in saved and key in defaults and current.get(key, _MISSING) == defaults[key]

    return sorted(k for k in set(saved) | set(current)
                  if saved.get(k, _MISSING) != current.get(k, _MISSING) and not added_at_default(k)
                  and k not in NOT_WEIGHTS)  # not excluded(): data.corpus.sha256 is the file's content


def describe_differences(saved: Mapping[str, Any], current: Mapping[str, Any], keys: List[str], most: int = 6) -> str:
    """``seed=5 (now 9), data.corpus.sha256=3f2a1c9e… (now 8d01b2c4…)`` for ``keys``, at most ``most`` of them."""
    shown = [f"{k}={_short(saved.get(k, _MISSING))} (now {_short(current.get(k, _MISSING))})" for k in keys[:most]]
    more = f" and {len(keys) - most} more" if len(keys) > most else ""
    return ", ".join(shown) + more


class _Missing:
    def __repr__(self):
        return "unset"


_MISSING = _Missing()


def _short(value) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:10] + "…"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _digest(values: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=repr).encode()).hexdigest()
