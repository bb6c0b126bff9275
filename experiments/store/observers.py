"""The run store's observer: Sacred 0.8.7's MongoObserver, changed so that a run's record can be trusted.

Use::

    target = db.ensure_database(mongo_url)          # starts/pings the store first
    obs = make_mongo_observer(target.url, target.db_name)
    ex.observers.append(obs)
    ex.run(...)
    obs.raise_for_losses()                           # PqaError if anything is not in the store

What it changes, and why:

* **Metric series** are written in chunks (:mod:`.metric_chunks`): no 16 MiB document limit,
  no point stored twice after a lost reply, points that could not be written retried.
* **The store going away loses nothing and holds nothing up.** During the run each write gives
  up after :data:`BEAT_IO_S` and is retried at the next heartbeat (training never waits). When
  the run ends, everything the store does not hold yet, the final record with the run's real
  status included, is first written to a recovery file (:mod:`.unstored`); then the store gets at
  most :data:`END_BUDGET_S` seconds, announced in one line. For the whole end Ctrl-C only sets a
  flag the waits check, so it stops the wait at any moment (twice included) without losing anything
  (Sacred's last heartbeat, which hands over the last points, is still awaited: at most the store
  attempts of a beat already under way, :data:`BEAT_IO_S` each, within the end's budget). Whatever it did not take stays in the
  file for ``pqa db recover``; :meth:`raise_for_losses` says so in one line. Sacred itself would
  wait minutes, drop the observer on the first error and store an interrupted end as INTERRUPTED.
* **Credentials.** Every run document (config, meta, host, command, captured output, info,
  result, fail trace), every source file and every recovery file is scrubbed of the URL's
  password and of any ``scheme://user:pass@`` (:class:`.urls.Scrubber`). Artifacts are stored as given.
* **Captured output** is cut to :data:`CAPTURED_OUT_LIMIT` characters (head and tail kept): Sacred
  re-stores all of it at every heartbeat and a chatty run would pass 16 MiB.
* **Sources** are stored once per digest (pymongo 4's GridFS has no ``md5``, so Sacred stores
  them again for every run).
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
import uuid

import bson.errors
import pymongo
import pymongo.errors
from sacred.observers.mongo import MongoObserver, force_bson_encodeable
from sacred.serializer import flatten
from sacred.utils import IntervalTimer

from pqa_core.errors import PqaError

from pqa_experiments.store import settings
from pqa_experiments.store import unstored
from pqa_experiments.store.metric_chunks import ChunkWriter, ensure_indexes, store_unreachable
from pqa_experiments.store.urls import Scrubber, db_name_from_url, describe_error, redact_url, url_secrets, validate_url

log = logging.getLogger(__name__)

CAPTURED_OUT_LIMIT = 1_000_000
BEAT_IO_S = 5.0  # one write during the run gives up after this; it is retried at the next heartbeat
END_BUDGET_S = 20.0  # every wait when a run ends, its last heartbeat included (Sacred adds up to 2 s before)
FIRST_ATTEMPT_S = 2.0  # the first try at the end: longer only once the user has been told
RETRY_PAUSE_S = 1.0
# Tests only: the end's wait for the store is held open (retrying) until this file exists, and the
# budget counts from then; an outage test's Ctrl-C then always meets the wait, however slow the machine.
HOLD_END_ENV = "PQA_TEST_HOLD_END_UNTIL"


def _truncate_output(text: str, limit: int = CAPTURED_OUT_LIMIT) -> str:
    if not isinstance(text, str) or len(text) <= limit:
        return text
    head = limit // 10
    dropped = len(text) - limit
    marker = f"\n[... pqa: {dropped} characters of captured output dropped (16 MiB document limit) ...]\n"
    return text[:head] + marker + text[-(limit - head):]


@contextlib.contextmanager
def _interrupts_noted(stop: threading.Event):
    """For the whole end of a run, Ctrl-C (and the SIGTERM the CLI turns into one) only sets ``stop``: the
    waits check it between their steps, so a signal at any moment, twice included, stops the wait within
    one store attempt (at most BEAT_IO_S) and never cuts a recovery file short or escapes as a traceback."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda signum, frame: stop.set())
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def wait_for_last_heartbeat(deadline: float) -> None:
    """Sacred's heartbeat thread makes one last beat after the run stops: it hands over the run's last
    points (the evaluation's), which the recovery file must hold. Ctrl-C does not cut this wait short:
    once the run ends a beat writes nothing (the end does), so the wait is at most the store attempts of
    a beat already under way (BEAT_IO_S each), and never past ``deadline``. (Cut short, it lost those points: a second
    Ctrl-C while a beat still tried a store that was down.)"""
    me = threading.current_thread()
    for thread in threading.enumerate():
        if isinstance(thread, IntervalTimer) and thread is not me and thread.stopped.is_set():
            while thread.is_alive() and time.monotonic() < deadline:
                thread.join(min(0.1, max(0.0, deadline - time.monotonic())))


