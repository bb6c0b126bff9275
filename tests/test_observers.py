"""PqaMongoObserver against a real SecantusDB: big series, indexes, git without commits, secrets."""
from __future__ import annotations

import importlib.util
import os
import secrets as _secrets
import subprocess
import textwrap
import uuid

import bson
import pymongo
import pytest
from sacred import SETTINGS, Experiment
from sacred.observers import MongoObserver

from pqa_core.errors import PqaError
from pqa_experiments.store import db
from pqa_experiments.store import metric_chunks
from pqa_experiments.store import observers
from pqa_experiments.tracking import sacred_fixes
from pqa_experiments.store.metric_chunks import read_metric
from pqa_experiments.store.observers import make_mongo_observer

from conftest import free_port

N_BIG = 400_000  # ~17 MB as Sacred's three arrays: over the 16 MiB document limit
RUN = {"--capture": "sys", "--loglevel": "ERROR"}


def _db_name() -> str:
    return "t_" + uuid.uuid4().hex[:10]


def _load(path, name=None):
    """Import ``path`` as a fresh module (Sacred reads the experiment's globals and file)."""
    spec = importlib.util.spec_from_file_location(name or f"pqa_exp_{uuid.uuid4().hex[:8]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _git(cwd, *args):
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "init.defaultBranch=main", *args],
        cwd=cwd, check=True, capture_output=True,
    )  # fmt: skip


# --------------------------------------------------------------------------- the 16 MiB limit


def test_secantus_refuses_documents_over_16_mib(mongo_client):
    coll = mongo_client[_db_name()].big
    with pytest.raises(pymongo.errors.DocumentTooLarge):  # pymongo's own check, from hello's maxBsonObjectSize
        coll.insert_one({"s": "x" * (17 << 20)})
    coll.insert_one({"_id": 1, "v": []})
    with pytest.raises(pymongo.errors.WriteError) as err:  # the server's check, on an update that grows it
        for _ in range(17):
            coll.update_one({"_id": 1}, {"$push": {"v": "y" * (1 << 20)}})
    assert err.value.code == 10334
    assert len(coll.find_one({"_id": 1})["v"]) < 17


