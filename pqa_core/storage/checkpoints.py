"""Checkpoints: safetensors + JSON only, written atomically, verified before loading.

A checkpoint is a folder::

    model.safetensors        doc_vectors, z_to_embedding.*, selector.*, query_encoder.*
    documents.json           which document each doc_vectors row holds ([doc_id, part] per row)
    adapter/                 LoRA adapter (peft save_pretrained, safetensors)
    optimizer.safetensors    optimizer state tensors, flattened ("state.<param>.<key>")
    rng.safetensors          torch (and CUDA) RNG state
    state.json               step, epoch, training seconds so far, optimizer param groups, python/numpy RNG, config,
                             model signature
    MANIFEST.json            sha256 and size of every file above, and the run's fingerprint
                             (``fingerprint.py``: what produced the weights); written last

It is built in a temp folder beside its final place and renamed in one step, so a crash leaves
either the whole checkpoint or none. Loading checks the manifest first: a torn, truncated or
edited checkpoint is refused, and so is one holding a NaN or infinite weight. ``check_loadable`` runs
those checks, and the model signature's, before a run starts; optimizer state of other param groups is refused in one line. Nothing is ever unpickled.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pqa_core.storage.atomic import atomic_directory, sha256_file
from pqa_core.errors import CheckpointError
from pqa_core.storage.fingerprint import CONFIG_KEY as FINGERPRINT_KEY
from pqa_core.components.kinds import MODEL_KINDS

MANIFEST = "MANIFEST.json"
DOCUMENTS = "documents.json"
FORMAT_VERSION = 1


# --- what is saved -----------------------------------------------------------------------------
def trainable_state(model) -> Dict[str, torch.Tensor]:
    """The model's own (non-LLM) tensors, by name."""
    state = {"doc_vectors": model.doc_vectors.detach()}
    for prefix in (kind.model_attribute for kind in MODEL_KINDS):
        for name, tensor in getattr(model, prefix).state_dict().items():
            state[f"{prefix}.{name}"] = tensor.detach()
    return {k: v.contiguous().cpu() for k, v in state.items()}


def model_signature(model, config_dict: Dict[str, Any]) -> Dict[str, Any]:
    """What must match for a checkpoint to fit a model."""
    return _signature(config_dict, model.num_docs, int(model.doc_vectors.shape[1]), bool(model.lora_parameters()))


def config_signature(config_dict: Dict[str, Any], num_docs: int) -> Dict[str, Any]:
    """The signature a model built from ``config_dict`` will have, known before building it (``d_z``
    is None when the config leaves it to the projection, ``model.d_z=0``)."""
    model_cfg = config_dict.get("model", {})
    return _signature(config_dict, num_docs, model_cfg.get("d_z") or None,
                      bool(model_cfg.get("lora", {}).get("enabled")))


def _signature(config_dict: Dict[str, Any], num_docs: int, d_z, lora: bool) -> Dict[str, Any]:
    model_cfg = config_dict.get("model", {})
    lora_cfg = model_cfg.get("lora", {})
    return {
        "llm": model_cfg.get("llm"),
        "num_docs": num_docs,
        "d_z": d_z,
        "num_memory_tokens": model_cfg.get("num_memory_tokens"),
        "components": {kind.name: config_dict.get(kind.name, {}).get("name") for kind in MODEL_KINDS},
        "lora": lora,
        # the adapter's tensor shapes (absent from checkpoints written before they were recorded)
        "lora_r": lora_cfg.get("r") if lora else None,
        "lora_target_modules": sorted(lora_cfg.get("target_modules") or []) if lora else None,
    }


