"""What a run keeps in its output folder, and the check that an output a user names stays inside it.

A run's folder holds pqa's own files and folders (:data:`OWN`); an output whose name comes from the
config (``eval.predictions_file``: :data:`OUTPUT_NAME_KEYS`) must be a plain file name in that folder:
no folder part, not absolute, not hidden, and none of pqa's own names, so it can neither write
outside the run nor overwrite the run's checkpoints. Checked with the config, before the run exists.
"""
from __future__ import annotations

import re

from pqa_core.errors import UsageError
from pqa_core.storage.run_lock import LOCK_FILE

CHECKPOINTS = "checkpoints"
TABLES = "tables"  # memory-mapped doc tables (model.doc_storage=mmap)
CACHE = "cache"  # a write objective's cache (distill's teacher targets)
RESULT = "result.json"
OWN = (CHECKPOINTS, TABLES, CACHE, RESULT, LOCK_FILE)

OUTPUT_NAME_KEYS = ("eval.predictions_file",)
_PLAIN = re.compile(r"^[^/\\\x00-\x1f]+$")


def check_output_name(key: str, value: str) -> None:
    """``value`` (config key ``key``) as a file name inside the run's folder, or one UsageError line."""
    why = None
    if not isinstance(value, str) or not value.strip():
        why = "is empty"
    elif not _PLAIN.match(value) or value in (".", ".."):
        why = "has a folder part" if ("/" in value or "\\" in value) else "is not a plain file name"
    elif value.startswith("."):
        why = "is a hidden name"
    elif value in OWN or value.lower() in OWN:
        why = "is one of pqa's own files in the run folder"
    if why:
        raise UsageError(f"config key {key!r} = {value!r} {why}: it must be a plain file name inside the run's "
                         f"folder (such as predictions.jsonl), none of {', '.join(OWN)}")
