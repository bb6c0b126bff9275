"""The output-folder lock: another process is refused while the holder lives, and is let in as soon as
the holder dies, ``kill -9`` included (the kernel drops an flock with its process)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pqa_core.storage.run_lock import LOCK_FILE, FolderInUseError, output_folder_lock

HOLD = """
import sys, time
from pqa_core.storage.run_lock import output_folder_lock
with output_folder_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def hold_in_another_process(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_folder_held_by_a_live_process_is_refused_and_free_after_kill_9(tmp_path):
    folder = tmp_path / "run"
    holder = hold_in_another_process(folder)
    try:
        with pytest.raises(FolderInUseError) as info, output_folder_lock(folder):
            pass
        message = str(info.value)
        assert "\n" not in message and message.startswith(f"{folder}: in use by another pqa run (pid {holder.pid},")
        assert (folder / LOCK_FILE).read_text().strip() == str(holder.pid)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert (folder / LOCK_FILE).exists()  # a stale file is left behind, and does not matter
    with output_folder_lock(folder):
        assert (folder / LOCK_FILE).read_text().strip() == str(os.getpid())
    assert not (folder / LOCK_FILE).exists() and folder.is_dir()


def test_lock_is_reentrant_in_one_process_and_exclusive_across_processes(tmp_path):
    folder = tmp_path / "run"
    with output_folder_lock(folder):
        with output_folder_lock(tmp_path / "." / "run"):  # the same folder, another spelling
            pass
        assert (folder / LOCK_FILE).exists()  # the inner exit does not release it
        probe = subprocess.run([sys.executable, "-c", HOLD, str(folder)], capture_output=True, text=True, timeout=60)
        assert probe.returncode == 1 and "FolderInUseError" in probe.stderr and "held" not in probe.stdout
    assert not (folder / LOCK_FILE).exists()


def test_folders_it_created_go_when_they_stay_empty(tmp_path):
    with output_folder_lock(tmp_path / "a" / "b" / "run"):
        assert (tmp_path / "a" / "b" / "run").is_dir()
    assert not (tmp_path / "a").exists()
    with pytest.raises(RuntimeError), output_folder_lock(tmp_path / "a" / "run"):
        (tmp_path / "a" / "run" / "checkpoints").mkdir()
        raise RuntimeError("failed before writing a file")
    assert not (tmp_path / "a").exists()
    with output_folder_lock(tmp_path / "a" / "run"):
        (tmp_path / "a" / "run" / "result.json").write_text("{}")
    assert sorted(p.name for p in (tmp_path / "a" / "run").iterdir()) == ["result.json"]


def test_the_lock_is_not_inherited_by_child_processes(tmp_path):
    """A child (the embedded database a run may start) must not keep the folder locked after the run dies."""
    folder = tmp_path / "run"
    code = HOLD.replace('print("held", flush=True)',
                        'import subprocess; child = subprocess.Popen(["sleep", "600"], close_fds=False); '
                        'print(child.pid, flush=True)')
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    child = int(holder.stdout.readline())
    try:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        deadline = time.monotonic() + 10
        while True:
            try:
                with output_folder_lock(folder):
                    break
            except FolderInUseError:
                assert time.monotonic() < deadline, "the lock outlived its process"
                time.sleep(0.1)
    finally:
        os.kill(child, signal.SIGKILL)
