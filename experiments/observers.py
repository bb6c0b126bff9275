"""Sacred 0.8.7's MongoObserver, with the holes that lose or leak data closed.

Use::

    target = db.ensure_database(mongo_url)          # starts/pings the store first
    obs = make_mongo_observer(target.url, target.db_name)
    ex.observers.append(obs)
    ex.run(...)
    obs.raise_for_losses()                           # PqaError if anything was not stored

What is fixed, and why:

* **Metric series over the 16 MiB document limit.** Sacred ``$push``-es a
  whole series into one ``metrics`` document. A series of ~390k points (three
  arrays, ~43 bytes a point) no longer fits: pymongo refuses the update (or the
  server refuses the grown document, code 10334), Sacred's ``_safe_call``
  swallows the error, drops the observer for the rest of the run, and the run
  still ends COMPLETED with no metrics. Here a series is split into
  continuation documents ``{run_id, name, chunk: k, n, steps, values,
  timestamps}`` of at most :data:`CHUNK_POINTS` points; chunk 0 is the document
  Sacred tools (Omniboard) already read, :func:`read_metric` reads them all.
  Points that cannot be written stay queued and are retried on the next
  heartbeat; writes are guarded by the stored count ``n`` so a retry after a
  lost reply never duplicates points. Whatever is still unwritten when the run
  ends is dumped to ``failure_dir``, the run is stored as FAILED, and
  :meth:`PqaMongoObserver.raise_for_losses` raises. The observer itself never
  raises from a heartbeat, so Sacred never silently drops it. An artifact
  that could not be stored is retried at the next heartbeat and at the end.
  Dumps are MongoDB extended JSON (never pickle) naming the database, the run
  and the status the run really ended with; ``pqa db recover``
  (:mod:`.recovery`) uploads them once the store is back.
* **Heartbeat race.** Sacred joins the heartbeat thread for only 2 s before
  ``completed_event``; the final metrics flush can take longer. We join the
  stopping heartbeat thread before finishing the run.
* **No indexes.** :func:`ensure_indexes` (run on observer creation) indexes
  ``metrics`` on ``(run_id, name, chunk)`` (unique; serves ``run_id`` queries)
  and ``runs`` on ``status``, ``start_time``, ``experiment.name``.
* **Git repository without a commit.** Sacred's ``get_commit_if_possible``
  reads ``repo.head.commit`` and raises ``ValueError: Reference at
  'refs/heads/master' does not exist`` while *constructing the Experiment*.
  Importing this module replaces it (:func:`install_sacred_fixes`) with one
  built on :func:`git_info`, which returns None instead, and also redacts
  credentials in the remote URL (``https://user:token@host/...``).
* **Credentials.** The URL (and its password) must never be stored. Every run
  document (config, meta/options, host, command, captured_out, info, result,
  fail_trace) is scrubbed before each write: the URL, its password and any
  ``scheme://user:pass@`` become ``***``. Uploaded source files are scrubbed
  the same way. Passwords shorter than :data:`MIN_SECRET_LEN` are only
  scrubbed as part of a URL (replacing every "ab" in a log would wreck it).
  Artifacts (possibly huge binaries) are stored as given.
* **Captured output.** Sacred re-stores the whole captured stdout every
  heartbeat; a chatty run passes 16 MiB and the run document stops updating.
  It is cut to :data:`CAPTURED_OUT_LIMIT` characters (head and tail kept, with
  a marker saying how much was dropped).
* Sacred stores source files again for every run because pymongo 4's GridFS
  has no ``md5``; we store the digest so unchanged sources are shared.

SecantusDB quirks measured here (0.7.0b3, ``--sync-on-commit``): an update
costs time proportional to the *existing* document (appending 100 points to a
50k-point document takes ~0.56 s, to a 5k-point one ~0.06 s), hence the small
:data:`CHUNK_POINTS`; and an upsert that creates a document is ~5x slower than
an insert (80 chunks of 5k points: 2.7 s vs 0.57 s), hence inserts for new
chunks. A wildcard index (``config.$**``) is accepted but the planner never
uses it (COLLSCAN), so none is made.
"""
from __future__ import annotations

import itertools
import logging
import os
import sys
import threading
import time
from pathlib import Path

import pymongo
import pymongo.errors
from bson import json_util
from sacred.observers.mongo import MongoObserver, force_bson_encodeable
from sacred.serializer import flatten
from sacred.utils import IntervalTimer, ObserverError

