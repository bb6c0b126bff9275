"""``pqa db recover``: upload what runs could not store, and mark runs that died.

A run whose store did not answer at its end left a recovery file (:mod:`.unstored`) holding its
final record, the metric points and the artifacts the store does not have. Recovery, run by run:
the record first, then the points (through the same chunk writer as the observer), then the
artifacts; once all of a run's files are in, the run gets the status it really ended with,
``info.pqa_recovered`` says what was restored, and the files move to ``failed_runs/recovered/``.
Running it again, or twice at once, adds nothing: one recover at a time holds the folder's lock,
a point is its (run, metric, step) and a step already stored is skipped, an artifact already in
GridFS is reused. A stored run whose ``uuid`` is not the file's (the same counter id in another
store) is refused in one line; so is a file the store cannot take (a document over 16 MiB), and
the other runs go on; a run whose upload failed keeps its files for the next attempt. Nothing is
unpickled.

A run still RUNNING whose heartbeat stopped more than :data:`.runs.DEAD_AFTER_S` ago (killed
with -9, its machine gone) is stored as PROBABLY_DEAD, Omniboard's name for it; a live run's
next heartbeat sets RUNNING again.
"""
from __future__ import annotations

import collections
import contextlib
import datetime as _dt
import fcntl
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List

import bson.errors
import gridfs
import pymongo
import pymongo.errors

from pqa_experiments.store import unstored
from pqa_experiments.store.metric_chunks import ChunkWriter
from pqa_experiments.store.runs import DEAD_AFTER_S, PROBABLY_DEAD, dead_runs_query

RECOVERED_DIR = "recovered"
LOCK_FILE = ".pqa-recover.lock"


class RecoveryError(Exception):
    pass


def recover(client: pymongo.MongoClient, failure_dir: os.PathLike | str, db_name: str | None = None,
            now: _dt.datetime | None = None) -> Dict[str, Any]:
    """Upload every recovery file in ``failure_dir``; then, in ``db_name``, store runs whose
    heartbeat stopped as PROBABLY_DEAD. Returns counts per run (JSON-able, ``skipped`` included)."""
    failure_dir = Path(failure_dir)
    with recovery_lock(failure_dir):
        records, skipped = unstored.find(failure_dir)
        groups: Dict[tuple, List[dict]] = collections.defaultdict(list)
        for record in records:
            groups[(record["database"], record["runs_collection"], record["metrics_collection"],
                    record["run_id"])].append(record)
        runs = [_recover_run(client, failure_dir, *key, group)
                for key, group in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][3]))]
        dead = mark_dead_runs(client[db_name], now) if db_name else []
    return {
        "runs": runs,
        "points_uploaded": sum(r["points_uploaded"] for r in runs),
        "points_already_stored": sum(r["points_already_stored"] for r in runs),
        "artifacts_uploaded": sum(r["artifacts_uploaded"] for r in runs),
        "runs_recovered": sum(1 for r in runs if r["recovered"]),
        "runs_failed": sum(1 for r in runs if not r["recovered"]),
        "marked_dead": dead,
        "dead_after_s": DEAD_AFTER_S,
        "failure_dir": str(failure_dir),
        "files": len(records),
        "skipped": skipped,
    }


