"""Recovery files: what a run could not store, kept on local disk until ``pqa db recover``.

When a run ends, the observer first writes everything the run store does not hold yet (the
final run document with the run's real status, queued metric points, artifacts) into one
file, ``<failure_dir>/pqa_unstored_run<id>_<time>_<pid>_<n>.json``, and only then talks to the
store; once the store holds it all, the file is deleted. So an interrupted or timed-out end
loses nothing. The file is MongoDB extended JSON (never pickle: recovery runs no code from
it), written whole or not at all, private to the user, with secrets scrubbed. It names its
database and collections. Files of format 1 (one file per kind) are still read.
"""
from __future__ import annotations

import itertools
import os
import re
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from bson import json_util

from pqa_core.storage.atomic import write_atomic

from pqa_experiments.store.urls import Scrubber

PREFIX = "pqa_unstored_"
FORMAT = 2
FILE_RE = re.compile(rf"^{re.escape(PREFIX)}(metrics|artifacts|run)_run(\d+)_.*\.json$")
_counter = itertools.count()


def write(failure_dir, record: Dict[str, Any], scrub: Scrubber) -> Path:
    """Write ``record`` (a dict with ``run_id``) as a new recovery file; returns its path.

    Atomic (temp file, fsync, rename) and ``0600`` in a ``0700`` folder; a value JSON cannot
    hold is kept as its text, as Sacred stores such values. Raises ``OSError`` when the disk refuses it.
    """
    folder = Path(failure_dir)
    os.makedirs(folder, mode=0o700, exist_ok=True)  # run data is private
    name = f"{PREFIX}run_run{record['run_id']}_{time.strftime('%Y%m%d-%H%M%S')}_{os.getpid()}_{next(_counter)}.json"
    data = scrub.data(json_util.dumps({"format": FORMAT, **record},
                                      json_options=json_util.RELAXED_JSON_OPTIONS, default=str).encode())
    path = folder / name
    write_atomic(path, data, permissions=0o600, fsync=True)  # whole or absent: recover never reads half a file
    return path


def find(failure_dir) -> Tuple[List[dict], List[str]]:
    """(loadable records, each with its ``path``, oldest first; names of files skipped with the reason).

    Each record has ``run_id``, ``database``, ``runs_collection``, ``metrics_collection``,
    ``final`` (the status the run ended with, or None) and ``payload`` with any of ``run`` (the
    run document), ``metrics`` (``{name: [steps, values, timestamps]}``) and ``artifacts``.
    """
    records, skipped = [], []
    folder = Path(failure_dir)
    if not folder.is_dir():
        return records, skipped
    for path in sorted(folder.iterdir()):
        if not path.is_file() or not path.name.startswith(PREFIX):
            continue
        if not FILE_RE.match(path.name):
            skipped.append(f"{path.name}: not a JSON recovery file (pickle and text files are never loaded)")
            continue
        try:
            record = json_util.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            skipped.append(f"{path.name}: unreadable ({str(exc).splitlines()[0][:200]})")
            continue
        payload = _payload(record)
        if payload is None:
            skipped.append(f"{path.name}: unknown recovery file format")
            continue
        record.update(payload=payload, path=path)
        records.append(record)
    return records, skipped


def _payload(record) -> Optional[Dict[str, Any]]:
    """The payload in format 2's shape; format 1 held one kind per file."""
    if not isinstance(record, dict) or not isinstance(record.get("payload"), dict):
        return None
    if record.get("format") == FORMAT:
        return record["payload"]
    if record.get("format") == 1 and record.get("kind") in ("run", "metrics", "artifacts"):
        kind, payload = record["kind"], record["payload"]
        return {"run": payload} if kind == "run" else {kind: payload[kind]}
    return None
