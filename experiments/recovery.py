"""``pqa db recover``: upload what a run could not store while the database was away.

When the run store is unreachable at the end of a run, :class:`~.observers.PqaMongoObserver`
writes what is left to ``failure_dir`` (``<data_dir>/failed_runs``) as MongoDB extended JSON,
one file per kind::

    pqa_unstored_metrics_run<id>_...json     metric points never written ({name: [steps, values, timestamps]})
    pqa_unstored_artifacts_run<id>_...json   artifacts never stored (name, file path, content type)
    pqa_unstored_run_run<id>_...json         the final run document

Each names its database and collections and the status the run really ended with. Recovery,
run by run: the run document first, then the points, then the artifacts; once all of a run's
files are uploaded, the run gets its real status back (COMPLETED instead of the FAILED that
recorded the loss), ``info.pqa_recovered`` says what was recovered, and the files move to
``failed_runs/recovered/``. Running it again is harmless: points already stored (same step,
value and millisecond timestamp) are skipped, an artifact already in GridFS is reused, and a
run whose upload failed keeps its files for the next attempt. Nothing is unpickled; ``.txt``
and ``.pickle`` files (values JSON cannot hold, older versions) are listed as skipped.
"""
from __future__ import annotations

import collections
import datetime as _dt
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List

import gridfs
import pymongo
import pymongo.errors
from bson import json_util

from .observers import DUMP_FORMAT, DUMP_PREFIX, PqaMongoObserver

FILE_RE = re.compile(rf"^{re.escape(DUMP_PREFIX)}(metrics|artifacts|run)_run(\d+)_.*\.json$")
RECOVERED_DIR = "recovered"
KIND_ORDER = {"run": 0, "metrics": 1, "artifacts": 2}


