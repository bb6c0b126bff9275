"""``pqa db recover`` is idempotent and exact (issue 19), against the session's real SecantusDB:

* two recovers at once store every point once and every artifact once (one lock, points keyed by
  (run, metric, step));
* a run carries its own ``uuid``; a recovery file is never written into another run that has the same
  counter id (another store), one line;
* a file the store cannot take (a run document over 16 MiB) is one line, and the other runs are recovered;
* a run whose document the store refuses at creation keeps its id FAILED: the next run never reuses it.

The recovery files are written by the observer's own writer (``unstored.write``), as a run whose store
went away leaves them; recover runs as a user types it.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pymongo
import pytest
from sacred import Experiment

from pqa_core.errors import PqaError
from pqa_experiments.store import unstored
from pqa_experiments.store.metric_chunks import ensure_indexes, read_metric
from pqa_experiments.store.observers import make_mongo_observer
from pqa_experiments.store.urls import Scrubber

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(embedded_db, tmp_path):
    name = f"pqa_recover_{uuid.uuid4().hex[:8]}"
    client = pymongo.MongoClient(embedded_db, serverSelectionTimeoutMS=10_000)
    ensure_indexes(client[name])
    yield {"url": embedded_db.rstrip("/") + "/" + name, "db": client[name], "name": name,
           "failed": tmp_path / "failed_runs"}
    client.close()


def recovery_file(store, run_id, *, run_uuid=None, points=1000, series=("a", "b"), artifact=None, run=None):
    """A recovery file as a run's end leaves it: the final record, ``points`` points per series, an artifact."""
    stamp = _dt.datetime(2026, 12, 5, 12, 0, 0)
    run_uuid = run_uuid or uuid.uuid4().hex
    doc = {"_id": run_id, "uuid": run_uuid, "status": "COMPLETED", "config": {"seed": 1},
           "experiment": {"name": "t"}, "artifacts": [], "info": {}, "start_time": stamp, **(run or {})}
    metrics = {name: [list(range(1, points + 1)), [float(i) for i in range(points)],
                      [stamp + _dt.timedelta(milliseconds=i) for i in range(points)]] for name in series}
    record = {"run_id": run_id, "uuid": run_uuid, "database": store["name"], "runs_collection": "runs",
              "metrics_collection": "metrics", "final": {"status": "COMPLETED", "fail_trace": None},
              "payload": {"run": doc, "metrics": metrics, "artifacts": [artifact] if artifact else []}}
    return unstored.write(store["failed"], record, Scrubber(()))


def recover(store, *extra, wait=True):
    args = [sys.executable, "-m", "pqa_experiments.cli.main", "db", "recover", "--mongo-url", store["url"],
            "--dir", str(store["failed"]), *extra]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO),
                            env={**os.environ, "PQA_HOME": str(store["failed"].parent / "home")})
    if not wait:
        return proc
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def test_two_recovers_at_once_store_every_point_and_artifact_once(store, tmp_path):
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text('{"id": "q1"}\n')
    artifact = {"name": "predictions.jsonl", "filename": str(predictions), "metadata": None, "content_type": None}
    for run_id in (1, 2):
        recovery_file(store, run_id, points=3000, artifact=artifact)
    procs = [recover(store, "--json", wait=False) for _ in range(3)]  # at once, as `recover & recover & wait`
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0 and "Traceback" not in err, err
        reports.append(json.loads(out))
    assert sum(r["points_uploaded"] for r in reports) == 2 * 2 * 3000
    for run_id in (1, 2):
        for name in ("a", "b"):
            assert read_metric(store["db"], run_id, name)[0] == list(range(1, 3001))
        doc = store["db"].runs.find_one({"_id": run_id})
        assert [a["name"] for a in doc["artifacts"]] == ["predictions.jsonl"] and doc["status"] == "COMPLETED"
    assert store["db"]["fs.files"].count_documents({}) == 2
    # the same file again (a recover cut short): nothing added, every point counted as already stored
    recovery_file(store, 1, run_uuid=store["db"].runs.find_one({"_id": 1})["uuid"], points=3000)
    again = json.loads(recover(store, "--json").stdout)
    assert again["points_uploaded"] == 0 and again["points_already_stored"] == 6000
    assert read_metric(store["db"], 1, "a")[0] == list(range(1, 3001))