def _flatten_optimizer(optimizer) -> tuple:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for param_id, param_state in sd["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"state.{param_id}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{param_id}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> Dict[str, Any]:
    state: Dict[int, Dict[str, Any]] = {}
    for name, tensor in tensors.items():
        _, param_id, key = name.split(".", 2)
        state.setdefault(int(param_id), {})[key] = tensor
    for name, value in meta.get("scalars", {}).items():
        param_id, key = name.split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _load_optimizer(optimizer, file: Path, meta: Dict[str, Any]) -> None:
    """Restore the optimizer, or refuse in one line naming ``file``: state saved for other param
    groups (another model, size or training setting) must not load, nor fail later inside torch."""
    try:
        saved = _unflatten_optimizer(_load_tensors(file), meta)
        problem = _optimizer_mismatch(optimizer.param_groups, saved)
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{file}: unreadable optimizer state ({type(exc).__name__}: {exc})") from None
    if problem is None:
        try:
            optimizer.load_state_dict(saved)
            return
        except (ValueError, KeyError, RuntimeError, TypeError) as exc:
            problem = str(exc).strip().splitlines()[0][:300]
    raise CheckpointError(f"{file}: optimizer state of another model or training setting ({problem}); "
                          f"saved param groups {_describe_groups(saved['param_groups'])}, "
                          f"this run has {_describe_groups(optimizer.param_groups)}")


def _optimizer_mismatch(groups, saved: Dict[str, Any]) -> Optional[str]:
    """Why ``saved`` does not fit param groups ``groups`` (None if it does)."""
    saved_groups = saved["param_groups"]
    if len(saved_groups) != len(groups):
        return f"{len(saved_groups)} param groups saved, {len(groups)} here"
    for i, (group, saved_group) in enumerate(zip(groups, saved_groups)):
        name = group.get("name", i)
        if saved_group.get("name", name) != name:
            return f"param group {i} is {saved_group.get('name')!r} in the checkpoint, {name!r} here"
        if len(saved_group["params"]) != len(group["params"]):
            return f"param group {name!r} has {len(saved_group['params'])} tensors saved, {len(group['params'])} here"
        for param_id, param in zip(saved_group["params"], group["params"]):
            for key, value in saved["state"].get(param_id, {}).items():
                # a state tensor has the parameter's shape, or one value per row (row-wise optimizers)
                if torch.is_tensor(value) and value.dim() > 0 and value.shape not in (param.shape, param.shape[:1]):
                    return (f"{key} of a tensor in param group {name!r} has shape {list(value.shape)}, "
                            f"the tensor has {list(param.shape)}")
    return None


def _describe_groups(groups) -> str:
    return "[" + ", ".join(f"{g.get('name', i)}: {len(g['params'])} tensors" for i, g in enumerate(groups)) + "]"


def _rng_state() -> tuple:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, meta


def _restore_rng(tensors: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = meta["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))


# --- writing -----------------------------------------------------------------------------------
def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def save_checkpoint(path, model, optimizer=None, *, step: int, epoch: int, step_in_epoch: int = 0,
                    config: Optional[Dict[str, Any]] = None, phase: str = "", metrics: Optional[dict] = None,
                    scheduler=None, seconds: Optional[float] = None) -> Path:
    """Write a checkpoint folder at ``path`` atomically; an existing one there is replaced. The
    fingerprint the pipeline puts in ``config`` (``fingerprint.CONFIG_KEY``) goes to the manifest.
    ``seconds``: the phase's training time so far, resumes included (state.json's ``seconds``)."""
    path = Path(path)
    config = dict(config or {})
    fingerprint = config.pop(FINGERPRINT_KEY, None)
    with atomic_directory(path) as tmp:
        save_file(trainable_state(model), str(tmp / "model.safetensors"))
        if getattr(model, "row_ids", None) is not None:
            (tmp / DOCUMENTS).write_text(json.dumps(model.row_ids))
        if model.lora_parameters():
            model.llm.save_pretrained(str(tmp / "adapter"), safe_serialization=True)
        state: Dict[str, Any] = {
            "format": FORMAT_VERSION, "phase": phase, "step": step, "epoch": epoch,
            "step_in_epoch": step_in_epoch, "metrics": metrics or {}, "config": config,
            "signature": model_signature(model, config),
        }
        if seconds is not None:
            state["seconds"] = round(float(seconds), 3)
        if optimizer is not None:
            tensors, meta = _flatten_optimizer(optimizer)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            state["optimizer"] = meta
        if scheduler is not None:
            state["scheduler"] = scheduler.state_dict()
        rng_tensors, rng_meta = _rng_state()
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        state["rng"] = rng_meta
        (tmp / "state.json").write_text(json.dumps(state, indent=1, default=_json_default))
        files = {str(p.relative_to(tmp)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {"format": FORMAT_VERSION, "files": files, **({"fingerprint": fingerprint} if fingerprint else {})}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=_json_default))
        _fsync_tree(tmp)
    return path


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    if torch.is_tensor(value):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable in checkpoint state: {type(value).__name__}")


# --- reading -----------------------------------------------------------------------------------
def verified_manifest(path: Path, what: str, required: Optional[str] = None) -> Dict[str, Any]:
    """``path/MANIFEST.json``, every file it lists checked for size and sha256 (a torn, truncated or edited
    ``what`` is refused, naming the file); ``required``: a file it must list."""
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        files = {name: (int(entry["bytes"]), str(entry["sha256"])) for name, entry in manifest["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({type(exc).__name__}: {exc})") from None
    if required and required not in files:
        raise CheckpointError(f"{manifest_path}: lists no {required} (not a pqa {what})")
    for name, (size, digest) in files.items():
        file = path / name
        if not file.exists():
            raise CheckpointError(f"{file}: listed in {MANIFEST} but missing (torn {what})")
        if file.stat().st_size != size or sha256_file(file) != digest:
            raise CheckpointError(f"{file}: contents do not match {MANIFEST} (corrupt or half-written {what})")
    return manifest


def verify_checkpoint(path) -> Dict[str, Any]:
    """Check the manifest against every file; returns state.json. Raises CheckpointError if torn/corrupt."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no checkpoint here")
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        raise CheckpointError(f"{path}: incomplete checkpoint ({MANIFEST} missing; the write was interrupted)")
    manifest = verified_manifest(path, "checkpoint", required="state.json")
    try:
        state = json.loads((path / "state.json").read_text())
    except ValueError as exc:
        raise CheckpointError(f"{path / 'state.json'}: not valid JSON ({exc})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path / 'state.json'}: expected a JSON object")
    return state


def check_loadable(path, config_dict: Dict[str, Any], num_docs: int, row_ids=None, grow: bool = False,
                   tensor_names=None) -> Dict[str, Any]:
    """What loading would refuse, found before anything is built or stored: a torn or edited
    checkpoint, a tensor file that is not safetensors, a checkpoint of another model or size (with
    ``grow``: one whose documents are not all among ``row_ids``, this run's ``[doc_id, part]`` rows).
    With ``tensor_names`` (the model's, ``contract.model_tensor_names``), ``model.safetensors`` must hold
    exactly those. Costs a hash and a read of each file. Returns state.json."""
    path = Path(path)
    state = verify_checkpoint(path)
    for file in sorted(path.rglob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                names = list(handle.keys())
                if tensor_names is not None and file == path / "model.safetensors" and set(names) != set(tensor_names):
                    missing, extra = sorted(set(tensor_names) - set(names)), sorted(set(names) - set(tensor_names))
                    raise CheckpointError(f"{file}: tensors of another model (missing {missing[:3]}, unexpected "
                                          f"{extra[:3]})")
                if file.name != "rng.safetensors":  # weights and optimizer moments: a NaN in them is a NaN run
                    for name in names:
                        _check_finite_blocks(handle, name, file)
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{file}: not a valid safetensors file ({exc})") from None
    saved, current = state.get("signature", {}), config_signature(config_dict, num_docs)
    if current["d_z"] is None:  # known once the LLM is loaded; the load itself compares it
        current["d_z"] = saved.get("d_z")
    if grow and saved.get("num_docs") != num_docs and row_ids is not None:
        _row_map(path, row_ids)  # every saved document must be among this run's
        current["num_docs"] = saved.get("num_docs")
    _compare_signatures(saved, current, path)
    return state


def check_finite(name: str, tensor: torch.Tensor, file) -> None:
    """A floating-point tensor of a checkpoint holds only finite numbers, or one CheckpointError line."""
    if tensor.is_floating_point() and tensor.numel():
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{file}: tensor {name!r} holds non-finite values (NaN or inf); the run that "
                                  "wrote it diverged, so it cannot be loaded")


def _check_finite_blocks(handle, name: str, file, block_values: int = 1 << 24) -> None:
    """``check_finite`` on a tensor of an open safetensors file, read in blocks of rows (a large doc table
    is never in memory whole)."""
    part = handle.get_slice(name)
    shape = part.get_shape()
    if not part.get_dtype().startswith(("F", "BF")):
        return
    if len(shape) == 0:
        return check_finite(name, handle.get_tensor(name), file)
    row = max(1, int(np.prod(shape[1:])))
    rows = max(1, block_values // row)
    for start in range(0, shape[0], rows):
        check_finite(name, part[start:start + rows], file)


def _row_map(path: Path, row_ids) -> list:
    """For each saved row, its row in a table of documents ``row_ids``; refuses what is not there."""
    file = Path(path) / DOCUMENTS
    if not file.exists():
        raise CheckpointError(f"{path}: the checkpoint does not record its documents ({DOCUMENTS}), so it "
                              f"cannot start a table of another size")
    try:
        saved = [tuple(r) for r in json.loads(file.read_text())]
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{file}: unreadable ({exc})") from None
    where = {tuple(r): i for i, r in enumerate(row_ids)}
    missing = [r for r in saved if r not in where]
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} of its {len(saved)} documents are not in this run's corpus "
                              f"(e.g. doc_id {missing[0][0]!r} part {missing[0][1]})")
    return [where[r] for r in saved]


def _load_tensors(file: Path) -> Dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{file}: not a valid safetensors file ({exc})") from None


def check_signature(state: Dict[str, Any], model, config: Dict[str, Any], path) -> None:
    _compare_signatures(state.get("signature", {}), model_signature(model, config), path)


def _compare_signatures(saved: Dict[str, Any], current: Dict[str, Any], path) -> None:
    for key in ("llm", "num_docs", "d_z", "num_memory_tokens", "components", "lora", "lora_r",
                "lora_target_modules"):
        if key.startswith("lora_") and key not in saved:
            continue  # recorded only since they were added to the signature
        if saved.get(key) != current.get(key):
            raise CheckpointError(f"{path}: checkpoint was made for {key}={saved.get(key)!r}, "
                                  f"this model has {key}={current.get(key)!r}")


def load_checkpoint(path, model, optimizer=None, *, config: Optional[Dict[str, Any]] = None,
                    restore_rng: bool = True, scheduler=None, grow: bool = False) -> Dict[str, Any]:
    """Load a verified checkpoint into ``model`` (and optimizer/RNG); returns its state.json.

    With ``grow`` the model's table may hold more documents than the checkpoint's (documents added to
    the corpus): the saved rows are copied to the rows of the same documents (``model.row_ids``), the
    others keep their initial values, and ``state["loaded_rows"]`` lists the rows that were loaded."""
    path = Path(path)
    state = verify_checkpoint(path)
    tensors = _load_tensors(path / "model.safetensors")
    saved_rows = tensors["doc_vectors"].shape[0] if "doc_vectors" in tensors else None
    rows = None
    if grow and saved_rows is not None and saved_rows != model.num_docs:
        rows = _row_map(path, model.row_ids)
        full = model.doc_vectors.detach().clone().cpu()
        full[rows] = tensors["doc_vectors"].to(full.dtype)
        tensors["doc_vectors"] = full
        state = {**state, "signature": {**state.get("signature", {}), "num_docs": model.num_docs}}
    if config is not None:
        check_signature(state, model, config, path)
    state["loaded_rows"] = rows if rows is not None else list(range(model.num_docs))
    expected = trainable_state(model)
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise CheckpointError(f"{path}: checkpoint of another model (missing {missing[:3]}, unexpected {extra[:3]})")
    for name, tensor in tensors.items():
        check_finite(name, tensor, path / "model.safetensors")
        if tensor.shape != expected[name].shape:
            raise CheckpointError(f"{path}: {name} has shape {list(tensor.shape)} in the checkpoint, "
                                  f"{list(expected[name].shape)} in this model")
    with torch.no_grad():
        device = model.doc_vectors.device
        model.doc_vectors.copy_(tensors["doc_vectors"].to(device))
        for prefix in (kind.model_attribute for kind in MODEL_KINDS):
            sub = {k[len(prefix) + 1:]: v.to(device) for k, v in tensors.items() if k.startswith(prefix + ".")}
            getattr(model, prefix).load_state_dict(sub, strict=True)
    adapter = path / "adapter" / "adapter_model.safetensors"
    if model.lora_parameters():
        if not adapter.exists():
            raise CheckpointError(f"{path}: the model has LoRA but the checkpoint has no adapter")
        from peft import set_peft_model_state_dict

        try:
            set_peft_model_state_dict(model.llm, _load_tensors(adapter))
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{adapter}: LoRA adapter of another shape "
                                  f"({str(exc).strip().splitlines()[-1][:300]})") from None
    if optimizer is not None and "optimizer" in state:
        _load_optimizer(optimizer, path / "optimizer.safetensors", state["optimizer"])
    if scheduler is not None and "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng and "rng" in state:
        _restore_rng(_load_tensors(path / "rng.safetensors"), state["rng"])
    return state


def latest_checkpoint(root) -> Optional[Path]:
    """The highest-step complete checkpoint under ``root`` (folders named ``step-NNNNNNN``), or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    candidates = sorted(p for p in root.glob("step-*") if (p / MANIFEST).exists())
    return candidates[-1] if candidates else None


def checkpoint_position(path) -> Optional[Dict[str, int]]:
    """Where a checkpoint folder was written (its state.json): ``step`` (global), ``epoch`` and
    ``step_in_epoch``; None when it cannot be read (torn: loading it refuses it, naming the file)."""
    try:
        state = json.loads((Path(path) / "state.json").read_text())
        return {key: int(state.get(key) or 0) for key in ("step", "epoch", "step_in_epoch")}
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def resume_checkpoint(root, batches_per_epoch: Optional[int] = None) -> Optional[Path]:
    """What a phase under ``root`` goes on from: its latest complete ``step-*`` checkpoint, or its ``final``
    when that is further (a finished phase asked for more), or as far and at the end of an epoch
    (``batches_per_epoch``; else either): a final written where a step budget stopped mid-epoch counts
    that epoch as done, so the step checkpoint beside it is the exact place."""
    root = Path(root)
    latest = latest_checkpoint(root)
    final = root / "final"
    if not (final / MANIFEST).exists():
        return latest
    at_final, at_latest = checkpoint_position(final), checkpoint_position(latest) if latest else None
    if at_latest is None or at_final is None:
        return final if at_latest is None else latest
    if at_final["step"] > at_latest["step"] or (at_final["step"] == at_latest["step"] and (
            batches_per_epoch is None or at_latest["step_in_epoch"] >= batches_per_epoch)):
        return final
    return latest


def step_dir(root, step: int) -> Path:
    return Path(root) / f"step-{step:07d}"