def _point_key(step, value, stamp) -> tuple:
    """Identity of a stored point: BSON keeps milliseconds; NaN equals NaN here."""
    if isinstance(stamp, _dt.datetime):
        if stamp.tzinfo is not None:
            stamp = stamp.astimezone(_dt.timezone.utc).replace(tzinfo=None)
        stamp = stamp.replace(microsecond=stamp.microsecond // 1000 * 1000)
    if isinstance(value, float) and math.isnan(value):
        value = "nan"
    return step, value, stamp


def find_dumps(failure_dir: Path) -> tuple[List[dict], List[str]]:
    """(loadable dump records with their ``path``, names of files skipped with the reason)."""
    records, skipped = [], []
    if not failure_dir.is_dir():
        return records, skipped
    for path in sorted(failure_dir.iterdir()):
        if not path.is_file() or not path.name.startswith(DUMP_PREFIX):
            continue
        if not FILE_RE.match(path.name):
            skipped.append(f"{path.name}: not a JSON dump (never loaded: pickle/text files are not executed)")
            continue
        try:
            record = json_util.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            skipped.append(f"{path.name}: unreadable ({str(exc).splitlines()[0][:200]})")
            continue
        if not isinstance(record, dict) or record.get("format") != DUMP_FORMAT or "payload" not in record:
            skipped.append(f"{path.name}: unknown dump format")
            continue
        record["path"] = path
        records.append(record)
    return records, skipped


class _Recovery:
    def __init__(self, client: pymongo.MongoClient, failure_dir: Path):
        self.client = client
        self.failure_dir = failure_dir

    def run(self, records: List[dict]) -> Dict[str, Any]:
        groups: Dict[tuple, List[dict]] = collections.defaultdict(list)
        for record in records:
            groups[(record["database"], record["runs_collection"], record["metrics_collection"],
                    record["run_id"])].append(record)
        runs = []
        for key, group in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][3])):
            group.sort(key=lambda r: (KIND_ORDER.get(r["kind"], 9), r["path"].name))
            runs.append(self._recover_run(*key, group))
        return {
            "runs": runs,
            "points_uploaded": sum(r["points_uploaded"] for r in runs),
            "points_already_stored": sum(r["points_already_stored"] for r in runs),
            "artifacts_uploaded": sum(r["artifacts_uploaded"] for r in runs),
            "runs_recovered": sum(1 for r in runs if r["recovered"]),
            "runs_failed": sum(1 for r in runs if not r["recovered"]),
        }

    def _recover_run(self, database: str, runs_name: str, metrics_name: str, run_id, group: List[dict]) -> dict:
        db = self.client[database]
        runs = db[runs_name]
        report = {"run_id": run_id, "database": database, "files": [r["path"].name for r in group],
                  "points_uploaded": 0, "points_already_stored": 0, "artifacts_uploaded": 0,
                  "recovered": False, "status": None, "error": None}
        try:
            for record in group:
                getattr(self, f"_{record['kind']}")(db, runs, db[metrics_name], run_id, record["payload"], report)
            final = next((r["final"] for r in reversed(group) if r.get("final")), None)
            report["status"] = self._finish(db, runs, db[metrics_name], run_id, final, report)
        except (pymongo.errors.PyMongoError, OSError, RecoveryError) as exc:
            report["error"] = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            return report
        done = self.failure_dir / RECOVERED_DIR
        done.mkdir(exist_ok=True)
        for record in group:
            shutil.move(str(record["path"]), str(done / record["path"].name))
        report["recovered"] = True
        return report

    # -- one kind of dump each ---------------------------------------------------------------

    def _run(self, db, runs, metrics, run_id, entry: dict, report) -> None:
        entry = {k: v for k, v in entry.items() if k != "_id"}
        runs.update_one({"_id": run_id}, {"$set": entry}, upsert=True)

    def _metrics(self, db, runs, metrics, run_id, payload: dict, report) -> None:
        prefix = runs.name[: -len("_runs")] if runs.name.endswith("_runs") else ""
        writer = PqaMongoObserver(client=self.client, db_name=db.name, collection_prefix=prefix,
                                  failure_dir=str(self.failure_dir))  # only its guarded chunk writer is used
        writer.run_entry = {"_id": run_id}
        if writer.metrics.name != metrics.name:
            raise RecoveryError(f"unexpected metrics collection {metrics.name!r} for runs collection {runs.name!r}")
        info: dict = {}
        for name, (steps, values, stamps) in payload["metrics"].items():
            stored = collections.Counter()
            for doc in metrics.find({"run_id": run_id, "name": name}, {"steps": 1, "values": 1, "timestamps": 1}):
                stored.update(_point_key(*p) for p in zip(doc.get("steps", []), doc.get("values", []),
                                                          doc.get("timestamps", [])))
            new = ([], [], [])
            for point in zip(steps, values, stamps):
                key = _point_key(*point)
                if stored[key] > 0:
                    stored[key] -= 1
                    report["points_already_stored"] += 1
                    continue
                for column, item in zip(new, point):
                    column.append(item)
            if new[0]:
                writer._pending[name] = new
                report["points_uploaded"] += len(new[0])
        error = writer._flush_metrics(info) if writer._pending else None
        if error is not None:
            raise RecoveryError(f"metric points not uploaded: {str(error).splitlines()[0][:200]}")

    def _artifacts(self, db, runs, metrics, run_id, payload: dict, report) -> None:
        fs = gridfs.GridFS(db)
        for artifact in payload["artifacts"]:
            name = artifact["name"]
            doc = runs.find_one({"_id": run_id}, {"artifacts": 1}) or {}
            if any(a.get("name") == name for a in doc.get("artifacts", [])):
                continue
            db_filename = f"artifact://{runs.name}/{run_id}/{name}"
            existing = db["fs.files"].find_one({"filename": db_filename}, {"_id": 1}, sort=[("uploadDate", -1)])
            if existing is not None:
                file_id = existing["_id"]
            else:
                path = Path(artifact["filename"])
                if not path.is_file():
                    raise RecoveryError(f"artifact {name!r}: {path} is gone")
                with open(path, "rb") as f:
                    file_id = fs.put(f, filename=db_filename, metadata=artifact.get("metadata"),
                                     content_type=artifact.get("content_type"))
                report["artifacts_uploaded"] += 1
            runs.update_one({"_id": run_id}, {"$push": {"artifacts": {"name": name, "file_id": file_id}}})

    def _finish(self, db, runs, metrics, run_id, final, report):
        """Everything is in: list each series in ``info.metrics`` and give the run its real status."""
        doc = runs.find_one({"_id": run_id}, {"info": 1, "status": 1})
        if doc is None:
            raise RecoveryError(f"run {run_id} is not in database {db.name} and no run document was saved")
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
        unset = {}
        status = doc.get("status")
        if final:
            status = update["status"] = final["status"]
            if final.get("fail_trace"):
                update["fail_trace"] = final["fail_trace"]
            else:
                unset["fail_trace"] = ""
        runs.update_one({"_id": run_id}, {"$set": update, **({"$unset": unset} if unset else {})})
        return status


class RecoveryError(Exception):
    pass


def recover(client: pymongo.MongoClient, failure_dir: os.PathLike | str) -> Dict[str, Any]:
    """Upload every dump in ``failure_dir``; returns counts per run (JSON-able, ``skipped`` included)."""
    failure_dir = Path(failure_dir)
    records, skipped = find_dumps(failure_dir)
    report = _Recovery(client, failure_dir).run(records)
    report.update(failure_dir=str(failure_dir), files=len(records), skipped=skipped)
    return report
