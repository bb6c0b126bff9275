"""Config files given after ``with``: YAML or JSON data, read by pqa, never code.

``pqa run pipeline with configs/phase1_poc.yaml read.top_k=5`` applies the file as Sacred applies a
named config: its values override the defaults and earlier named configs, ``key=value`` overrides
win over it. Sacred itself would also unpickle a ``.pickle`` (running its code) and read YAML with
a loader that builds Python objects, so pqa reads the file itself (``yaml.SafeLoader``, ``json``)
and hands Sacred a plain dict; any other file type is refused before Sacred sees it. The seed
notebook's key names are read as pqa's (``SEED_KEYS``) with one warning line each; an unknown key,
or a value of the wrong type or range, is one error naming the file and the key.

A config file is bounded before it is parsed: at most :data:`MAX_BYTES`, no YAML aliases (``*name``:
a few nested ones make a file of a few hundred bytes expand to gigabytes), and a key written twice in
one mapping is an error, not the last one silently winning.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Dict, List, Tuple

import yaml

from pqa_core.config import PQAConfig
from pqa_core.errors import UsageError

SUFFIXES = (".yaml", ".yml", ".json")
MAX_BYTES = 1_000_000  # a config file is a few hundred lines; the run document that holds it is at most 16 MiB
# The seed notebook's names (configs/phase1_poc.yaml there) -> pqa's.
SEED_KEYS = {"read_phase": "read", "write_phase": "write", "model.llm_name": "model.llm"}


def looks_like_file(item: str) -> bool:
    """A ``with`` item that names a file: it has a path separator or a dot (a named config never has;
    Sacred would read ``a.b`` as an ingredient's config), or it exists."""
    return "/" in item or "." in item or Path(item).exists()


def load(path: str) -> Tuple[Dict[str, Any], List[str]]:
    """The file's values as a nested dict in pqa's key names, checked like the command line's; and the
    warning lines for seed keys renamed. Every problem is a UsageError naming the file."""
    file = Path(path)
    if file.suffix.lower() not in SUFFIXES:
        raise UsageError(f"config file {path}: only .yaml, .yml and .json files are read (config files are "
                         "data, never code); named configs: pqa run pipeline print_named_configs")
    try:
        if file.is_file() and file.stat().st_size > MAX_BYTES:
            raise UsageError(f"config file {path}: {file.stat().st_size} bytes, over the {MAX_BYTES} bytes (1 MB) a "
                             "config file may have")
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"config file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"config file {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    values = _parse(path, text, json_file=file.suffix.lower() == ".json")
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise UsageError(f"config file {path}: must hold a mapping of config keys, not a {type(values).__name__}")
    values, renamed = _rename_seed_keys(values)
    try:
        PQAConfig.from_dict(values)
    except UsageError as exc:
        written = [f"'{old}' for '{new}'" for old, new in renamed if f"'{new}." in str(exc) or f"'{new}'" in str(exc)]
        where = f" (the file writes {', '.join(written)})" if written else ""
        raise UsageError(f"config file {path}: {exc}{where}") from None
    return values, [f"warning: config file {path}: key '{old}' is read as '{new}' (pqa's name for it)"
                    for old, new in renamed]


def digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _parse(path: str, text: str, json_file: bool):
    if json_file:
        try:
            return json.loads(text, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as exc:
            raise UsageError(f"config file {path}, line {exc.lineno}: not valid JSON ({exc.msg})") from None
        except _DuplicateKey as exc:
            raise UsageError(f"config file {path}: not valid JSON (key {exc.args[0]!r} is written twice in one "
                             "object)") from None
    try:
        return yaml.load(text, Loader=_SafeLoader)  # noqa: S506 - a SafeLoader subclass: data only
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UsageError(f"config file {path}{where}: not valid YAML ({problem})") from None


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs):
    """json's object hook: a key written twice in one object is an error."""
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


class _SafeLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, also reading ``1e-4`` as a number (YAML 1.2 does; 1.1 wants ``1.0e-4``),
    refusing aliases (``*name``: the expansion of nested ones has no bound) and keys written twice."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"alias *{event.anchor} (aliases are not read in "
                                              "config files: write the values out)", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True) if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is written twice in one mapping",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_SafeLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                  re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                  list("-+0123456789"))


def _rename_seed_keys(values: Dict[str, Any]) -> Tuple[Dict[str, Any], List[Tuple[str, str]]]:
    """``values`` with the seed's keys under pqa's names, and the (old, new) pairs renamed."""
    values = {k: (dict(v) if isinstance(v, dict) else v) for k, v in values.items()}
    renamed = []
    for old, new in SEED_KEYS.items():
        old_parts, new_parts = old.split("."), new.split(".")
        parent = values
        for part in old_parts[:-1]:
            parent = parent.get(part) if isinstance(parent.get(part), dict) else None
            if parent is None:
                break
        if parent is None or old_parts[-1] not in parent:
            continue
        moved = parent.pop(old_parts[-1])
        target = values
        for part in new_parts[:-1]:
            target = target.setdefault(part, {})
        if isinstance(moved, dict) and isinstance(target.get(new_parts[-1]), dict):
            target[new_parts[-1]] = {**moved, **target[new_parts[-1]]}
        else:
            target[new_parts[-1]] = moved
        renamed.append((old, new))
    return values, renamed