def test_recover_never_writes_into_another_run_with_the_same_id(store):
    """Run 1 of this store is not the run of the file (run 1 of another store): refused in one line, the
    stored run unchanged; the file stays."""
    store["db"].runs.insert_one({"_id": 1, "uuid": "a" * 32, "status": "COMPLETED", "config": {"seed": 7},
                                 "info": {}, "artifacts": []})
    store["db"].metrics.insert_one({"run_id": 1, "name": "a", "chunk": 0, "n": 2, "steps": [1, 2],
                                    "values": [0.5, 0.6], "timestamps": [_dt.datetime(2026, 1, 1)] * 2})
    saved = recovery_file(store, 1, run_uuid="b" * 32, points=300)
    proc = recover(store)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "NOT recovered" in line]
    assert lines == [f"run 1 ({store['name']}): NOT recovered: {saved.name}: run 1 in database {store['name']} is "
                     f"another run (uuid {'a' * 32}, the file's is {'b' * 32}); nothing written (is this the store "
                     "the run wrote to? --mongo-url names it)"], proc.stderr
    doc = store["db"].runs.find_one({"_id": 1})
    assert doc["config"] == {"seed": 7} and read_metric(store["db"], 1, "a")[0] == [1, 2]
    assert saved.exists()


def test_a_file_the_store_cannot_take_is_one_line_and_the_others_are_recovered(store):
    too_big = recovery_file(store, 1, run={"config": {"blob": "x" * (17 << 20)}}, points=10)
    fine = recovery_file(store, 2, points=10)
    proc = recover(store)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    failed = [line for line in proc.stderr.splitlines() if "NOT recovered" in line]
    assert len(failed) == 1 and failed[0].startswith(f"run 1 ({store['name']}): NOT recovered: {too_big.name}: ")
    assert "too large" in failed[0] and len(failed[0]) < 500, failed
    assert read_metric(store["db"], 2, "a")[0] == list(range(1, 11)) and not fine.exists()
    assert "restored 20 metric points and 0 artifacts to 1 runs (2)" in proc.stdout
    assert too_big.exists()


def test_a_run_document_the_store_refuses_keeps_its_id_failed(embedded_db, store, tmp_path):
    """The store refuses the run document (over 16 MiB): one line, the id is taken (FAILED, with the
    reason) so the next run gets the next id, and no recovery file is left to recover into it."""
    ex = Experiment("too_big", save_git_info=False)

    @ex.config
    def config():
        blob = ""  # noqa: F841 - Sacred reads it

    @ex.main
    def main(blob):
        return len(blob)

    ids = []
    for blob in ("x" * (17 << 20), "small"):
        obs = make_mongo_observer(embedded_db, store["name"], failure_dir=store["failed"])
        ex.observers = [obs]
        if len(blob) > 100:
            with pytest.raises(PqaError, match=r"^run 1: the store refused the run document \(.*too large.*\); "
                                               r"the run did not start$"):
                ex.run(config_updates={"blob": blob}, options={"--loglevel": "ERROR"})
            ids.append(1)
        else:
            ids.append(ex.run(config_updates={"blob": blob}, options={"--loglevel": "ERROR"})._id)
    assert ids == [1, 2]
    first, second = store["db"].runs.find_one({"_id": 1}), store["db"].runs.find_one({"_id": 2})
    assert first["status"] == "FAILED" and "too large" in first["fail_trace"][0] and first["uuid"]
    assert second["status"] == "COMPLETED" and second["uuid"] != first["uuid"] and second["config"]["blob"] == "small"
    assert not list(store["failed"].glob("pqa_unstored_*"))