from pqa_core.errors import PqaError

from . import settings

log = logging.getLogger(__name__)

CHUNK_POINTS = 5_000
CAPTURED_OUT_LIMIT = 1_000_000
MIN_SECRET_LEN = 4
HEARTBEAT_JOIN_S = 300.0
FINAL_FLUSH_ATTEMPTS = 3
DUMP_PREFIX = "pqa_unstored_"
DUMP_FORMAT = 1
_dump_counter = itertools.count()


# --------------------------------------------------------------------------- git


def git_info(path: str | os.PathLike) -> dict | None:
    """``{url, commit, dirty, root}`` of the git repository holding ``path``, else None.

    None for: no repository, a repository without any commit, no git, or any
    git error. ``url`` is the ``origin`` remote with credentials redacted
    (``git:/<root>`` without a remote), as Sacred records it.
    """
    try:
        from git import Repo

        p = Path(path)
        repo = Repo(p if p.is_dir() else p.parent, search_parent_directories=True)
    except Exception:
        return None
    try:
        if not repo.head.is_valid():
            return None  # `git init` but nothing committed yet
        commit = repo.head.commit.hexsha
        try:
            url = settings.redact_text(repo.remote().url)
        except ValueError:
            url = "git:/" + str(repo.working_dir)
        return {"url": url, "commit": commit, "dirty": repo.is_dirty(), "root": str(repo.working_dir)}
    except Exception:
        return None
    finally:
        repo.close()


def _safe_get_commit_if_possible(filename, save_git_info):
    """Drop-in for ``sacred.dependencies.get_commit_if_possible`` that cannot crash."""
    if save_git_info is False:
        return None, None, None
    info = git_info(os.path.dirname(os.path.abspath(filename)))
    if info is None:
        return None, None, None
    return info["url"], info["commit"], info["dirty"]


_SACRED_GET_COMMIT = None


def install_sacred_fixes() -> None:
    """Patch Sacred's git lookup (idempotent). Runs on import of this module."""
    global _SACRED_GET_COMMIT
    import sacred.dependencies as deps

    if deps.get_commit_if_possible is not _safe_get_commit_if_possible:
        _SACRED_GET_COMMIT = deps.get_commit_if_possible
        deps.get_commit_if_possible = _safe_get_commit_if_possible


install_sacred_fixes()


# --------------------------------------------------------------------------- scrubbing


