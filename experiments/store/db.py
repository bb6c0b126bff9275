"""The embedded run store: a SecantusDB daemon that pqa starts on demand.

SecantusDB runs as a separate, detached process (``python -m secantus``): it is
never imported here or in a training process, because it is pure Python (its
threads would share the trainer's GIL) and GPL-2.0 (a separate process keeps
the licences apart). Only ``importlib.util.find_spec`` looks for it, which
locates the package without executing it.

Layout under ``<data_dir>/db`` (``data_dir`` defaults to ``settings.data_dir()``)::

    data/             WiredTiger home (--storage-path)
    secantusd.json    state: pid, port, host, started_at (written once it answers)
    secantusd.log     daemon stdout+stderr, appended across restarts
    secantusd.toml    empty config passed with --config (disables auto-discovery
                      of ./secantusd.toml, ~/.secantus/..., /etc/secantus/...)
    .lock             flock held while starting/stopping

:func:`stop` opens one throwaway TCP connection after the SIGTERM: closing the
listening socket does not wake SecantusDB's ``accept()`` thread, which would
otherwise wait out a join. What else this server does differently from mongod,
and what was measured, is in docs/run-store-notes.md.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from pqa_core.errors import PqaError, UsageError
from pqa_core.storage.atomic import write_atomic

from pqa_experiments.store import settings
from pqa_experiments.store.urls import describe_error, redact_text, redact_url, url_secrets, validate_url

STATE_FILE = "secantusd.json"
LOG_FILE = "secantusd.log"
CONFIG_FILE = "secantusd.toml"
LOCK_FILE = ".lock"
STORAGE_DIR = "data"

# Started through a short-lived shim so that the daemon is never our child:
# no zombie to reap, no "subprocess still running" warning, and it survives us.
_SPAWN_SHIM = (
    "import subprocess, sys\n"
    "log = open(sys.argv[1], 'ab')\n"
    "p = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=log,\n"
    "                     stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)\n"
    "print(p.pid, flush=True)\n"
)


def db_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """``<data_dir>/db``; ``data_dir`` defaults to :func:`settings.data_dir`."""
    return Path(data_dir if data_dir is not None else settings.data_dir()).expanduser() / "db"


def _url(port: int) -> str:
    return settings.embedded_url(port)


# --------------------------------------------------------------------------- process helpers


def _pid_alive(pid: int) -> bool:
    """True for a live process; a zombie (exited, not yet reaped) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): trust kill(0)
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def _is_secantus(pid: int) -> bool:
    """Guards against a recycled pid: the process must be a SecantusDB daemon."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False if Path("/proc/self").exists() else True
    except OSError:
        return True
    return b"secantus" in cmdline


def _ping(url: str, timeout: float) -> bool:
    import pymongo

    client = pymongo.MongoClient(
        url,
        serverSelectionTimeoutMS=max(1, int(timeout * 1000)),
        connectTimeoutMS=max(1, int(timeout * 1000)),
        directConnection=True,
        appname="pqa-db",
    )
    try:
        client.admin.command("ping")
        return True
    except Exception:
        return False
    finally:
        client.close()


PORT_RELEASE_S = 10.0  # a stopped server's listening socket can outlive its pid briefly on a loaded machine


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((settings.EMBEDDED_HOST, port))
        except OSError:
            return False
    return True


def _read_state(d: Path) -> dict | None:
    try:
        state = json.loads((d / STATE_FILE).read_text())
        int(state["pid"]), int(state["port"])
        return state
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_state(d: Path, state: dict) -> None:
    write_atomic(d / STATE_FILE, json.dumps(state, indent=1))


def _clear_state(d: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (d / STATE_FILE).unlink()


def _log_tail(d: Path, since: int = 0, lines: int = 3) -> str:
    try:
        with open(d / LOG_FILE, "rb") as f:
            f.seek(since)
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    tail = [ln.strip() for ln in text.splitlines() if ln.strip()][-lines:]
    return " | ".join(tail) if tail else "(log is empty)"


@contextlib.contextmanager
def _locked(d: Path):
    """Serialise start/stop across processes (two ``pqa`` commands at once)."""
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)  # run data is private
        f = open(d / LOCK_FILE, "a+")
    except OSError as exc:
        raise PqaError(f"cannot use database directory {d}: {exc.strerror}") from None
    with f:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - non-POSIX
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _live_state(d: Path) -> dict | None:
    """The state file if its pid is a live SecantusDB process, else None (stale file removed)."""
    state = _read_state(d)
    if state is None:
        return None
    pid = int(state["pid"])
    if _pid_alive(pid) and _is_secantus(pid):
        return state
    _clear_state(d)
    return None


# --------------------------------------------------------------------------- public API


def ensure_running(
    data_dir: str | os.PathLike | None = None,
    port: int | None = None,
    timeout: float = 30.0,
) -> str:
    """URL of the embedded server, starting it if needed; reuses a live one.

    A running server is reused when its pid is alive and it answers a ping.
    ``port`` (else ``$PQA_DB_PORT``) must then match the running one; without
    either, whatever port it runs on is fine. Waits up to ``timeout`` seconds
    for a fresh daemon to answer, else raises :class:`PqaError` with the log tail.
    """
    explicit_port = port is not None or bool(os.environ.get("PQA_DB_PORT", "").strip())
    d = db_dir(data_dir)
    with _locked(d):
        state = _live_state(d)
        if state is not None:
            running = int(state["port"])
            wanted = settings.db_port(port) if explicit_port else running
            if wanted != running:
                raise PqaError(
                    f"the embedded database in {d} already runs on port {running}, not {wanted}; "
                    "stop it first (pqa db stop)"
                )
            if _ping(_url(running), timeout=min(timeout, 5.0)):
                return _url(running)
            raise PqaError(
                f"the embedded database (pid {state['pid']}) runs but does not answer on "
                f"port {running}; see {d / LOG_FILE} or run pqa db stop"
            )
        return _start(d, settings.db_port(port), timeout)


def _start(d: Path, port: int, timeout: float) -> str:
    if importlib.util.find_spec("secantus") is None:
        raise PqaError(
            "SecantusDB is not installed in this Python environment "
            "(pip install SecantusDB==0.7.0b3), or give --mongo-url / PQA_MONGO_URL"
        )
    if not _port_free(port):
        raise PqaError(
            f"port {port} on {settings.EMBEDDED_HOST} is in use by another program; "
            "set PQA_DB_PORT to a free port"
        )
    try:
        (d / STORAGE_DIR).mkdir(parents=True, exist_ok=True)
        cfg = d / CONFIG_FILE
        if not cfg.exists():
            cfg.write_text("# Managed by pqa: passing --config disables SecantusDB's config auto-discovery.\n")
        log = d / LOG_FILE
        with open(log, "ab") as f:
            f.write(f"--- pqa: starting SecantusDB on port {port} at {_now()} ---\n".encode())
        log_offset = log.stat().st_size
    except OSError as exc:
        raise PqaError(f"cannot prepare database directory {d}: {exc.strerror}") from None
    cmd = [
        sys.executable, "-m", "secantus",
        "--config", str(cfg),
        "--host", settings.EMBEDDED_HOST,
        "--port", str(port),
        "--storage-path", str(d / STORAGE_DIR),
        "--sync-on-commit",
    ]  # fmt: skip
    t0 = time.monotonic()
    shim = subprocess.run(
        [sys.executable, "-c", _SPAWN_SHIM, str(log), *cmd],
        cwd=d, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    try:
        pid = int(shim.stdout.strip())
    except ValueError:
        raise PqaError(f"could not launch SecantusDB: {shim.stderr.strip().splitlines()[-1:]}") from None
    url = _url(port)
    deadline = t0 + timeout
    while True:  # the deadline first: past it, an answer came too late (the launch itself counts)
        if time.monotonic() > deadline:
            _terminate(pid, port, timeout=5.0)
            raise PqaError(
                f"the embedded database did not answer on port {port} within {timeout:g}s; "
                f"{log} ends with: {_log_tail(d, log_offset)}"
            )
        if _ping(url, timeout=0.25):
            break
        if not _pid_alive(pid):
            raise PqaError(
                f"the embedded database exited during startup (port {port}, data {d}); "
                f"{log} ends with: {_log_tail(d, log_offset)}"
            )
        time.sleep(0.05)
    _write_state(
        d,
        {
            "pid": pid,
            "port": port,
            "host": settings.EMBEDDED_HOST,
            "url": url,
            "started_at": _now(),
            "startup_s": round(time.monotonic() - t0, 3),
            "storage_path": str(d / STORAGE_DIR),
        },
    )
    return url


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _wait_dead(pid: int, timeout: float, port: int | None = None) -> bool:
    deadline = time.monotonic() + timeout
    poke_at = time.monotonic() + 0.05
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        if port is not None and time.monotonic() >= poke_at:
            # Wake SecantusDB's accept() thread so its shutdown doesn't wait out a 2 s join.
            poke_at = float("inf")
            with contextlib.suppress(OSError):
                socket.create_connection((settings.EMBEDDED_HOST, port), timeout=0.2).close()
        time.sleep(0.02)
    return True


def _terminate(pid: int, port: int | None, timeout: float) -> None:
    """SIGTERM, wait ``timeout``, then SIGKILL (WiredTiger recovers from its log on restart); then wait
    (bounded) for the port to be released, so a restart right after a stop finds it free."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not _wait_dead(pid, timeout, port):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if not _wait_dead(pid, 5.0):
            raise PqaError(f"the embedded database (pid {pid}) survived SIGKILL")
    released = time.monotonic() + PORT_RELEASE_S
    while port is not None and not _port_free(port) and time.monotonic() < released:
        time.sleep(0.05)