class PqaMongoObserver(MongoObserver):
    """MongoObserver that chunks metrics, never loses data silently, never stores secrets."""

    def __init__(self, *, client, db_name: str, failure_dir, secrets=(), collection_prefix: str = "",
                 redacted_url: str = "", end_budget_s: float = END_BUDGET_S, **kwargs):
        super().__init__(
            client=client, db_name=db_name, collection_prefix=collection_prefix, failure_dir=failure_dir, **kwargs
        )
        self._scrub = Scrubber(secrets)
        self._where = redacted_url or f"database {db_name}"
        self.end_budget_s = end_budget_s
        self._lock = threading.RLock()
        self._writer: ChunkWriter | None = None
        self._info: dict | None = None  # Sacred's run.info, as the last heartbeat handed it over
        self._metric_error: BaseException | None = None
        self._pending_artifacts: list[dict] = []
        self._artifact_error: BaseException | None = None
        self._down = False  # the last write found the store not answering: don't wait for it again this beat
        self._ending = False  # the run has ended: the final record is this thread's job, heartbeats only queue
        self._final_stored = False
        self._finished = False  # the main function returned (main_finished)
        self._finished_result = None
        self._recovery_error = "no recovery file"
        self._warned: set[str] = set()
        self._announced = False
        self.recovery_file: str | None = None
        self.losses: list[str] = []  # what is not in the store (read by raise_for_losses)
        self.run_uuid: str | None = None  # the run's own id: the store's counter may be given again elsewhere
        self._not_created: str | None = None  # why the run document could not be stored (the run never started)

    def __repr__(self):
        return f"PqaMongoObserver({self.runs.full_name})"

    @property
    def writer(self) -> ChunkWriter:
        if self._writer is None or self._writer.run_id != self.run_entry["_id"]:
            self._writer = ChunkWriter(self.metrics, self.run_entry["_id"])
        return self._writer

    # -- during the run: bounded writes, never raising (Sacred would drop the observer) -----------

    def log_metrics(self, metrics_by_name, info):
        with self._lock:
            self._info = info
        for name, m in metrics_by_name.items():
            self.writer.add(name, m["steps"], m["values"], m["timestamps"])
        if not self._run_is_ending():
            self._flush_metrics(info, BEAT_IO_S)

    def _run_is_ending(self) -> bool:
        """True once the run stops: a heartbeat then only hands over its points, and the end stores them."""
        if self._ending or self._finished:
            return True
        thread = threading.current_thread()
        return isinstance(thread, IntervalTimer) and thread.stopped.is_set()

    def _flush_metrics(self, info, timeout: float) -> BaseException | None:
        with pymongo.timeout(timeout):
            error = self.writer.flush(info)
        self._metric_error = error
        self._down = error is not None and store_unreachable(error)
        if error is not None:
            self._warn("metrics", f"metrics not stored yet, will retry: {self._describe(error)}")
        return error

    def heartbeat_event(self, info, captured_out, beat_time, result):
        with self._lock:  # kept even when not stored now: the next save, or the end, carries it
            self.run_entry.update(info=flatten(info), captured_out=captured_out, heartbeat=beat_time,
                                  result=flatten(result))
            if self._down or self._run_is_ending():
                return  # this beat found the store away and the next one tries again; or the end stores it
        try:
            with pymongo.timeout(BEAT_IO_S):
                self.save()
        except Exception as exc:  # noqa: BLE001
            self._down = store_unreachable(exc)
            self._warn("heartbeat", f"run document not updated: {self._describe(exc)}")
            return
        if self._pending_artifacts and not self._run_is_ending():  # once the run ends, the end stores them
            self._retry_artifacts(BEAT_IO_S)

    def artifact_event(self, name, filename, metadata=None, content_type=None):
        artifact = {"name": name, "filename": str(filename), "metadata": metadata, "content_type": content_type}
        if not self._down:
            try:
                with pymongo.timeout(BEAT_IO_S):
                    super().artifact_event(name, filename, metadata=metadata, content_type=content_type)
                return
            except Exception as exc:  # noqa: BLE001 - retried later, kept in the recovery file if that fails too
                self._down = store_unreachable(exc)
                self._artifact_error = exc
                if self._has_artifact(name):
                    return  # stored; only the run document update failed, and the next save carries it
        with self._lock:
            self._pending_artifacts.append(artifact)
        self._warn("artifact", f"artifact {name!r} not stored yet, will retry: {self._describe(self._artifact_error)}")

    def resource_event(self, filename):
        try:
            with pymongo.timeout(BEAT_IO_S):
                super().resource_event(filename)
        except Exception as exc:  # noqa: BLE001
            self.losses.append(f"resource {filename} was not recorded ({self._describe(exc)})")

    def _has_artifact(self, name) -> bool:
        return any(a.get("name") == name for a in self.run_entry.get("artifacts", []))

    def _retry_artifacts(self, timeout: float) -> None:
        """Store artifacts whose first attempt failed; those that fail again stay queued."""
        with self._lock, pymongo.timeout(timeout):
            while self._pending_artifacts:
                artifact = self._pending_artifacts[0]
                try:
                    if not self._has_artifact(artifact["name"]):
                        super().artifact_event(**artifact)
                except Exception as exc:  # noqa: BLE001
                    self._artifact_error = exc
                    self._down = store_unreachable(exc)
                    if not self._has_artifact(artifact["name"]):
                        return
                self._pending_artifacts.pop(0)

    # -- the end of a run ----------------------------------------------------------------------------

    def main_finished(self, result) -> None:
        """The experiment's main function returned ``result``: the run is COMPLETED even if a Ctrl-C
        comes before Sacred reports it (Sacred would then store INTERRUPTED), and the last heartbeat
        only hands over its points, which the end stores."""
        self._finished = True
        self._finished_result = result

    def completed_event(self, stop_time, result):
        self._end(status="COMPLETED", stop_time=stop_time, result=flatten(result))

    def interrupted_event(self, interrupt_time, status):
        if self._finished:
            self._end(status="COMPLETED", stop_time=interrupt_time, result=flatten(self._finished_result))
        else:
            self._end(status=status, stop_time=interrupt_time)

    def failed_event(self, fail_time, fail_trace):
        if self._not_created:  # the store holds the run's id, FAILED with the reason; nothing else to store
            with pymongo.timeout(1.0):
                self.runs.database.client.close()
            return
        self._end(status="FAILED", stop_time=fail_time, fail_trace=list(fail_trace or []))

    def _end(self, **final) -> None:
        """Save the run's end to a recovery file, then store everything within END_BUDGET_S.

        Runs once: a Ctrl-C while the store is awaited makes Sacred report an interruption as
        well, which must not replace the status the run really ended with.
        """
        if self._ending:
            return
        deadline = time.monotonic() + self.end_budget_s
        self._ending = True
        stop = threading.Event()  # set by Ctrl-C for the whole end: no KeyboardInterrupt can land mid-way
        with _interrupts_noted(stop):
            if self._down:
                self._announce(self._metric_error or self._artifact_error, deadline)
            wait_for_last_heartbeat(deadline)
            with self._lock:
                self.run_entry.update(final)
                self._compose_record(note=False)
                self._save_recovery_file()
            if not stop.is_set():
                self._store_until(deadline, stop)
            if stop.is_set():
                print("pqa: stopped waiting for the run store (Ctrl-C); nothing is lost", file=sys.stderr, flush=True)
            self._account()
            with pymongo.timeout(1.0):  # close ends the server sessions: not worth waiting for a store that is away
                self.runs.database.client.close()  # its monitors would hold up the exit

    def _compose_record(self, note: bool) -> None:
        """The run document as it should be stored now: Sacred's info, what is missing (with ``note``), scrubbed."""
        if self._info is not None:
            self.run_entry["info"] = flatten(self._info)
        self.run_entry.get("info", {}).pop("pqa_unstored", None)
        missing = self._unstored_note() if note else None
        if missing:
            self.run_entry.setdefault("info", {})["pqa_unstored"] = missing
        self._sanitize()

    def _save_recovery_file(self) -> None:
        record = {
            "run_id": self.run_entry["_id"], "uuid": self.run_uuid, "database": self.runs.database.name,
            "runs_collection": self.runs.name, "metrics_collection": self.metrics.name,
            "final": {"status": self.run_entry["status"], "fail_trace": self.run_entry.get("fail_trace")},
            "payload": {"run": self.run_entry, "metrics": self.writer.pending(),
                        "artifacts": list(self._pending_artifacts)},
        }  # fmt: skip
        try:
            self.recovery_file = str(unstored.write(self.failure_dir, record, self._scrub))
        except OSError as exc:
            self.recovery_file = None
            self._recovery_error = f"{exc.strerror or exc}: {exc.filename or self.failure_dir}"

    def _store_until(self, deadline: float, stop: threading.Event) -> None:
        """Metrics, artifacts, then the final record; a store that does not answer is retried until
        ``deadline``, the first attempt kept short so the user hears about it at once."""
        attempt_s = FIRST_ATTEMPT_S
        hold = os.environ.get(HOLD_END_ENV)
        while not stop.is_set():
            if hold and not os.path.exists(hold):
                deadline = max(deadline, time.monotonic() + self.end_budget_s)
            error = self._store_everything(max(0.1, min(deadline - time.monotonic(), attempt_s)))
            if error is None or not store_unreachable(error):
                return
            self._announce(error, deadline)
            if deadline - time.monotonic() <= RETRY_PAUSE_S:
                return
            stop.wait(RETRY_PAUSE_S)
            attempt_s = BEAT_IO_S

    def _announce(self, error, deadline: float) -> None:
        """Say once, before waiting, that the store does not answer, for how long pqa tries, and where the run is."""
        if self._announced:
            return
        self._announced = True
        saved = f"the run is saved in {self.recovery_file}" if self.recovery_file else "saving the run locally"
        print(f"pqa: the run store {self._where} does not answer ({self._describe(error)}); trying for up to "
              f"{max(0, deadline - time.monotonic()):.0f} s; Ctrl-C stops waiting ({saved})", file=sys.stderr, flush=True)

    def _store_everything(self, timeout: float) -> BaseException | None:
        """One attempt; returns the error that left something unstored (None when all is stored)."""
        error = self._flush_metrics(self._info if self._info is not None else {}, timeout)
        if error is not None and store_unreachable(error):
            return error
        if self._pending_artifacts:
            self._retry_artifacts(timeout)
            if self._pending_artifacts and store_unreachable(self._artifact_error):
                return self._artifact_error
        with self._lock:
            self._compose_record(note=True)
        try:
            self._final_write(timeout)
        except Exception as exc:  # noqa: BLE001
            return exc
        if self.writer.pending_points():
            return self._metric_error
        return self._artifact_error if self._pending_artifacts else None

    def _final_write(self, timeout: float) -> None:
        with pymongo.timeout(timeout):
            try:
                self.runs.update_one({"_id": self.run_entry["_id"]}, {"$set": self.run_entry}, upsert=True)
            except pymongo.errors.InvalidDocument:
                # Sacred's fallback (str() of what BSON can't hold), scrubbed again.
                self.run_entry = self._scrub(force_bson_encodeable(self.run_entry))
                self.runs.update_one({"_id": self.run_entry["_id"]}, {"$set": self.run_entry}, upsert=True)
        self._final_stored = True

    def _unstored_note(self) -> dict | None:
        """What the stored record must say is missing from it (None when nothing is)."""
        points = self.writer.pending_points()
        if not points and not self._pending_artifacts:
            return None
        return {"points": points, "series": sorted(self.writer.pending()),
                "artifacts": [a["name"] for a in self._pending_artifacts], "saved_to": self.recovery_file}

    def _account(self) -> None:
        """After the end: delete the recovery file if the store holds everything, else record the loss."""
        points = self.writer.pending_points()
        artifacts = [a["name"] for a in self._pending_artifacts]
        record_stored = self._final_stored
        if not points and not artifacts and record_stored:
            if self.recovery_file:
                with contextlib.suppress(OSError):
                    os.unlink(self.recovery_file)
            self.recovery_file = None
            return
        missing = []
        if points:
            series = sorted(self.writer.pending())
            missing.append(f"{points} metric points" + (f" ({', '.join(series)})" if len(series) <= 3 else
                                                        f" of {len(series)} series"))
        if artifacts:
            missing.append(f"{len(artifacts)} artifact{'s' if len(artifacts) > 1 else ''} ({', '.join(artifacts)})")
        if not record_stored:
            missing.append("the final record")
        error = self._metric_error or self._artifact_error
        why = f" ({self._describe(error)})" if error is not None else ""
        if self.recovery_file:
            where = f"saved in {self.recovery_file}"
        else:
            where = f"and they could NOT be saved locally ({self._recovery_error})"
        self.losses.append(f"run {self.run_entry['_id']} ended {self.run_entry.get('status')}, but the run store "
                           f"did not take {self._join(missing)}{why}; {where}")

    @staticmethod
    def _join(items: list[str]) -> str:
        return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]

    def raise_for_losses(self) -> None:
        """After the run: :class:`PqaError` (one line) if any metric, artifact or record is not stored."""
        if self.losses:
            hint = ": `pqa db recover` uploads it once the database is back" if self.recovery_file else ""
            raise PqaError("; ".join(self.losses) + hint)

    # -- writes: every run document goes through the scrubber ------------------------------

    def _sanitize(self) -> None:
        entry = dict(self.run_entry)
        if "captured_out" in entry:
            entry["captured_out"] = _truncate_output(entry["captured_out"])
        self.run_entry = self._scrub(entry)

    def insert(self):
        """Sacred's insert in two steps, so that an id is never given twice: a small document takes the next
        id (with the run's ``uuid``), then the whole run document is set on it. A run document the store
        refuses (over 16 MiB, a value BSON cannot hold) leaves that small document FAILED with the reason,
        and the run does not start: one PqaError line."""
        if self.overwrite:
            return self.save()
        self.run_uuid = self.run_entry["uuid"] = uuid.uuid4().hex
        self._sanitize()
        entry = self.run_entry
        stub = {"uuid": self.run_uuid, "status": "RUNNING", "start_time": entry.get("start_time"),
                "experiment": {"name": (entry.get("experiment") or {}).get("name")}, "format": entry.get("format"),
                "heartbeat": None, "info": {}, "artifacts": [], "resources": []}
        autoinc = entry.get("_id") is None
        while True:
            if autoinc:
                last = list(self.runs.find({}, {"_id": 1}).sort("_id", pymongo.DESCENDING).limit(1))
                entry["_id"] = last[0]["_id"] + 1 if last else 1
            try:
                self.runs.insert_one({"_id": entry["_id"], **stub})
                break
            except pymongo.errors.DuplicateKeyError:
                if not autoinc:
                    raise
        try:
            self.runs.update_one({"_id": entry["_id"]}, {"$set": entry})
        except (bson.errors.InvalidDocument, pymongo.errors.OperationFailure) as exc:
            if store_unreachable(exc):
                raise
            reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            self._not_created = f"run {entry['_id']}: the store refused the run document ({reason}); the run did " \
                                "not start"
            self.runs.update_one({"_id": entry["_id"]}, {"$set": {
                "status": "FAILED", "stop_time": entry.get("start_time"), "fail_trace": [f"pqa: {self._not_created}"],
            }})
            raise PqaError(self._not_created) from None

    def save(self):
        """Sacred's save swallows connection errors; this one raises them, so a beat knows."""
        self._sanitize()
        self.runs.update_one({"_id": self.run_entry["_id"]}, {"$set": self.run_entry})

    def final_save(self, attempts):  # pragma: no cover - the end is _end's; kept for Sacred's API
        self._final_write(self.end_budget_s)

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

    def _describe(self, exc) -> str:
        return describe_error(exc, self._scrub.secrets, limit=200) if exc is not None else "unknown error"

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
    end_budget_s: float = END_BUDGET_S,
    **client_kwargs,
) -> PqaMongoObserver:
    """A :class:`PqaMongoObserver` writing to ``db_name`` (default: URL path, else ``pqa``).

    Creates the indexes right away, so an unreachable store fails here (one
    :class:`PqaError` line, password redacted) rather than mid-run. Unstored
    data goes to ``failure_dir`` (default ``<data_dir>/failed_runs``).
    """
    validate_url(url)
    db_name = db_name or db_name_from_url(url)
    secrets = list(url_secrets(url)) + list(extra_secrets)
    try:
        client = pymongo.MongoClient(url, appname="pqa", **client_kwargs)
    except (pymongo.errors.ConfigurationError, ValueError, TypeError) as exc:
        raise PqaError(f"invalid MongoDB URL {redact_url(url)}: {describe_error(exc, secrets)}") from None
    obs = PqaMongoObserver(
        client=client,
        db_name=db_name,
        collection_prefix=collection_prefix,
        failure_dir=str(failure_dir or settings.data_dir() / "failed_runs"),
        secrets=secrets,
        redacted_url=redact_url(url),
        end_budget_s=end_budget_s,
    )
    if create_indexes:
        try:
            with pymongo.timeout(index_timeout):
                ensure_indexes(client[db_name], collection_prefix)
        except pymongo.errors.PyMongoError as exc:
            client.close()
            raise PqaError(f"cannot prepare the run store {redact_url(url)}: {describe_error(exc, secrets)}") from None
    return obs