def test_long_series_is_split_and_read_back_whole(embedded_db, mongo_client, tmp_path):
    """Sacred alone loses a >16 MiB series and still says COMPLETED; ours stores every point."""
    ex = Experiment("big_series", save_git_info=False)

    @ex.main
    def main(_run):
        for i in range(N_BIG):
            _run.log_scalar("loss", 1.0 / (i + 1), i)
        _run.log_scalar("acc", 0.5, 0)
        return "done"

    vanilla_db, ours_db = _db_name(), _db_name()
    ours = make_mongo_observer(embedded_db, ours_db, failure_dir=tmp_path / "failed")
    ex.observers = [MongoObserver(url=embedded_db, db_name=vanilla_db), ours]
    run = ex.run(options=RUN)

    # The hole, reproduced: COMPLETED, and no trace of the series.
    vanilla = mongo_client[vanilla_db]
    assert vanilla.runs.find_one({"_id": run._id})["status"] == "COMPLETED"
    assert vanilla.metrics.count_documents({"run_id": run._id, "name": "loss"}) == 0

    database = mongo_client[ours_db]
    doc = database.runs.find_one({"_id": run._id})
    assert doc["status"] == "COMPLETED" and not ours.losses
    steps, values, stamps = read_metric(database, run._id, "loss", with_timestamps=True)
    assert steps == list(range(N_BIG)) and len(stamps) == N_BIG
    assert len(bson.encode({"steps": steps, "values": values, "timestamps": stamps})) > 16 << 20  # one doc won't do
    assert values[0] == 1.0 and values[-1] == 1.0 / N_BIG
    assert read_metric(database, run._id, "acc") == ([0], [0.5])
    chunks = list(database.metrics.find({"run_id": run._id, "name": "loss"}).sort("chunk", 1))
    assert [c["chunk"] for c in chunks] == list(range(N_BIG // metric_chunks.CHUNK_POINTS))
    assert all(c["n"] == len(c["steps"]) == len(c["timestamps"]) for c in chunks)
    assert max(len(bson.encode(c)) for c in chunks) < 1 << 20
    # Sacred tools find chunk 0 through info.metrics, as before.
    assert {"name": "loss", "id": str(chunks[0]["_id"])} in doc["info"]["metrics"]


def test_frequent_heartbeats_store_every_point_once(embedded_db, mongo_client, tmp_path):
    """Heartbeats every 20 ms write while the run logs: chunk boundaries crossed mid-run, nothing lost or doubled."""
    import time as _time

    ex = Experiment("beats", save_git_info=False)

    @ex.main
    def main(_run):
        for i in range(12_000):
            _run.log_scalar("a", float(i), i)
            if i % 3 == 0:
                _run.log_scalar("b", float(i), i)
            if i % 1000 == 0:
                print("step", i)
                _time.sleep(0.03)

    name = _db_name()
    obs = make_mongo_observer(embedded_db, name, failure_dir=tmp_path)
    ex.observers = [obs]
    run = ex._create_run(options=RUN)
    run.beat_interval = 0.02
    run()
    database = mongo_client[name]
    doc = database.runs.find_one({"_id": run._id})
    assert doc["status"] == "COMPLETED" and "step 11000" in doc["captured_out"]
    assert read_metric(database, run._id, "a")[0] == list(range(12_000))
    assert read_metric(database, run._id, "b")[0] == list(range(0, 12_000, 3))
    assert database.metrics.count_documents({"run_id": run._id, "name": "a"}) == 3


def test_unstorable_points_are_said_in_the_record_and_kept(embedded_db, mongo_client, tmp_path):
    """Points BSON cannot hold: the run keeps its real status, its record says what is missing, the points
    stay in a recovery file, and raise_for_losses says it in one line."""
    ex = Experiment("unstorable", save_git_info=False)

    @ex.main
    def main(_run):
        for i in range(3):
            _run.log_scalar("bad", {i, i + 1}, i)  # a set: BSON cannot store it
            _run.log_scalar("good", float(i), i)

    name = _db_name()
    obs = make_mongo_observer(embedded_db, name, failure_dir=tmp_path / "failed")
    ex.observers = [obs]
    run = ex.run(options=RUN)  # Sacred only logs observer errors at the end of a run...

    doc = mongo_client[name].runs.find_one({"_id": run._id})
    assert doc["status"] == "COMPLETED"  # what the run did; ...so the record says what it lacks
    assert doc["info"]["pqa_unstored"]["points"] == 3 and doc["info"]["pqa_unstored"]["series"] == ["bad"]
    assert read_metric(mongo_client[name], run._id, "good") == ([0, 1, 2], [0.0, 1.0, 2.0])  # others unharmed
    dumped = list((tmp_path / "failed").iterdir())
    assert len(dumped) == 1 and dumped[0].suffix == ".json"
    assert doc["info"]["pqa_unstored"]["saved_to"] == str(dumped[0])
    with pytest.raises(PqaError, match=r"run \d+ ended COMPLETED, but the run store did not take 3 metric points \(bad\)") as err:
        obs.raise_for_losses()
    assert "\n" not in str(err.value)


def test_retry_after_a_lost_reply_does_not_duplicate(embedded_db, mongo_client, tmp_path):
    name = _db_name()
    obs = make_mongo_observer(embedded_db, name, failure_dir=tmp_path)
    obs.run_entry = {"_id": 7}
    info = {}
    batch = lambda lo, hi: {"m": {"steps": list(range(lo, hi)), "values": [float(i) for i in range(lo, hi)],
                                  "timestamps": [None] * (hi - lo)}}  # fmt: skip
    def requeue(lo, hi, state):
        """Pretend the reply to the last write was lost: state rewound, its points queued again."""
        obs.writer._chunks["m"] = state
        obs.writer._pending["m"] = tuple(list(batch(lo, hi)["m"][k]) for k in ("steps", "values", "timestamps"))

    obs.log_metrics(batch(0, 10), info)  # a new chunk: an insert
    requeue(0, 15, (0, 0))  # the 10 again, 5 new behind them
    obs.log_metrics({}, info)
    assert read_metric(mongo_client[name], 7, "m")[0] == list(range(15))
    obs.log_metrics(batch(15, 18), info)  # an append: a guarded update
    requeue(15, 20, (0, 15))
    obs.log_metrics({}, info)
    assert read_metric(mongo_client[name], 7, "m")[0] == list(range(20))
    assert obs.writer.pending() == {} and obs._metric_error is None
    assert [m["name"] for m in info["metrics"]] == ["m"]


def test_points_queued_while_the_store_restarts_are_kept(tmp_path):
    """The daemon goes away mid-run: points wait in the observer, then land once it is back."""
    home, port = tmp_path / "home", free_port()
    url = db.ensure_running(home, port=port)
    try:
        obs = make_mongo_observer(url, "restart", failure_dir=tmp_path / "f", serverSelectionTimeoutMS=300)
        obs.run_entry = {"_id": 1}
        info = {}
        pts = lambda lo, hi: {"m": {"steps": list(range(lo, hi)), "values": list(range(lo, hi)),
                                    "timestamps": [None] * (hi - lo)}}  # fmt: skip
        obs.log_metrics(pts(0, 3), info)
        db.stop(home)
        obs.log_metrics(pts(3, 6), info)  # must not raise: Sacred would drop the observer
        assert metric_chunks.store_unreachable(obs._metric_error) and len(obs.writer.pending()["m"][0]) == 3
        db.ensure_running(home, port=port)
        obs.log_metrics(pts(6, 8), info)
        with pymongo.MongoClient(url) as client:
            assert read_metric(client.restart, 1, "m") == (list(range(8)), list(range(8)))
    finally:
        db.stop(home)


def test_captured_output_is_capped():
    text = "".join(f"line {i}\n" for i in range(300_000))
    out = observers._truncate_output(text, limit=100_000)
    assert len(out) < 100_200 and out.startswith("line 0\n") and out.endswith("line 299999\n")
    assert f"{len(text) - 100_000} characters of captured output dropped" in out
    assert observers._truncate_output("short") == "short"


# --------------------------------------------------------------------------- indexes


def test_observer_creates_indexes_used_by_run_id_queries(mongo_client):
    name = _db_name()
    url = f"mongodb://127.0.0.1:{mongo_client.address[1]}/{name}"
    make_mongo_observer(url)  # db name from the URL path
    database = mongo_client[name]
    keys = [list(ix["key"].keys()) for ix in database.metrics.list_indexes()]
    assert ["run_id", "name", "chunk"] in keys
    plan = database.metrics.find({"run_id": 3}).explain()["queryPlanner"]["winningPlan"]
    assert plan["inputStage"]["stage"] == "IXSCAN" and plan["inputStage"]["keyPattern"]["run_id"] == 1
    run_keys = [list(ix["key"].keys()) for ix in database.runs.list_indexes()]
    assert ["status"] in run_keys and ["start_time"] in run_keys and ["experiment.name"] in run_keys
    make_mongo_observer(url)  # idempotent


def test_observer_on_unreachable_store_fails_fast_without_password():
    url = f"mongodb://bob:hunter2-{os.getpid()}@127.0.0.1:{free_port()}/x"
    with pytest.raises(PqaError) as err:
        make_mongo_observer(url, index_timeout=0.5)
    assert f"hunter2-{os.getpid()}" not in str(err.value) and "mongodb://***:***@" in str(err.value)


# --------------------------------------------------------------------------- git without commits


def test_git_repo_without_commit(embedded_db, mongo_client, tmp_path, monkeypatch):
    import sacred.dependencies

    sacred_fixes.install()  # what make_experiment does

    repo = tmp_path / "fresh"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "exp_nocommit.py").write_text(textwrap.dedent("""
        from sacred import Experiment
        ex = Experiment("nocommit")

        @ex.main
        def main(_run):
            _run.log_scalar("x", 1.0, 0)
            return 42
    """))
    assert sacred_fixes.git_info(repo) is None and sacred_fixes.git_info(tmp_path / "no-repo-here") is None

    # Sacred's own lookup crashes while the Experiment is being built.
    with monkeypatch.context() as m:
        m.setattr(sacred.dependencies, "get_commit_if_possible", sacred_fixes.SACRED_GET_COMMIT)
        with pytest.raises(ValueError, match="does not exist"):
            _load(repo / "exp_nocommit.py")

    module = _load(repo / "exp_nocommit.py")  # with pqa's fix
    name = _db_name()
    module.ex.observers = [make_mongo_observer(embedded_db, name)]
    run = module.ex.run(options=RUN)
    doc = mongo_client[name].runs.find_one({"_id": run._id})
    assert doc["status"] == "COMPLETED" and doc["result"] == 42 and doc["experiment"]["repositories"] == []

    # Once there is a commit, the information is there again.
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "first")
    info = sacred_fixes.git_info(repo / "exp_nocommit.py")
    assert info is not None and len(info["commit"]) == 40 and info["dirty"] is False
    assert info["url"] == "git:/" + str(repo.resolve()) or info["url"].endswith(str(repo))