def stop(data_dir: str | os.PathLike | None = None, timeout: float = 15.0) -> bool:
    """Stop the embedded server; True if one was running. SIGKILL after ``timeout`` s."""
    d = db_dir(data_dir)
    with _locked(d):
        state = _live_state(d)
        if state is None:
            return False
        _terminate(int(state["pid"]), int(state["port"]), timeout)
        _clear_state(d)
        return True


def status(data_dir: str | os.PathLike | None = None) -> dict:
    """``running``, ``answering``, ``pid``, ``port``, ``url`` and the paths (JSON-able)."""
    d = db_dir(data_dir)
    state = _read_state(d)
    alive = state is not None and _pid_alive(int(state["pid"])) and _is_secantus(int(state["pid"]))
    port = int(state["port"]) if alive else None
    return {
        "running": alive,
        "answering": bool(alive and _ping(_url(port), timeout=2.0)),
        "pid": int(state["pid"]) if alive else None,
        "port": port,
        "url": _url(port) if alive else None,
        "started_at": state.get("started_at") if alive else None,
        "data_dir": str(d.parent),
        "db_dir": str(d),
        "log_file": str(d / LOG_FILE),
        "state_file": str(d / STATE_FILE),
    }


def check_reachable(url: str, timeout: float = 5.0) -> None:
    """Raise :class:`PqaError` (one line, password redacted) unless ``url`` answers a ping.

    Call before training starts: Sacred would otherwise only notice when it
    writes the first run document, after 30 s of server selection.
    """
    import pymongo
    import pymongo.errors as perr

    validate_url(url)
    secrets = url_secrets(url)
    shown = redact_url(url)
    try:
        client = pymongo.MongoClient(
            url,
            serverSelectionTimeoutMS=max(1, int(timeout * 1000)),
            connectTimeoutMS=max(1, int(timeout * 1000)),
            appname="pqa",
        )
    except (perr.ConfigurationError, ValueError, TypeError) as exc:
        raise UsageError(f"invalid MongoDB URL {shown}: {describe_error(exc, secrets)}") from None
    try:
        client.admin.command("ping")
    except perr.OperationFailure as exc:
        reason = (exc.details or {}).get("errmsg") or describe_error(exc, secrets)
        raise PqaError(f"MongoDB at {shown} refused pqa: {redact_text(reason, secrets)}") from None
    except perr.PyMongoError as exc:
        raise PqaError(
            f"cannot reach MongoDB at {shown} within {timeout:g}s: {describe_error(exc, secrets)}"
        ) from None
    finally:
        client.close()


def ensure_database(explicit_url: str | None = None, timeout: float = 5.0) -> settings.MongoTarget:
    """Resolve the run store and make sure it answers: start the embedded one, ping any other.

    What the ``pqa`` CLI calls before a run; every failure is one :class:`PqaError` line.
    """
    target = settings.resolve_mongo(explicit_url)
    if target.embedded:
        url = ensure_running()
        return settings.MongoTarget(url=url, db_name=target.db_name, source=target.source)
    check_reachable(target.url, timeout=timeout)
    return target