@contextlib.contextmanager
def recovery_lock(failure_dir: Path) -> Iterator[None]:
    """One ``pqa db recover`` at a time per folder of recovery files (``fcntl.flock`` on
    :data:`LOCK_FILE` in it): a second one waits, then finds the files recovered and adds nothing.
    The kernel drops the lock with its process."""
    if not failure_dir.is_dir():
        yield
        return
    fd = os.open(failure_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"pqa: another pqa db recover is uploading {failure_dir}; waiting for it", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def mark_dead_runs(database, now: _dt.datetime | None = None) -> List[Any]:
    """Store PROBABLY_DEAD on RUNNING runs whose heartbeat is older than DEAD_AFTER_S; their ids."""
    query = dead_runs_query(now)
    ids = [doc["_id"] for doc in database.runs.find(query, {"_id": 1}).sort("_id", 1)]
    if ids:
        database.runs.update_many({**query, "_id": {"$in": ids}}, {"$set": {"status": PROBABLY_DEAD}})
    return ids


def _recover_run(client, failure_dir: Path, database: str, runs_name: str, metrics_name: str, run_id,
                 group: List[dict]) -> dict:
    db = client[database]
    runs, metrics = db[runs_name], db[metrics_name]
    report = {"run_id": run_id, "database": database, "files": [r["path"].name for r in group],
              "points_uploaded": 0, "points_already_stored": 0, "artifacts_uploaded": 0,
              "recovered": False, "status": None, "error": None}
    try:
        _check_same_run(runs, run_id, group)
        for record in group:
            payload = record["payload"]
            report["file"] = record["path"].name
            if payload.get("run"):
                runs.update_one({"_id": run_id}, {"$set": {k: v for k, v in payload["run"].items() if k != "_id"}},
                                upsert=True)
            if payload.get("metrics"):
                _upload_points(metrics, run_id, payload["metrics"], report)
            for artifact in payload.get("artifacts") or []:
                _upload_artifact(db, runs, run_id, artifact, report)
        final = next((r["final"] for r in reversed(group) if r.get("final")), None)
        report["status"] = _finish(runs, metrics, run_id, final, report)
    except (pymongo.errors.PyMongoError, bson.errors.BSONError, OSError, RecoveryError) as exc:
        # one line, and the next run goes on; the files stay for another attempt
        reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        where = report.pop("file", None)
        report["error"] = f"{where}: {reason}" if where and not isinstance(exc, RecoveryError) else reason
        return report
    report.pop("file", None)
    done = failure_dir / RECOVERED_DIR
    done.mkdir(exist_ok=True)
    for record in group:
        shutil.move(str(record["path"]), str(done / record["path"].name))
    report["recovered"] = True
    return report


def _check_same_run(runs, run_id, group: List[dict]) -> None:
    """The stored run with this id must be the run of the files (same ``uuid``): a store's counter gives
    the same id to other runs elsewhere, and recovering into one of them would mix two runs."""
    mine = next((_uuid_of(r) for r in group if _uuid_of(r)), None)
    if mine is None:
        return  # files written before runs had their own id: nothing to compare
    stored = runs.find_one({"_id": run_id}, {"uuid": 1})
    if stored is not None and stored.get("uuid") != mine:
        raise RecoveryError(f"{group[0]['path'].name}: run {run_id} in database {runs.database.name} is another run "
                            f"(uuid {stored.get('uuid') or 'none'}, the file's is {mine}); nothing written (is this "
                            "the store the run wrote to? --mongo-url names it)")


def _uuid_of(record: dict):
    return record.get("uuid") or (record["payload"].get("run") or {}).get("uuid")


def _upload_points(metrics, run_id, series: dict, report: dict) -> None:
    """The points not stored yet, through the chunk writer: a point is its (run, metric, step), so a step
    already stored (a second upload of the same file) is skipped."""
    writer = ChunkWriter(metrics, run_id)
    for name, (steps, values, stamps) in series.items():
        stored = set()
        for doc in metrics.find({"run_id": run_id, "name": name}, {"steps": 1}):
            stored.update(_step_key(step) for step in doc.get("steps", []))
        new: tuple = ([], [], [])
        for point in zip(steps, values, stamps):
            key = _step_key(point[0])
            if key in stored:
                report["points_already_stored"] += 1
                continue
            stored.add(key)
            for column, item in zip(new, point):
                column.append(item)
        if new[0]:
            writer.add(name, *new)
            report["points_uploaded"] += len(new[0])
    error = writer.flush({})
    if error is not None:
        raise RecoveryError(f"metric points not uploaded: {str(error).splitlines()[0][:200]}")


def _step_key(step):
    """A step as stored (BSON may hand back a float for an int)."""
    return int(step) if isinstance(step, float) and step.is_integer() else step


def _upload_artifact(db, runs, run_id, artifact: dict, report: dict) -> None:
    name = artifact["name"]
    doc = runs.find_one({"_id": run_id}, {"artifacts": 1}) or {}
    if any(a.get("name") == name for a in doc.get("artifacts", [])):
        return
    db_filename = f"artifact://{runs.name}/{run_id}/{name}"
    existing = db["fs.files"].find_one({"filename": db_filename}, {"_id": 1}, sort=[("uploadDate", -1)])
    if existing is not None:
        file_id = existing["_id"]
    else:
        path = Path(artifact["filename"])
        if not path.is_file():
            raise RecoveryError(f"artifact {name!r}: {path} is gone")
        with open(path, "rb") as f:
            file_id = gridfs.GridFS(db).put(f, filename=db_filename, metadata=artifact.get("metadata"),
                                            content_type=artifact.get("content_type"))
        report["artifacts_uploaded"] += 1
    runs.update_one({"_id": run_id}, {"$push": {"artifacts": {"name": name, "file_id": file_id}}})


def _finish(runs, metrics, run_id, final, report):
    """Everything is in: list each series in ``info.metrics`` and give the run its real status."""
    doc = runs.find_one({"_id": run_id}, {"info": 1, "status": 1})
    if doc is None:
        raise RecoveryError(f"run {run_id} is not in database {runs.database.name} and no run document was saved")
    info = doc.get("info") or {}
    listed = {m.get("name") for m in info.get("metrics", []) if isinstance(m, dict)}
    series = [{"name": d["name"], "id": str(d["_id"])}
              for d in metrics.find({"run_id": run_id, "chunk": {"$in": [0, None]}}, {"name": 1})]
    update: Dict[str, Any] = {
        "info.metrics": list(info.get("metrics", [])) + [s for s in series if s["name"] not in listed],
        "info.pqa_recovered": {
            "at": _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None),
            "points": report["points_uploaded"], "artifacts": report["artifacts_uploaded"],
            "files": report["files"],
        },
    }
    unset = {"info.pqa_unstored": ""}
    status = doc.get("status")
    if final:
        status = update["status"] = final["status"]
        if final.get("fail_trace"):
            update["fail_trace"] = final["fail_trace"]
        else:
            unset["fail_trace"] = ""
    runs.update_one({"_id": run_id}, {"$set": update, "$unset": unset})
    return status