class _Scrubber:
    """Replaces secrets (and any URL credentials) in strings, bytes and containers."""

    def __init__(self, secrets):
        self.secrets = sorted(
            {s for s in secrets if s and (len(s) >= MIN_SECRET_LEN or "://" in s)}, key=len, reverse=True
        )
        self._bsecrets = [s.encode() for s in self.secrets]

    def text(self, s: str) -> str:
        if "://" not in s and not any(x in s for x in self.secrets):
            return s
        return settings.redact_text(s, self.secrets)

    def data(self, b: bytes) -> bytes:
        if not any(x in b for x in self._bsecrets) and b"://" not in b:
            return b
        return settings.redact_text(b.decode("utf-8", "surrogateescape"), self.secrets).encode(
            "utf-8", "surrogateescape"
        )

    def __call__(self, obj):
        if isinstance(obj, str):
            return self.text(obj)
        if isinstance(obj, dict):
            return {self(k): self(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self(v) for v in obj]
        if isinstance(obj, tuple):  # namedtuples too; BSON stores them as arrays anyway
            return tuple(self(v) for v in obj)
        if isinstance(obj, bytes):
            return self.data(obj)
        return obj


def _truncate_output(text: str, limit: int = CAPTURED_OUT_LIMIT) -> str:
    if not isinstance(text, str) or len(text) <= limit:
        return text
    head = limit // 10
    dropped = len(text) - limit
    marker = f"\n[... pqa: {dropped} characters of captured output dropped (16 MiB document limit) ...]\n"
    return text[:head] + marker + text[-(limit - head):]


# --------------------------------------------------------------------------- indexes / reading


def ensure_indexes(database, collection_prefix: str = "") -> None:
    """Indexes Sacred never creates; idempotent and cheap when they exist."""
    prefix = f"{collection_prefix}_" if collection_prefix else ""
    metrics, runs = database[f"{prefix}metrics"], database[f"{prefix}runs"]
    metrics.create_index(
        [("run_id", pymongo.ASCENDING), ("name", pymongo.ASCENDING), ("chunk", pymongo.ASCENDING)],
        unique=True,
        name="pqa_run_id_name_chunk",
    )
    runs.create_index("status", name="pqa_status")
    runs.create_index("start_time", name="pqa_start_time")
    runs.create_index("experiment.name", name="pqa_experiment_name")


def read_metric(database, run_id, name: str, collection_prefix: str = "", with_timestamps: bool = False):
    """The whole series ``(steps, values)`` (plus ``timestamps``) across continuation documents."""
    prefix = f"{collection_prefix}_" if collection_prefix else ""
    fields = {"steps": 1, "values": 1, "chunk": 1, **({"timestamps": 1} if with_timestamps else {})}
    steps, values, stamps = [], [], []
    cursor = database[f"{prefix}metrics"].find({"run_id": run_id, "name": name}, fields)
    for doc in cursor.sort("chunk", pymongo.ASCENDING):
        steps.extend(doc.get("steps", []))
        values.extend(doc.get("values", []))
        stamps.extend(doc.get("timestamps", []))
    return (steps, values, stamps) if with_timestamps else (steps, values)


# --------------------------------------------------------------------------- observer


class PqaMongoObserver(MongoObserver):
    """MongoObserver that chunks metrics, never drops data silently, never stores secrets."""

    def __init__(self, *, client, db_name: str, failure_dir, secrets=(), collection_prefix: str = "", **kwargs):
        super().__init__(
            client=client, db_name=db_name, collection_prefix=collection_prefix, failure_dir=failure_dir, **kwargs
        )
        self._scrub = _Scrubber(secrets)
        self._lock = threading.RLock()
        self._pending: dict[str, tuple[list, list, list]] = {}
        self._chunks: dict[str, tuple[int, int]] = {}  # name -> (chunk, points in it)
        self._info: dict | None = None
        self._metric_error: BaseException | None = None
        self._warned: set[str] = set()
        self._pending_artifacts: list[dict] = []
        self._artifact_error: BaseException | None = None
        self._final: dict | None = None  # how the run really ended, kept in dumps for ``pqa db recover``
        self._dumped = False
        self.losses: list[str] = []  # data that did not reach the database (read by raise_for_losses)

    def __repr__(self):
        return f"PqaMongoObserver({self.runs.full_name})"

    # -- metrics --------------------------------------------------------------------------

    def log_metrics(self, metrics_by_name, info):
        """Queue the new points and write what can be written; never raises (see module doc)."""
        with self._lock:
            self._info = info
            for name, m in metrics_by_name.items():
                steps, values, stamps = self._pending.setdefault(name, ([], [], []))
                steps.extend(m["steps"])
                values.extend(m["values"])
                stamps.extend(m["timestamps"])
            err = self._flush_metrics(info)
            if err is not None:
                self._warn("metrics", f"metrics not stored yet, will retry: {self._scrub.text(str(err))[:300]}")

    def _chunk_state(self, name: str) -> tuple[int, int]:
        if name not in self._chunks:
            last = self.metrics.find_one(
                {"run_id": self.run_entry["_id"], "name": name}, {"chunk": 1, "n": 1}, sort=[("chunk", -1)]
            )
            if last is None:
                self._chunks[name] = (0, 0)
            elif "n" not in last:  # a plain Sacred document (overwritten run): start after it
                self._chunks[name] = ((last.get("chunk") or 0) + 1, 0)
            else:
                self._chunks[name] = (last["chunk"], last["n"])
        return self._chunks[name]

    def _flush_metrics(self, info) -> BaseException | None:
        """Write all pending points; returns the first error (those points stay queued).

        One failing series (say, a value BSON cannot encode) does not hold back the others.
        """
        first_error = None
        for name in list(self._pending):
            steps, values, stamps = self._pending[name]
            while steps:
                try:
                    chunk, count = self._chunk_state(name)
                    if count >= CHUNK_POINTS:
                        chunk, count = chunk + 1, 0
                    k = min(len(steps), CHUNK_POINTS - count)
                    written = self._push(name, chunk, count, steps[:k], values[:k], stamps[:k], info)
                except Exception as exc:  # noqa: BLE001 - anything: keep the points, report later
                    first_error = first_error or exc
                    if isinstance(exc, pymongo.errors.ConnectionFailure):
                        self._metric_error = first_error
                        return first_error  # the store is down: don't wait it out once per series
                    break
                del steps[:written], values[:written], stamps[:written]
                self._chunks[name] = (chunk, count + written)
            if not steps:
                del self._pending[name]
        self._metric_error = first_error
        return first_error

    def _push(self, name, chunk, count, steps, values, stamps, info) -> int:
        """Add points to chunk ``chunk``, which must hold ``count``; returns how many landed.

        A new chunk is an insert (SecantusDB: ~5x cheaper than an upsert), a
        partial one gets a ``$push`` guarded by ``n == count``. Either way a
        retry after a lost reply cannot duplicate points: the insert hits the
        unique index, the guarded update misses, and the stored ``n`` tells how
        many of the queued points are already there.
        """
        run_id = self.run_entry["_id"]
        key = {"run_id": run_id, "name": name, "chunk": chunk}
        if count == 0:
            try:
                result = self.metrics.insert_one(
                    {**key, "n": len(steps), "steps": steps, "values": values, "timestamps": stamps}
                )
                if chunk == 0:
                    info.setdefault("metrics", []).append({"name": name, "id": str(result.inserted_id)})
                return len(steps)
            except pymongo.errors.DuplicateKeyError:
                pass
        else:
            result = self.metrics.update_one(
                {**key, "n": count},
                {
                    "$push": {"steps": {"$each": steps}, "values": {"$each": values}, "timestamps": {"$each": stamps}},
                    "$inc": {"n": len(steps)},
                },
            )
            if result.matched_count:
                return len(steps)
        doc = self.metrics.find_one(key, {"n": 1})
        stored = doc.get("n") if doc else None
        if stored is None or not count < stored <= count + len(steps):
            self._chunks.pop(name, None)
            raise ObserverError(
                f"metric {name!r} of run {run_id}: chunk {chunk} holds {stored} points, expected {count}; "
                "another writer?"
            )
        if chunk == 0 and count == 0 and not any(m.get("name") == name for m in info.get("metrics", [])):
            info.setdefault("metrics", []).append({"name": name, "id": str(doc["_id"])})
        return stored - count

    def _drain_metrics(self) -> None:
        """Let the stopping heartbeat finish, then flush what is left (retrying connection errors)."""
        me = threading.current_thread()
        for t in threading.enumerate():
            if isinstance(t, IntervalTimer) and t is not me and t.stopped.is_set():
                t.join(HEARTBEAT_JOIN_S)
        with self._lock:
            for attempt in range(FINAL_FLUSH_ATTEMPTS):
                err = self._flush_metrics(self._info if self._info is not None else {})
                if err is None or not isinstance(err, pymongo.errors.ConnectionFailure):
                    break
                time.sleep(1.0 + attempt)
            if self._info is not None:
                self.run_entry["info"] = flatten(self._info)
            if self._pending:
                self._record_metric_loss()
            if self._pending_artifacts:
                self._retry_artifacts()
            if self._pending_artifacts:
                self._record_artifact_loss()

    def _record_metric_loss(self) -> None:
        total = sum(len(p[0]) for p in self._pending.values())
        where = self._dump(
            "metrics", {"run_id": self.run_entry["_id"], "metrics": self._pending, "error": repr(self._metric_error)}
        )
        self.losses.append(
            f"{total} metric points of run {self.run_entry['_id']} ({', '.join(sorted(self._pending))}) "
            f"were not stored: {self._scrub.text(str(self._metric_error))[:300]}; saved to {where}"
        )
        self._pending = {}

    def _record_artifact_loss(self) -> None:
        names = ", ".join(a["name"] for a in self._pending_artifacts)
        where = self._dump("artifacts", {"run_id": self.run_entry["_id"], "artifacts": self._pending_artifacts,
                                         "error": repr(self._artifact_error)})
        self.losses.append(f"artifacts of run {self.run_entry['_id']} ({names}) were not stored: "
                           f"{self._scrub.text(str(self._artifact_error))[:300]}; saved to {where}")
        self._pending_artifacts = []

    def _retry_artifacts(self) -> None:
        """Store artifacts whose first attempt failed; those that fail again stay queued."""
        with self._lock:
            pending, self._pending_artifacts = self._pending_artifacts, []
            for i, artifact in enumerate(pending):
                try:
                    self._store_artifact(**artifact)
                except Exception as exc:  # noqa: BLE001
                    self._artifact_error = exc
                    self._pending_artifacts = pending[i:]
                    return

    def _store_artifact(self, name, filename, metadata=None, content_type=None) -> None:
        if not any(a.get("name") == name for a in self.run_entry.get("artifacts", [])):
            super().artifact_event(name, filename, metadata=metadata, content_type=content_type)
        else:
            self.save()

    def _dump(self, what: str, payload) -> str:
        """Keep unstored data on local disk and say where: MongoDB extended JSON (never pickle, so
        ``pqa db recover`` runs no code from it), else a readable repr; secrets scrubbed."""
        record = {
            "format": DUMP_FORMAT, "kind": what, "run_id": self.run_entry["_id"],
            "database": self.runs.database.name, "runs_collection": self.runs.name,
            "metrics_collection": self.metrics.name, "final": self._final, "payload": payload,
        }  # fmt: skip
        try:
            os.makedirs(self.failure_dir, mode=0o700, exist_ok=True)  # run data is private
            stamp = time.strftime("%Y%m%d-%H%M%S")
            name = f"{DUMP_PREFIX}{what}_run{self.run_entry['_id']}_{stamp}_{os.getpid()}_{next(_dump_counter)}"
            path = Path(self.failure_dir) / f"{name}.json"
            try:
                data = json_util.dumps(record, json_options=json_util.RELAXED_JSON_OPTIONS).encode()
            except Exception:  # a value JSON cannot hold: keep a readable record instead
                path, data = path.with_suffix(".txt"), repr(record).encode()
            tmp = path.with_name(f".{path.name}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(self._scrub.data(data))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # whole or absent: recover never reads half a file
            self._dumped = self._dumped or path.suffix == ".json"
            return str(path)
        except OSError as exc:
            return f"nowhere ({exc.strerror})"

    # -- run lifecycle ---------------------------------------------------------------------

    def heartbeat_event(self, info, captured_out, beat_time, result):
        # Never raise: Sacred would stop calling log_metrics for the rest of the run.
        try:
            super().heartbeat_event(info, captured_out, beat_time, result)
        except Exception as exc:  # noqa: BLE001
            self._warn("heartbeat", f"run document not updated: {self._scrub.text(str(exc))[:300]}")
            return
        if self._pending_artifacts:
            self._retry_artifacts()

    def artifact_event(self, name, filename, metadata=None, content_type=None):
        try:
            super().artifact_event(name, filename, metadata=metadata, content_type=content_type)
        except Exception as exc:  # noqa: BLE001 - retried later; a loss (dumped) only if that fails too
            if any(a.get("name") == name for a in self.run_entry.get("artifacts", [])):
                return  # stored; only the run document update failed, and the next save carries it
            with self._lock:
                self._pending_artifacts.append(
                    {"name": name, "filename": str(filename), "metadata": metadata, "content_type": content_type})
                self._artifact_error = exc
            self._warn("artifact", f"artifact {name!r} not stored yet, will retry: {self._scrub.text(str(exc))[:300]}")

    def resource_event(self, filename):
        try:
            super().resource_event(filename)
        except Exception as exc:  # noqa: BLE001
            self.losses.append(f"resource {filename} was not recorded: {self._scrub.text(str(exc))[:300]}")

    def completed_event(self, stop_time, result):
        self._final = {"status": "COMPLETED", "fail_trace": None}
        self._drain_metrics()
        if self.losses:  # finished, but not everything is in the database: say so in the record
            self.run_entry.update(
                stop_time=stop_time,
                result=flatten(result),
                status="FAILED",
                fail_trace=["pqa: the run finished but not all of its data was stored:\n"]
                + [f"pqa: {loss}\n" for loss in self.losses],
            )
            # The drain has just waited out FINAL_FLUSH_ATTEMPTS server selections: don't wait ten more.
            down = isinstance(self._metric_error or self._artifact_error, pymongo.errors.ConnectionFailure)
            self.final_save(attempts=3 if down else 10)
        else:
            super().completed_event(stop_time, result)
        self._raise_losses()

    def interrupted_event(self, interrupt_time, status):
        self._final = {"status": status, "fail_trace": None}
        self._drain_metrics()
        super().interrupted_event(interrupt_time, status)
        self._raise_losses()

    def failed_event(self, fail_time, fail_trace):
        self._final = {"status": "FAILED", "fail_trace": list(fail_trace or [])}
        self._drain_metrics()
        if self.losses:
            fail_trace = list(fail_trace) + [f"pqa: {loss}\n" for loss in self.losses]
        super().failed_event(fail_time, fail_trace)
        self._raise_losses()

    def _raise_losses(self):
        # Said, not raised: Sacred would only log the exception with a traceback. raise_for_losses()
        # after the run sets the exit code.
        if self.losses:
            print(f"pqa: ERROR: {'; '.join(self.losses)}", file=sys.stderr)

    def raise_for_losses(self) -> None:
        """After the run: :class:`PqaError` if any metric, artifact or resource was not stored."""
        if self.losses:
            hint = "; upload it with `pqa db recover` once the database is back" if self._dumped else ""
            raise PqaError("run data not stored: " + "; ".join(self.losses) + hint)

    # -- writes: every run document goes through the scrubber ------------------------------

    def _sanitize(self) -> None:
        entry = dict(self.run_entry)
        if "captured_out" in entry:
            entry["captured_out"] = _truncate_output(entry["captured_out"])
        self.run_entry = self._scrub(entry)

    def insert(self):
        self._sanitize()
        return super().insert()

    def save(self):
        self._sanitize()
        return super().save()

    def final_save(self, attempts):
        self._sanitize()
        for i in range(attempts):
            try:
                self.runs.update_one({"_id": self.run_entry["_id"]}, {"$set": self.run_entry}, upsert=True)
                return
            except pymongo.errors.ConnectionFailure:
                if i < attempts - 1:
                    time.sleep(1)
            except pymongo.errors.InvalidDocument:
                # Sacred's fallback (str() of what BSON can't hold), scrubbed again.
                self.run_entry = self._scrub(force_bson_encodeable(self.run_entry))
                print("pqa: warning: parts of the run entry were not BSON-serializable and were stringified", file=sys.stderr)
        where = self._dump("run", self.run_entry)
        self.losses.append(f"final state of run {self.run_entry['_id']} was not stored; saved to {where}")

    def save_sources(self, ex_info):
        """Sacred's version, plus scrubbing and an ``md5`` field so unchanged sources are reused."""
        base_dir = ex_info["base_dir"]
        source_info = []
        for source_name, md5 in ex_info["sources"]:
            abs_path = os.path.join(base_dir, source_name)
            found = self.fs.find_one({"filename": abs_path, "md5": md5})
            if found is not None:
                file_id = found._id
            else:
                with open(abs_path, "rb") as f:
                    file_id = self.fs.put(self._scrub.data(f.read()), filename=abs_path, md5=md5)
            source_info.append([source_name, file_id])
        return source_info

    def _warn(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("pqa MongoObserver: %s", msg)


def make_mongo_observer(
    url: str,
    db_name: str | None = None,
    *,
    failure_dir: str | os.PathLike | None = None,
    collection_prefix: str = "",
    extra_secrets=(),
    create_indexes: bool = True,
    index_timeout: float = 10.0,
    **client_kwargs,
) -> PqaMongoObserver:
    """A :class:`PqaMongoObserver` writing to ``db_name`` (default: URL path, else ``pqa``).

    Creates the indexes right away, so an unreachable store fails here (one
    :class:`PqaError` line, password redacted) rather than mid-run. Unstored
    data goes to ``failure_dir`` (default ``<data_dir>/failed_runs``).
    """
    settings.validate_url(url)
    db_name = db_name or settings.db_name_from_url(url)
    secrets = list(settings.url_secrets(url)) + list(extra_secrets)
    try:
        client = pymongo.MongoClient(url, appname="pqa", **client_kwargs)
    except (pymongo.errors.ConfigurationError, ValueError, TypeError) as exc:
        raise PqaError(f"invalid MongoDB URL {settings.redact_url(url)}: {settings.redact_text(str(exc), secrets)}") from None
    obs = PqaMongoObserver(
        client=client,
        db_name=db_name,
        collection_prefix=collection_prefix,
        failure_dir=str(failure_dir or settings.data_dir() / "failed_runs"),
        secrets=secrets,
    )
    if create_indexes:
        try:
            with pymongo.timeout(index_timeout):
                ensure_indexes(client[db_name], collection_prefix)
        except pymongo.errors.PyMongoError as exc:
            client.close()
            reason = settings.redact_text(str(exc).splitlines()[0].split(", Timeout:")[0], secrets)[:300]
            raise PqaError(f"cannot prepare the run store {settings.redact_url(url)}: {reason}") from None
    return obs
