"""Whole-or-nothing writes: a folder is built beside its final place and renamed in one step."""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_directory(target, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temp folder; when the block succeeds it becomes ``target``.

    With ``replace=False`` an existing ``target`` wins (another process finished first) and the
    new folder is discarded. On an exception nothing is left behind.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if not target.exists():
            os.replace(tmp, target)
        elif replace:
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path, remember: bool = False) -> str:
    """The file's sha256. ``remember``: computed once per process while the file's size and modification
    time stay the same (a run's data files: its pre-flight, record and fingerprint all ask); never for a
    check of a file's integrity, where a rewrite within one clock tick must still be seen."""
    if not remember:
        return _sha256.__wrapped__(str(path), 0, 0)
    stat = os.stat(path)
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