# --------------------------------------------------------------------------- credentials


def test_password_never_reaches_the_database(embedded_db, mongo_client, tmp_path, monkeypatch):
    password = "pw" + _secrets.token_hex(12)  # made here, so it is in no source file but the one below
    user = "u" + _secrets.token_hex(4)
    mongo_client.admin.command("createUser", user, pwd=password, roles=["root"])
    port = mongo_client.address[1]
    name = _db_name()
    url = f"mongodb://{user}:{password}@127.0.0.1:{port}/{name}?authSource=admin"
    monkeypatch.setenv("PQA_MONGO_URL", url)
    monkeypatch.setitem(SETTINGS.HOST_INFO, "CAPTURED_ENV", list(SETTINGS.HOST_INFO.CAPTURED_ENV) + ["PQA_MONGO_URL"])

    # The experiment lives in a committed repo whose remote URL carries the password as a token.
    repo = tmp_path / "proj"
    repo.mkdir()
    (repo / "exp_secret.py").write_text(textwrap.dedent(f"""
        import os
        from sacred import Experiment
        STORE = "{url}"  # a URL pasted into a source file
        ex = Experiment("secret_scan")

        @ex.config
        def cfg():
            store = os.environ["PQA_MONGO_URL"]
            password = "{password}"

        @ex.main
        def main(_run, store):
            print("connecting to", store)
            print("the password is", store.split(":")[2].split("@")[0])
            _run.info["where"] = {{"url": store, "parts": [store]}}
            for i in range(5):
                _run.log_scalar("loss", 1.0 / (i + 1), i)
            return {{"store": store}}
    """))
    _git(repo, "init", "-q")
    _git(repo, "remote", "add", "origin", f"https://{user}:{password}@git.example.com/proj.git")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "exp")

    module = _load(repo / "exp_secret.py")
    obs = make_mongo_observer(url)
    module.ex.observers = [obs]
    run = module.ex.run(
        options={**RUN, "--comment": f"stored at {url}"},
        meta_info={"cli": ["pqa", "run", "--mongo-url", url]},
    )
    assert run.status == "COMPLETED" and not obs.losses

    database = mongo_client[name]
    collections = set(database.list_collection_names())
    assert {"runs", "metrics", "fs.files", "fs.chunks"} <= collections
    scanned = 0
    for coll in collections:
        for doc in database[coll].find():
            raw = bson.encode(doc)
            assert password.encode() not in raw, f"password stored in {coll}: {doc.get('_id')}"
            scanned += 1
    assert scanned >= 4  # a run, a metric, a source file and its chunk

    doc = database.runs.find_one({"_id": run._id})
    assert doc["status"] == "COMPLETED"
    redacted = f"mongodb://***:***@127.0.0.1:{port}/{name}?authSource=admin"
    assert doc["config"]["store"] == redacted and doc["config"]["password"] == "***"
    assert doc["meta"]["comment"] == f"stored at {redacted}" and redacted in doc["meta"]["cli"]
    assert doc["host"]["ENV"]["PQA_MONGO_URL"] == redacted
    assert f"connecting to {redacted}" in doc["captured_out"] and "the password is ***" in doc["captured_out"]
    assert doc["info"]["where"] == {"url": redacted, "parts": [redacted]} and doc["result"] == {"store": redacted}
    assert doc["experiment"]["repositories"][0]["url"] == "https://***:***@git.example.com/proj.git"
    source = database.fs.files.find_one({"filename": str(repo / "exp_secret.py")})
    import gridfs

    text = gridfs.GridFS(database).get(source["_id"]).read().decode()
    assert f'STORE = "{redacted}"' in text and 'password = "***"' in text
    assert read_metric(database, run._id, "loss")[0] == [0, 1, 2, 3, 4]
    mongo_client.admin.command("dropUser", user)


