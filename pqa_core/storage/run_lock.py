"""One process per output folder: an OS file lock (``fcntl.flock``) on ``<folder>/.pqa-run.lock``.

Two processes writing the same checkpoints would leave neither run resumable, so a second run in
a folder, or a resume of a run that is still alive, is refused with one line. The kernel drops the
lock when its process dies, ``kill -9`` included, so a crashed run's folder can be resumed at once;
the stale lock file it leaves is harmless.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Dict, Iterator, List, Optional

from pqa_core.errors import PqaError

LOCK_FILE = ".pqa-run.lock"
_held: Dict[str, List[int]] = {}  # real path of a folder this process holds -> [fd, depth]


class FolderInUseError(PqaError):
    """Another live process holds the folder's lock."""


@contextlib.contextmanager
def output_folder_lock(folder) -> Iterator[Path]:
    """Hold ``folder``'s lock for the block, creating the folder if needed; re-entrant within a process
    (the CLI takes it before the run starts, the pipeline again inside). On exit the lock file goes,
    and so do the folders this created if they are still empty: a failed start leaves nothing."""
    folder = Path(folder)
    key = os.path.realpath(folder)
    if key in _held:
        _held[key][1] += 1
        try:
            yield folder
        finally:
            _held[key][1] -= 1
        return
    created = _first_missing(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        fd = _acquire(folder)
    except BaseException:
        _remove_empty_dirs(created)
        raise
    _held[key] = [fd, 1]
    try:
        yield folder
    finally:
        del _held[key]
        with contextlib.suppress(OSError):
            os.unlink(folder / LOCK_FILE)  # before the lock is dropped: see _acquire's inode check
        os.close(fd)
        _remove_empty_dirs(created)


def _acquire(folder: Path) -> int:
    """Lock ``folder/LOCK_FILE`` without waiting; returns the open descriptor (closing it unlocks)."""
    path = folder / LOCK_FILE
    for _ in range(20):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise FolderInUseError(
                f"{folder}: in use by another pqa run (pid {holder or 'unknown'}, lock {path}); two runs must "
                "not write the same checkpoints: wait for it to end or stop it, then resume") from None
        except OSError as exc:
            os.close(fd)
            raise PqaError(f"{path}: cannot lock the output folder: {exc.strerror or exc}") from None
        # The holder before us may have unlinked the file between our open and our lock: only a lock
        # on the file that is still at ``path`` counts.
        with contextlib.suppress(FileNotFoundError):
            if _same_file(os.fstat(fd), os.stat(path)):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return fd
        os.close(fd)
    raise PqaError(f"{path}: cannot lock the output folder (the lock file keeps being replaced)")


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _first_missing(path: Path) -> Optional[Path]:
    """The outermost folder of ``path`` (itself included) that does not exist yet, or None."""
    missing = None
    for folder in [path, *path.parents]:
        if folder.exists():
            break
        missing = folder
    return missing


def _remove_empty_dirs(root: Optional[Path]) -> None:
    """Remove empty folders under ``root`` (and ``root`` if it ends up empty); files are never touched."""
    if root is None or not root.is_dir():
        return
    for folder, _, _ in sorted(os.walk(root), key=lambda w: -len(w[0])):
        with contextlib.suppress(OSError):
            os.rmdir(folder)
