"""``pqa db recover``: upload what runs could not store, and mark runs that died.

A run whose store did not answer at its end left a recovery file (:mod:`.unstored`) holding its
final record, the metric points and the artifacts the store does not have. Recovery, run by run:
the record first, then the points (through the same chunk writer as the observer), then the
artifacts; once all of a run's files are in, the run gets the status it really ended with,
``info.pqa_recovered`` says what was restored, and the files move to ``failed_runs/recovered/``.
Running it again is harmless: points already stored (same step, value and millisecond
timestamp) are skipped, an artifact already in GridFS is reused, and a run whose upload failed
keeps its files for the next attempt. Nothing is unpickled.

A run still RUNNING whose heartbeat stopped more than :data:`.runs.DEAD_AFTER_S` ago (killed
with -9, its machine gone) is stored as PROBABLY_DEAD, Omniboard's name for it; a live run's
next heartbeat sets RUNNING again.
"""
from __future__ import annotations

import collections
import datetime as _dt
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List

import gridfs
import pymongo
import pymongo.errors

from pqa_experiments.store import unstored
from pqa_experiments.store.metric_chunks import ChunkWriter, point_key
from pqa_experiments.store.runs import DEAD_AFTER_S, PROBABLY_DEAD, dead_runs_query

RECOVERED_DIR = "recovered"


class RecoveryError(Exception):
    pass


def recover(client: pymongo.MongoClient, failure_dir: os.PathLike | str, db_name: str | None = None,
            now: _dt.datetime | None = None) -> Dict[str, Any]:
    """Upload every recovery file in ``failure_dir``; then, in ``db_name``, store runs whose
    heartbeat stopped as PROBABLY_DEAD. Returns counts per run (JSON-able, ``skipped`` included)."""
    failure_dir = Path(failure_dir)
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
        for record in group:
            payload = record["payload"]
            if payload.get("run"):
                runs.update_one({"_id": run_id}, {"$set": {k: v for k, v in payload["run"].items() if k != "_id"}},
                                upsert=True)
            if payload.get("metrics"):
                _upload_points(metrics, run_id, payload["metrics"], report)
            for artifact in payload.get("artifacts") or []:
                _upload_artifact(db, runs, run_id, artifact, report)
        final = next((r["final"] for r in reversed(group) if r.get("final")), None)
        report["status"] = _finish(runs, metrics, run_id, final, report)
    except (pymongo.errors.PyMongoError, OSError, RecoveryError) as exc:
        report["error"] = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        return report
    done = failure_dir / RECOVERED_DIR
    done.mkdir(exist_ok=True)
    for record in group:
        shutil.move(str(record["path"]), str(done / record["path"].name))
    report["recovered"] = True
    return report


def _upload_points(metrics, run_id, series: dict, report: dict) -> None:
    """The points not stored yet (a point stored twice in the series is kept twice), through the chunk writer."""
    writer = ChunkWriter(metrics, run_id)
    for name, (steps, values, stamps) in series.items():
        stored = collections.Counter()
        for doc in metrics.find({"run_id": run_id, "name": name}, {"steps": 1, "values": 1, "timestamps": 1}):
            stored.update(point_key(*p) for p in zip(doc.get("steps", []), doc.get("values", []),
                                                     doc.get("timestamps", [])))
        new: tuple = ([], [], [])
        for point in zip(steps, values, stamps):
            key = point_key(*point)
            if stored[key] > 0:
                stored[key] -= 1
                report["points_already_stored"] += 1
                continue
            for column, item in zip(new, point):
                column.append(item)
        if new[0]:
            writer.add(name, *new)
            report["points_uploaded"] += len(new[0])
    error = writer.flush({})
    if error is not None:
        raise RecoveryError(f"metric points not uploaded: {str(error).splitlines()[0][:200]}")


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