def test_password_never_reaches_the_recovery_files(tmp_path):
    """What the store could not take is kept in local files for ``pqa db recover``: scrubbed like the database."""
    home, port = tmp_path / "home", free_port()
    db.ensure_running(home, port=port)
    password, user = "pw" + _secrets.token_hex(12), "u" + _secrets.token_hex(4)
    try:
        with pymongo.MongoClient(f"mongodb://127.0.0.1:{port}/", serverSelectionTimeoutMS=5000) as client:
            client.admin.command("createUser", user, pwd=password, roles=["root"])
        url = f"mongodb://{user}:{password}@127.0.0.1:{port}/dump_scan?authSource=admin"
        ex = Experiment("dump_scan", save_git_info=False)
        ex.add_config({"store": url})

        @ex.main
        def main(_run, store):
            print("connecting to", store)
            _run.log_scalar("loss", 1.0, 0)
            db.stop(home)  # the store goes away: points, the run record and the result are dumped
            _run.log_scalar("loss", 0.5, 1)
            _run.info["where"] = store
            return {"store": store}

        obs = make_mongo_observer(url, failure_dir=tmp_path / "failed", serverSelectionTimeoutMS=500, end_budget_s=2)
        ex.observers = [obs]
        ex.run(options=RUN)
        dumps = sorted((tmp_path / "failed").iterdir())
        assert len(dumps) == 1 and dumps[0].name.startswith("pqa_unstored_run_run"), dumps
        for path in dumps:
            assert password.encode() not in path.read_bytes(), path.name
        run_dump = dumps[0].read_text()
        assert f"mongodb://***:***@127.0.0.1:{port}/dump_scan" in run_dump and "connecting to mongodb://***" in run_dump
    finally:
        db.stop(home)


