"""Whole-or-nothing writes: a file or folder is built beside its final place and renamed over it in one
step (``os.replace``), so a reader, a crash or a second process sees the old one or the new one, never
half of either. Every such write in pqa goes through ``atomic_file`` / ``write_atomic`` / ``atomic_directory``."""
from __future__ import annotations

import functools
import hashlib
import itertools
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

_counter = itertools.count()


@contextmanager
def atomic_file(target, *, permissions: int = 0o666, fsync: bool = False) -> Iterator[Path]:
    """Yield a new empty file's path beside ``target`` (same suffix: ``savefig`` reads the format from
    it); when the block succeeds it replaces ``target``, else it is removed. ``permissions`` before the
    umask (``0o600``: private); ``fsync``: on disk before the rename (a file that must survive a crash)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.stem}.tmp-{os.getpid()}-{next(_counter)}{target.suffix}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, permissions))
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_atomic(target, data: Union[str, bytes], *, permissions: int = 0o666, fsync: bool = False) -> Path:
    """``target`` holds ``data`` (text is written as UTF-8 with ``\n`` line ends), whole or not at all."""
    with atomic_file(target, permissions=permissions, fsync=fsync) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            with open(tmp, "w", encoding="utf-8", newline="\n") as handle:
                handle.write(data)
    return Path(target)


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