def test_the_end_awaits_the_last_heartbeat_which_hands_over_the_last_points():
    """Sacred's last heartbeat carries the run's last points (the evaluation's) and may still be in a store
    attempt when the run ends: the end's wait for it takes no stop flag, so a Ctrl-C cannot cut it short
    (a recovery file saved without them lost the eval series; test_reliability's Ctrl-C-twice test drives
    the whole end), and it lasts no longer than the end's deadline."""
    import threading
    import time

    from sacred.utils import IntervalTimer

    handed_over = threading.Event()

    def beat():
        if stopped.is_set():  # the last beat, still busy when the run ends
            time.sleep(0.3)
            handed_over.set()

    stopped, timer = IntervalTimer.create(beat, interval=0.01)
    timer.start()
    stopped.set()
    observers.wait_for_last_heartbeat(time.monotonic() + 10)
    assert handed_over.is_set() and not timer.is_alive()

    stuck_stop, stuck = IntervalTimer.create(lambda: time.sleep(1.5) if stuck_stop.is_set() else None, interval=0.01)
    stuck.start()
    stuck_stop.set()
    started = time.monotonic()
    observers.wait_for_last_heartbeat(started + 0.2)
    assert time.monotonic() - started < 1.0 and stuck.is_alive()  # the deadline bounds it
    stuck.join()
