"""Faults, through the ``pqa`` CLI as users meet them, against real SecantusDB daemons (never a mock):

* ``kill -9`` at a random step, then ``resume=<run id>``: same result, weights and metric values as an
  uninterrupted run with the same seed;
* the database stopped mid-run: restarted while the run goes on (every point lands), or still down
  when the run ends (points, artifact and run record land in recovery files; ``pqa db recover``
  uploads them, the run ends COMPLETED);
* four runs at once against one database; a folder a live run writes is refused to a second process;
* bad input: data lines, MongoDB URL, checkpoints for ``init_from``/``resume`` (refused before the run
  is created), optimizer state of another setting (the run stored FAILED), a plugin that raises.
  Each is one ``Error:`` line with its exit code and no traceback, and leaves nothing behind.

Every run uses the tiny random model (``with smoke``, one thread). The kill step is drawn at random;
``PQA_TEST_KILL_SEED`` replays a draw (the seed is in every failure message).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pymongo
import pytest

from pqa_core.storage.run_lock import LOCK_FILE
from pqa_experiments.store import db as pqa_db
from pqa_experiments.store.metric_chunks import read_metric

from conftest import free_port

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "pqa_core" / "data" / "sample_data"
# checkpoints every 2 write steps (10 in all) and every 3 read steps (14 in all)
RUN_ARGS = ["with", "smoke", "threads=1", "write.checkpoint_every=2", "read.checkpoint_every=3"]
SAFETY_TIMEOUT_S = 900  # only so that a hung run cannot hang the suite; nothing is timed


def pqa_env(tmp: Path, **extra) -> dict:
    env = dict(os.environ, PQA_PROGRESS="0", PYTHONUNBUFFERED="1", PQA_OUTPUT_DIR=str(tmp / "outputs"),
               PQA_HOME=str(tmp / "pqa_home"))
    env.pop("PQA_MONGO_URL", None)
    env.update(extra)
    return env


def pqa(*args, env, check=True):
    proc = subprocess.run([sys.executable, "-m", "pqa_experiments.cli.main", *args], capture_output=True, text=True,
                          env=env, timeout=SAFETY_TIMEOUT_S, cwd=str(REPO))
    if check and proc.returncode != 0:
        raise AssertionError(f"pqa {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def start_pqa(*args, env, log: Path) -> subprocess.Popen:
    """A ``pqa`` command in the background, stdout+stderr into ``log`` (read while it runs)."""
    out = open(log, "w")
    try:
        return subprocess.Popen([sys.executable, "-m", "pqa_experiments.cli.main", *args], stdout=out,
                                stderr=subprocess.STDOUT, text=True, env=env, cwd=str(REPO))
    finally:
        out.close()  # the child has its own copy


@contextlib.contextmanager
def background_pqa(*args, env, log: Path):
    """``start_pqa`` for the block; killed at the end if it still runs (a failing test leaves no run behind)."""
    proc = start_pqa(*args, env=env, log=log)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def assert_refused(proc, message: str, code: int = 1, only_line: bool = True) -> str:
    """One clear line: exit ``code``, the last stderr line is ``Error: ...`` and holds ``message``
    (with ``only_line``, nothing else is on stderr), and no traceback anywhere."""
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("Error: ") and message in lines[-1], proc.stderr
    assert not only_line or len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    return lines[-1]


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` (hidden ones too) with its size and mtime: equal snapshots, nothing written."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))} if folder.exists() else {}


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def wait_for(condition, proc: subprocess.Popen, what: str, log: Path, context: str = "") -> None:
    """Poll ``condition`` while ``proc`` runs; fail with its output if it ends first."""
    deadline = time.monotonic() + SAFETY_TIMEOUT_S
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"{context}the run ended (exit {proc.returncode}) before {what}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{context}gave up waiting for {what}")
        time.sleep(0.05)


def checkpoint_appeared(outputs: Path, phase: str, step: int):
    return lambda: any(outputs.glob(f"pqa_pipeline/*/checkpoints/{phase}/step-{step:07d}/MANIFEST.json"))


def all_metrics(database, run_id) -> dict:
    """{name: (steps, values)} of a stored run, every chunk of every series."""
    names = sorted({d["name"] for d in database.metrics.find({"run_id": run_id}, {"name": 1})})
    return {name: read_metric(database, run_id, name) for name in names}


def points(metrics: dict) -> int:
    return sum(len(steps) for steps, _ in metrics.values())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def model_files(output_dir: Path) -> dict:
    final = output_dir / "checkpoints" / "read" / "final"
    return {name: sha256(final / name) for name in ("model.safetensors", "adapter/adapter_model.safetensors")}


@pytest.fixture(scope="module")
def store(embedded_db):
    """The session's embedded server with a database of this module's own."""
    name = f"pqa_rel_{uuid.uuid4().hex[:8]}"
    client = pymongo.MongoClient(embedded_db, serverSelectionTimeoutMS=10_000)
    yield {"url": embedded_db.rstrip("/") + "/" + name, "db": client[name]}
    client.close()


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory):
    """One uninterrupted run: what every faulted run must end up equal to."""
    tmp = tmp_path_factory.mktemp("reference")
    proc = pqa("run", "pipeline", "--mongo-url", store["url"], "--json", *RUN_ARGS, env=pqa_env(tmp))
    reported = last_json(proc.stdout)
    doc = store["db"].runs.find_one({"_id": reported["run_id"]})
    assert doc["status"] == "COMPLETED"
    metrics = all_metrics(store["db"], doc["_id"])
    assert metrics["write.loss"][0] == list(range(1, 11)) and metrics["read.total_loss"][0] == list(range(1, 15))
    return {"run_id": doc["_id"], "result": reported["result"], "metrics": metrics,
            "output_dir": Path(doc["info"]["output_dir"])}


# --------------------------------------------------------------------------- kill -9 and resume


def test_kill_9_at_a_random_step_then_resume_by_run_id_equals_an_uninterrupted_run(store, reference, tmp_path):
    seed = int(os.environ.get("PQA_TEST_KILL_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    phase, step = rng.choice([("write", s) for s in (2, 4, 6, 8)] + [("read", s) for s in (3, 6, 9)])
    delay = rng.uniform(0.0, 0.6)  # into the steps after that checkpoint, possibly into the next one
    context = f"[PQA_TEST_KILL_SEED={seed}: kill {delay:.2f}s after {phase} step {step}] "
    env, log = pqa_env(tmp_path), tmp_path / "victim.log"
    outputs = tmp_path / "outputs"

    with background_pqa("run", "pipeline", "--mongo-url", store["url"], "--json", *RUN_ARGS, env=env, log=log) as victim:
        wait_for(checkpoint_appeared(outputs, phase, step), victim, f"{phase} step {step}", log, context)
        time.sleep(delay)
        assert victim.poll() is None, context + "the run finished before the kill"
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
    assert victim.returncode == -signal.SIGKILL, context

    dead = store["db"].runs.find_one({"status": "RUNNING"})  # killed: Sacred could not record an end
    assert dead is not None, context
    output_dir = Path(dead["info"]["output_dir"])
    assert not (output_dir / "result.json").exists(), context
    left = sorted(p.parent.name + "/" + p.name for p in output_dir.glob("checkpoints/*/*") if not p.name.startswith("."))
    assert left, context
    # the dead run's lock file is still there; the kernel released its lock with the process
    assert (output_dir / LOCK_FILE).read_text().strip() == str(victim.pid), context
    assert_dead_run_is_marked(store, dead, env)

    proc = pqa("run", "pipeline", "--mongo-url", store["url"], "--json", *RUN_ARGS, f"resume={dead['_id']}", env=env)
    resumed = last_json(proc.stdout)
    assert resumed["result"] == reference["result"], context + f"checkpoints left by the kill: {left}"
    assert resumed["run_id"] not in (dead["_id"], reference["run_id"])  # a resumed run is a new run
    doc = store["db"].runs.find_one({"_id": resumed["run_id"]})
    assert doc["status"] == "COMPLETED" and doc["config"]["resume"] == str(output_dir)
    assert doc["info"]["resumed_from_run"] == dead["_id"] and doc["info"]["output_dir"] == str(output_dir)
    assert not (output_dir / LOCK_FILE).exists()  # the resumed run took the lock, and gave it back at its end
    assert f"{phase}_resumed_from" in doc["info"] or f"{phase}/final" in left, context + str(left)
    # same weights, byte for byte, and the same value at every step the resumed run logged
    assert model_files(output_dir) == model_files(reference["output_dir"]), context
    for name, (steps, values) in all_metrics(store["db"], doc["_id"]).items():
        expected = dict(zip(*reference["metrics"][name]))
        assert values == [expected[s] for s in steps], context + name
    for name, total in (("write", 10), ("read", 14)):  # each phase goes on right after its last checkpoint
        done = [int(c.split("-")[1]) for c in left if c.startswith(f"{name}/step-")]
        expected_steps = [] if f"{name}/final" in left else list(range(max(done, default=0) + 1, total + 1))
        assert read_metric(store["db"], doc["_id"], f"{name}.{'loss' if name == 'write' else 'total_loss'}")[0] \
            == expected_steps, context + str(left)
    print(f"{context}left {left}; resumed run {doc['_id']} from run {dead['_id']}: result {resumed['result']}")


def assert_dead_run_is_marked(store, dead, env) -> None:
    """Time passes (its stored heartbeat moves back past DEAD_AFTER_S): ``pqa runs list`` shows the killed run
    PROBABLY_DEAD, as Omniboard does, and ``pqa db recover`` stores it so."""
    from pqa_experiments.store.runs import DEAD_AFTER_S

    def listed(*args):
        return {r["id"]: r["status"] for r in json.loads(pqa("runs", "list", "--mongo-url", store["url"], "--json",
                                                             *args, env=env).stdout)}

    assert listed()[dead["_id"]] == "RUNNING"  # beat a moment ago: alive as far as anyone can tell
    past = _dt.timedelta(seconds=DEAD_AFTER_S + 1)
    store["db"].runs.update_one({"_id": dead["_id"]}, {"$set": {"heartbeat": dead["heartbeat"] - past,
                                                                "start_time": dead["start_time"] - past}})
    assert listed()[dead["_id"]] == "PROBABLY_DEAD"
    assert dead["_id"] in listed("--status", "PROBABLY_DEAD") and dead["_id"] not in listed("--status", "RUNNING")
    out = pqa("db", "recover", "--mongo-url", store["url"], env=env).stdout
    assert f"stored as PROBABLY_DEAD (RUNNING, no heartbeat for over {DEAD_AFTER_S} s): runs {dead['_id']}" in out
    assert store["db"].runs.find_one({"_id": dead["_id"]})["status"] == "PROBABLY_DEAD"


@pytest.mark.parametrize("resume, message", [
    ("999999", "resume=999999: no run 999999 in mongodb://127.0.0.1:"),
    ("{empty}", "no checkpoint under"),
    ("{missing}", "no such folder"),
])
def test_resume_of_a_missing_run_or_checkpoint_is_one_line(store, tmp_path, resume, message):
    (tmp_path / "empty").mkdir()
    resume = resume.format(empty=tmp_path / "empty", missing=tmp_path / "missing")
    before = store["db"].runs.count_documents({})
    proc = pqa("run", "pipeline", "--mongo-url", store["url"], *RUN_ARGS, f"resume={resume}",
               env=pqa_env(tmp_path), check=False)
    assert_refused(proc, message)
    assert store["db"].runs.count_documents({}) == before
    assert not (tmp_path / "outputs").exists() and snapshot(tmp_path / "empty") == {}


def test_a_checkpoint_is_continued_only_under_the_configuration_that_made_it(store, reference, tmp_path):
    """A finished run's folder: another run may not load its checkpoints as its own; a resume under another
    seed or with shuffled data is one line naming what differs; force_resume=True continues and says so."""
    folder = tmp_path / "finished"
    shutil.copytree(reference["output_dir"], folder)
    env, before = pqa_env(tmp_path), store["db"].runs.count_documents({})
    fingerprints = {json.loads(m.read_text())["fingerprint"]["digest"]
                    for m in folder.glob("checkpoints/*/*/MANIFEST.json")}
    stored = store["db"].runs.find_one({"_id": reference["run_id"]})
    assert fingerprints == {stored["info"]["fingerprint"]}  # every checkpoint, and the run, record one
    untouched = snapshot(folder)

    def run(*args):
        return pqa("run", "pipeline", "--mongo-url", store["url"], *RUN_ARGS, *args, env=env, check=False)

    assert_refused(run("seed=9", f"output_dir={folder}"), f"output_dir={folder} already holds checkpoints", code=2)
    assert_refused(run("seed=9", f"resume={folder}"),
                   f"resume={folder}: {folder}/checkpoints/write/final was made under another configuration: "
                   "seed=0 (now 9); resume with the same configuration and data, or add force_resume=True")
    shuffled = tmp_path / "corpus.jsonl"
    shuffled.write_bytes(b"\n".join(reversed((SAMPLE / "corpus.jsonl").read_bytes().splitlines())) + b"\n")
    line = assert_refused(run(f"data.corpus={shuffled}", f"resume={folder}"), "was made under another configuration")
    assert re.search(r"data\.corpus\.sha256=[0-9a-f]{10}… \(now [0-9a-f]{10}…\)", line), line
    assert store["db"].runs.count_documents({}) == before and snapshot(folder) == untouched

    proc = run("seed=9", f"resume={folder}", "force_resume=True", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "warning: force_resume=True: " in proc.stderr and "seed=0 (now 9) (recorded in the run)" in proc.stderr
    doc = store["db"].runs.find_one({"_id": last_json(proc.stdout)["run_id"]})
    assert doc["status"] == "COMPLETED" and doc["config"]["force_resume"] is True
    assert [line.split(" was made")[0] for line in doc["info"]["resume_forced"]] == \
        [f"{folder}/checkpoints/write/final", f"{folder}/checkpoints/read/final"]
    assert all(line.endswith("seed=0 (now 9)") for line in doc["info"]["resume_forced"])


# --------------------------------------------------------------------------- the database goes away


@pytest.fixture
def own_db(tmp_path):
    """A daemon of this test's own, to stop and restart by PID; stopped at the end."""
    home, port = tmp_path / "db_home", free_port()
    pqa_db.ensure_running(home, port=port)
    name = f"pqa_outage_{uuid.uuid4().hex[:8]}"
    client = pymongo.MongoClient(f"mongodb://127.0.0.1:{port}", serverSelectionTimeoutMS=20_000)
    yield {"home": home, "port": port, "name": name, "db": client[name], "url": f"mongodb://127.0.0.1:{port}/{name}"}
    client.close()
    pqa_db.stop(home)


def utc_now() -> _dt.datetime:
    """Now as Sacred stamps metric points: naive UTC."""
    return _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)


def logged_between(database, run_id, start, end) -> int:
    """How many stored points of the run were logged between ``start`` and ``end`` (naive UTC)."""
    names = {d["name"] for d in database.metrics.find({"run_id": run_id}, {"name": 1})}
    return sum(start <= t <= end for n in names for t in read_metric(database, run_id, n, with_timestamps=True)[2])


def assert_same_as_reference(database, run_id, reference) -> int:
    stored = all_metrics(database, run_id)
    assert stored == reference["metrics"], {n: len(s) for n, (s, _) in stored.items()}
    return points(stored)


def held_end(tmp_path: Path) -> tuple:
    """(env entry, release): pqa's wait for the store at the end of the run is held open until
    ``release()``, so what the test does during that wait never races the clock (``HOLD_END_ENV``)."""
    from pqa_experiments.store.observers import HOLD_END_ENV

    flag = tmp_path / "release-the-end"
    return {HOLD_END_ENV: str(flag)}, lambda: flag.write_text("")


def test_database_stopped_mid_run_and_restarted_loses_no_point(own_db, reference, tmp_path):
    hold, release = held_end(tmp_path)
    env, log = pqa_env(tmp_path, **hold), tmp_path / "run.log"
    # A write into the outage gives up after 5 s (default 30 s) and is retried at the next heartbeat
    # (Sacred: every 10 s) or, once the run ends, up to 3 more times.
    url = own_db["url"] + "?serverSelectionTimeoutMS=5000"
    with background_pqa("run", "pipeline", "--mongo-url", url, "--json", *RUN_ARGS, env=env, log=log) as proc:
        wait_for(checkpoint_appeared(tmp_path / "outputs", "write", 2), proc, "write step 2", log)
        assert pqa_db.stop(own_db["home"])
        down = utc_now()
        # Training goes on; wait until the observer has tried to write into the outage and failed.
        wait_for(lambda: "not stored yet" in log.read_text() or "run document not updated" in log.read_text(),
                 proc, "a failed write during the outage", log)
        pqa_db.ensure_running(own_db["home"], port=own_db["port"])
        up = utc_now()
        release()  # had the run ended during the outage, its end waited for the store until now
        proc.wait(timeout=SAFETY_TIMEOUT_S)
    output = log.read_text()
    assert proc.returncode == 0, output
    run_id = last_json(output)["run_id"]
    doc = own_db["db"].runs.find_one({"_id": run_id})
    assert doc["status"] == "COMPLETED" and "fail_trace" not in doc, doc.get("fail_trace")
    assert doc["result"] == reference["result"]
    stored = assert_same_as_reference(own_db["db"], run_id, reference)
    assert stored == points(reference["metrics"])
    assert not list((tmp_path / "pqa_home").glob("failed_runs/pqa_unstored_*"))  # nothing left aside
    during = logged_between(own_db["db"], run_id, down, up)
    assert during > 0
    print(f"outage mid-run: {points(reference['metrics'])} points logged ({during} while the database was down), "
          f"{stored} stored")


END_LIMIT_S = 60  # pqa waits at most ~27 s for a store that is down at the end; Sacred alone waited ~6 min


def run_into_an_outage(own_db, tmp_path, ctrl_c: int = 0):
    """A run whose store goes down at read step 3 and stays down (default server selection timeout,
    so every bound is pqa's own). pqa's wait at the end is held open until pqa has said that it waits
    (``held_end``): then, with ``ctrl_c``, that many SIGINTs arrive while it waits, however slow the
    machine; without, the wait is released and runs its own budget.
    Returns (output, seconds from the release or the first SIGINT to the exit, the saved recovery file)."""
    hold, release = held_end(tmp_path)
    env, log = pqa_env(tmp_path, **hold), tmp_path / "run.log"
    with background_pqa("run", "pipeline", "--mongo-url", own_db["url"], "--json", *RUN_ARGS, env=env,
                        log=log) as proc:
        wait_for(checkpoint_appeared(tmp_path / "outputs", "read", 3), proc, "read step 3", log)
        assert pqa_db.stop(own_db["home"])
        wait_for(lambda: "Completed after" in log.read_text(), proc, "the end of training", log)
        wait_for(lambda: "does not answer" in log.read_text(), proc, "the message that pqa waits", log)
        completed = time.monotonic()
        if ctrl_c:
            for _ in range(ctrl_c):  # the wait is held: the first always meets it; the next comes at any later
                proc.send_signal(signal.SIGINT)  # moment (a user's second press), each of which must lose nothing
                time.sleep(0.2)
        else:
            release()
        proc.wait(timeout=SAFETY_TIMEOUT_S)
        ended = time.monotonic() - completed
    output = log.read_text()
    assert proc.returncode == 1 or (ctrl_c and proc.returncode == -signal.SIGINT), output
    assert "Traceback" not in output, output[-3000:]
    saved = sorted((tmp_path / "pqa_home" / "failed_runs").glob("pqa_unstored_*"))
    assert len(saved) == 1 and saved[0].suffix == ".json", saved  # one file per run, JSON, never pickle
    return output, ended, saved[0]


def recover_and_compare(own_db, reference, tmp_path) -> dict:
    """``pqa db recover`` as a user runs it: says what it restored to which run; the run then equals the reference."""
    pqa_db.ensure_running(own_db["home"], port=own_db["port"])
    database = own_db["db"]
    run_id = database.runs.find_one({})["_id"]
    before = points(all_metrics(database, run_id))
    out = pqa("db", "recover", "--mongo-url", own_db["url"], env=pqa_env(tmp_path)).stdout
    restored = int(re.search(rf"run {run_id} \(\w+\): restored (\d+) metric points", out).group(1))
    assert f"restored {restored} metric points and 1 artifacts to 1 runs ({run_id})" in out, out
    doc = database.runs.find_one({"_id": run_id})
    assert doc["status"] == "COMPLETED" and "fail_trace" not in doc, doc.get("fail_trace")
    assert doc["result"] == reference["result"] and "pqa_unstored" not in doc["info"]
    assert doc["info"]["pqa_recovered"]["points"] == restored > 0
    stored = assert_same_as_reference(database, run_id, reference)
    assert stored == before + restored == points(reference["metrics"])
    predictions = {a["name"]: a["file_id"] for a in doc["artifacts"]}["predictions.jsonl"]
    import gridfs

    assert gridfs.GridFS(database).get(predictions).read() == (Path(doc["info"]["output_dir"]) /
                                                              "predictions.jsonl").read_bytes()
    return {"run_id": run_id, "before": before, "restored": restored, "stored": stored}


def test_database_down_when_the_run_ends_is_fast_one_line_then_pqa_db_recover(own_db, reference, tmp_path):
    output, ended, saved = run_into_an_outage(own_db, tmp_path)
    assert ended < END_LIMIT_S, f"{ended:.0f} s from the release of the wait to the exit"
    waiting = [line for line in output.splitlines() if "does not answer" in line]
    assert len(waiting) == 1 and "Ctrl-C stops waiting" in waiting[0], waiting
    errors = [line for line in output.splitlines() if "did not take" in line]
    assert len(errors) == 1 and errors[0] == output.strip().splitlines()[-1], errors  # one line, printed once
    assert re.match(r"Error: run \d+ ended COMPLETED, but the run store did not take \d+ metric points of \d+ "
                    r"series, 1 artifact \(predictions.jsonl\) and the final record \(.*\); saved in "
                    rf"{re.escape(str(saved))}: `pqa db recover` uploads it once the database is back$", errors[0])
    assert len(errors[0]) < 600, errors[0]
    data = saved.read_bytes()

    result = recover_and_compare(own_db, reference, tmp_path)
    failed = saved.parent
    assert [p.name for p in (failed / "recovered").iterdir()] == [saved.name] and not list(failed.glob("pqa_*"))
    # Idempotent: nothing left to do; and the same file again (a recover cut short) adds nothing.
    env, database, run_id = pqa_env(tmp_path), own_db["db"], result["run_id"]
    again = json.loads(pqa("db", "recover", "--mongo-url", own_db["url"], "--json", env=env).stdout)
    assert again["files"] == 0 and again["points_uploaded"] == 0
    saved.write_bytes(data)
    replay = json.loads(pqa("db", "recover", "--mongo-url", own_db["url"], "--json", env=env).stdout)
    assert replay["runs_recovered"] == 1 and replay["points_uploaded"] == 0 and replay["artifacts_uploaded"] == 0
    assert replay["points_already_stored"] == result["restored"]
    assert assert_same_as_reference(database, run_id, reference) == result["stored"]
    assert [a["name"] for a in database.runs.find_one({"_id": run_id})["artifacts"]] == ["predictions.jsonl"]
    print(f"outage at the end: {ended:.1f} s from 'Completed after' to the exit; {result['before']} points stored "
          f"during the run, {result['restored']} restored by pqa db recover, {result['stored']} stored")


def test_ctrl_c_twice_while_the_store_is_awaited_loses_nothing(own_db, reference, tmp_path):
    output, ended, saved = run_into_an_outage(own_db, tmp_path, ctrl_c=2)
    assert "stopped waiting for the run store (Ctrl-C)" in output, output[-2000:]
    assert "INTERRUPTED" not in saved.read_text()  # the run finished: its saved status is COMPLETED
    result = recover_and_compare(own_db, reference, tmp_path)
    print(f"Ctrl-C twice at the end: exit after {ended:.1f} s, {result['restored']} points restored, "
          f"{result['stored']} stored")


# --------------------------------------------------------------------------- concurrency


def test_four_runs_at_once_get_unique_ids_and_every_point(store, reference, tmp_path):
    logs = [tmp_path / f"run{i}.log" for i in range(4)]
    with contextlib.ExitStack() as stack:
        procs = [stack.enter_context(background_pqa("run", "pipeline", "--mongo-url", store["url"], "--json",
                                                    *RUN_ARGS, env=pqa_env(tmp_path), log=log)) for log in logs]
        for proc in procs:
            proc.wait(timeout=SAFETY_TIMEOUT_S)
    outputs = [log.read_text() for log in logs]
    assert [proc.returncode for proc in procs] == [0] * 4, "\n".join(outputs)
    ids = [last_json(out)["run_id"] for out in outputs]
    assert len(set(ids)) == 4
    dirs = set()
    for run_id in ids:
        doc = store["db"].runs.find_one({"_id": run_id})
        assert doc["status"] == "COMPLETED" and doc["result"] == reference["result"]
        assert_same_as_reference(store["db"], run_id, reference)
        dirs.add(doc["info"]["output_dir"])
    assert len(dirs) == 4
    print(f"4 concurrent runs {ids}: {4 * points(reference['metrics'])} points logged and stored")


def test_a_folder_a_live_run_writes_is_refused_to_a_second_process(store, tmp_path):
    """A resume of a run that still runs, by id or folder, and a second run into its folder: each is one
    line before anything is stored, and the running run goes on undisturbed."""
    env, log, folder = pqa_env(tmp_path), tmp_path / "victim.log", tmp_path / "shared"
    slow = [*RUN_ARGS, "write.epochs=1000"]  # still running whatever the machine's load; killed below
    with background_pqa("run", "pipeline", "--mongo-url", store["url"], "--json", *slow, f"output_dir={folder}",
                        env=env, log=log) as victim:
        wait_for(lambda: (folder / "checkpoints" / "write" / "step-0000002" / "MANIFEST.json").exists(), victim,
                 "write step 2", log)
        running = store["db"].runs.find_one({"info.output_dir": str(folder.resolve())})
        assert running["status"] == "RUNNING"
        before = store["db"].runs.count_documents({})
        attempts = [[f"resume={running['_id']}"], [f"resume={folder}"], [f"output_dir={folder}"]]
        procs = [subprocess.Popen([sys.executable, "-m", "pqa_experiments.cli.main", "run", "pipeline", "--mongo-url",
                                   store["url"], *slow, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env, cwd=str(REPO)) for args in attempts]  # at once
        for proc, args in zip(procs, attempts):
            out, err = proc.communicate(timeout=SAFETY_TIMEOUT_S)
            line = assert_refused(subprocess.CompletedProcess(args, proc.returncode, out, err),
                                  f": in use by another pqa run (pid {victim.pid},")
            assert line.startswith(f"Error: {folder.resolve() if args[0] == attempts[0][0] else folder}: "), line
        assert store["db"].runs.count_documents({}) == before
        assert victim.poll() is None and (folder / LOCK_FILE).read_text().strip() == str(victim.pid)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
    print(f"folder in use: {len(attempts)} attempts refused while run {running['_id']} (pid {victim.pid}) ran")


# --------------------------------------------------------------------------- bad input

HUGE = b"<a 100 MB line>"


def _data_file_with(tmp_path: Path, sample: str, line_no, line: bytes) -> Path:
    """The sample file with line ``line_no`` replaced (``None``: the file emptied; ``HUGE``: a 100 MB line)."""
    lines = (SAMPLE / sample).read_bytes().splitlines()
    path = tmp_path / sample
    with open(path, "wb") as out:
        for number, text in enumerate(lines if line_no is not None else [], start=1):
            if number != line_no:
                out.write(text + b"\n")
            elif line is HUGE:
                out.write(b'{"doc_id": 4, "title": "t", "text": "')
                for _ in range(100):
                    out.write(b"x" * (1 << 20))
                out.write(b'"}\n')
            else:
                out.write(line + b"\n")
    return path


def _qa_line(**fields) -> bytes:
    line = {"id": "bad", "question": "When was Marrowick founded?", "answers": ["1712"], "gold_doc_ids": [0]}
    return json.dumps({**line, **fields}).encode()


@pytest.mark.parametrize("sample, line_no, line, message", [
    ("corpus.jsonl", 5, b'{"doc_id": 4, "title": "t", "text": ', ":5: invalid JSON"),
    ("corpus.jsonl", 5, b'{"doc_id": 4, "title": "t"}', ":5: missing field 'text'"),
    ("corpus.jsonl", 5, b'{"doc_id": 4, "title": "t", "text": 7}', ":5: field 'text': expected a string, got integer"),
    ("corpus.jsonl", None, b"", ": corpus is empty"),
    ("corpus.jsonl", 5, b'{"doc_id": 0, "text": "again"}', ":5: field 'doc_id': duplicate doc id 0 (first on line 1)"),
    ("qa_train.jsonl", 3, _qa_line(gold_doc_ids=[36]),
     ":3: field 'gold_doc_ids': doc id 36 is not in the corpus (36 documents)"),
    ("qa_eval.jsonl", 2, _qa_line(answers=["1712", 1712]), ":2: field 'answers': item 1 is integer, expected a string"),
    ("corpus.jsonl", 5, b'{"doc_id": 4, "title": "t", "text": "caf\xe9"}', ":5: not valid UTF-8"),
    ("corpus.jsonl", 5, HUGE, ":5: line is longer than the limit of 16777216 bytes"),
], ids=["malformed-json", "missing-field", "wrong-type", "empty-corpus", "duplicate-doc-id", "gold-id-out-of-range",
        "answers-not-strings", "non-utf8", "100MB-line"])
def test_bad_data_line_names_file_line_and_field_and_stores_nothing(store, tmp_path, sample, line_no, line, message):
    path = _data_file_with(tmp_path, sample, line_no, line)
    key = {"corpus.jsonl": "corpus", "qa_train.jsonl": "qa", "qa_eval.jsonl": "eval_qa"}[sample]
    before = store["db"].runs.count_documents({})
    try:
        proc = pqa("run", "pipeline", "--mongo-url", store["url"], *RUN_ARGS, f"data.{key}={path}",
                   env=pqa_env(tmp_path), check=False)
    finally:
        path.unlink()  # 100 MB is too much to keep among pytest's last runs
    assert assert_refused(proc, message).startswith(f"Error: {path}{message}")
    assert store["db"].runs.count_documents({}) == before
    assert not (tmp_path / "outputs").exists()


def test_debug_prints_the_traceback_of_a_refused_input(store, tmp_path):
    path = _data_file_with(tmp_path, "corpus.jsonl", 5, b'{"doc_id": 4}')
    proc = pqa("--debug", "run", "pipeline", "--mongo-url", store["url"], *RUN_ARGS, f"data.corpus={path}",
               env=pqa_env(tmp_path), check=False)
    assert proc.returncode == 1 and "Traceback" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"pqa_core.errors.DataError: {path}:5: missing field 'text'"


def test_bad_mongodb_url_is_a_usage_error(tmp_path):
    proc = pqa("run", "pipeline", "--mongo-url", "http://user:pw-123456@127.0.0.1/x", *RUN_ARGS,
               env=pqa_env(tmp_path), check=False)
    assert_refused(proc, "unsupported MongoDB URL scheme", code=2)
    assert "pw-123456" not in proc.stderr and not (tmp_path / "outputs").exists()


def _rewrite(folder: Path, name: str, data: bytes, manifest_agrees: bool = True) -> None:
    """Replace ``folder/name``; with ``manifest_agrees`` the manifest is edited to match (only the file's
    own check can find it), else the manifest still describes the old file (a half-written one)."""
    (folder / name).write_bytes(data)
    if manifest_agrees:
        manifest = json.loads((folder / "MANIFEST.json").read_text())
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        (folder / "MANIFEST.json").write_text(json.dumps(manifest))


class _Payload:
    """Unpickling this creates the file named by ``marker``: the proof that pickled code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _bad_checkpoint(reference, tmp_path, case: str, how: str):
    """(Sacred args, the message, the folder that must stay untouched) for one bad checkpoint given to
    ``init_from`` (a write step checkpoint) or ``resume`` (a run folder whose last checkpoint it is)."""
    if case == "missing":
        return [f"{how}={tmp_path / 'nothing'}"], "no checkpoint found", tmp_path / "nothing"
    run = tmp_path / "crashed"
    folder = run / "checkpoints" / "write" / "step-0000004"
    shutil.copytree(reference["output_dir"] / "checkpoints" / "write" / "step-0000004", folder)
    args, message = [], None
    if case == "other_size":
        args, message = ["model.num_memory_tokens=4"], \
            f"{folder}: checkpoint was made for num_memory_tokens=2, this model has num_memory_tokens=4"
    elif case == "other_model":
        args, message = ["model.llm=smollm2-135m"], \
            f"{folder}: checkpoint was made for llm='tiny', this model has llm='smollm2-135m'"
    elif case == "other_lora_rank":
        args, message = ["model.lora.r=8"], f"{folder}: checkpoint was made for lora_r=4, this model has lora_r=8"
    elif case == "corrupt_safetensors":
        _rewrite(folder, "model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" + os.urandom(64))
        message = f"{folder / 'model.safetensors'}: not a valid safetensors file"
    elif case == "pickle":
        import pickle

        _rewrite(folder, "model.safetensors", pickle.dumps({"doc_vectors": _Payload(tmp_path / "pwned")}))
        message = f"{folder / 'model.safetensors'}: not a valid safetensors file"
    elif case == "half_written":
        data = (folder / "model.safetensors").read_bytes()
        _rewrite(folder, "model.safetensors", data[:len(data) // 2], manifest_agrees=False)
        message = f"{folder / 'model.safetensors'}: contents do not match MANIFEST.json"
    elif case == "torn":
        if how == "resume":  # a later step folder without its manifest: the last checkpoint is torn
            folder = folder.with_name("step-0000006")
            shutil.copytree(reference["output_dir"] / "checkpoints" / "write" / "step-0000006", folder)
        (folder / "MANIFEST.json").unlink()
        message = f"{folder}: incomplete checkpoint (MANIFEST.json missing"
    return [f"{how}={run if how == 'resume' else folder}", *args], message, run


@pytest.mark.parametrize("how, case", [
    *[("init_from", case) for case in ("missing", "other_size", "other_model", "other_lora_rank",
                                       "corrupt_safetensors", "pickle", "half_written", "torn")],
    *[("resume", case) for case in ("other_size", "corrupt_safetensors", "half_written", "torn")],
])
def test_bad_checkpoint_is_one_line_before_the_run_is_created(store, reference, tmp_path, how, case):
    args, message, folder = _bad_checkpoint(reference, tmp_path, case, how)
    before, files = store["db"].runs.count_documents({}), snapshot(folder)
    proc = pqa("run", "eval" if how == "init_from" else "pipeline", "--mongo-url", store["url"], "--json", *RUN_ARGS,
               *args, env=pqa_env(tmp_path), check=False)
    assert_refused(proc, message)
    assert store["db"].runs.count_documents({}) == before  # refused before the run was created
    assert not (tmp_path / "outputs").exists() and snapshot(folder) == files  # nothing written, no lock left
    assert not (tmp_path / "pwned").exists()  # the pickle was never unpickled


def test_optimizer_state_of_another_setting_is_stored_failed_one_line(store, reference, tmp_path):
    """Saved without LoRA in the write optimizer, resumed with it: the same model, other param groups. The
    fingerprint refuses it before a run exists; forced, only the built optimizer shows it, so the run
    starts, and is stored FAILED with the one-line reason."""
    run = tmp_path / "crashed"
    step = run / "checkpoints" / "write" / "step-0000004"
    shutil.copytree(reference["output_dir"] / "checkpoints" / "write" / "step-0000004", step)
    files = snapshot(run)
    args = ["run", "pipeline", "--mongo-url", store["url"], *RUN_ARGS, f"resume={run}", "write.train_lora=True"]
    assert_refused(pqa(*args, env=pqa_env(tmp_path), check=False), "write.train_lora=False (now True)")
    proc = pqa(*args, "force_resume=True", env=pqa_env(tmp_path), check=False)
    line = assert_refused(proc, f"{step / 'optimizer.safetensors'}: optimizer state of another model or training "
                                "setting (2 param groups saved, 3 here)", only_line=False)
    assert line.startswith(f"Error: {step / 'optimizer.safetensors'}") and "lora: " in line  # names the groups
    doc = store["db"].runs.find_one({"config.resume": str(run)}, sort=[("_id", -1)])
    assert doc["status"] == "FAILED" and line[len("Error: "):] in doc["fail_trace"][-1]
    assert snapshot(run) == files  # nothing written into the folder, the lock file gone
    assert not (tmp_path / "outputs").exists()


BOOM_PLUGIN = '''
import torch
from pqa_core.hookspecs import hookimpl
from pqa_core.interfaces import Selector

class BoomSelector(Selector):
    """Raises when it scores without gradients: pre-flight's contract check calls it with gradients and
    passes, so the failure comes mid-run (the run's first retrieval evaluation)."""
    def forward(self, query_vectors, doc_vectors):
        if torch.is_grad_enabled():
            return query_vectors @ doc_vectors.T
        raise RuntimeError("boom from the selector plugin")

@hookimpl
def pqa_register_selectors(register):
    register("boom", BoomSelector)
'''


def _installed_boom_plugin(tmp_path: Path) -> str:
    """A distribution with a ``pqa`` entry point registering selector ``boom``; returns its site folder."""
    site = tmp_path / "site"
    (site / "pqa_test_boom-0.1.dist-info").mkdir(parents=True)
    (site / "pqa_test_boom.py").write_text(textwrap.dedent(BOOM_PLUGIN))
    (site / "pqa_test_boom-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: pqa-test-boom\nVersion: 0.1\n")
    (site / "pqa_test_boom-0.1.dist-info" / "entry_points.txt").write_text("[pqa]\nboom = pqa_test_boom\n")
    return str(site)


@pytest.mark.parametrize("debug", [False, True])
def test_plugin_that_raises_mid_run_is_stored_failed_one_line(store, tmp_path, debug):
    env = pqa_env(tmp_path, PYTHONPATH=os.pathsep.join([_installed_boom_plugin(tmp_path), os.environ.get("PYTHONPATH", "")]))
    proc = pqa(*(["--debug"] if debug else []), "run", "pipeline", "--mongo-url", store["url"], *RUN_ARGS,
               "selector.name=boom", env=env, check=False)
    assert proc.returncode == 1, proc.stderr
    doc = store["db"].runs.find_one({"config.selector.name": "boom"}, sort=[("_id", -1)])
    assert doc["status"] == "FAILED" and "boom from the selector plugin" in "".join(doc["fail_trace"])
    last = proc.stderr.strip().splitlines()[-1]
    if debug:
        assert "Traceback" in proc.stderr and last == "RuntimeError: boom from the selector plugin"
    else:
        assert_refused(proc, f"run {doc['_id']} FAILED", only_line=False)
        assert last == (f"Error: run {doc['_id']} FAILED: RuntimeError: boom from the selector plugin "
                        "(the traceback is stored with the run; pqa --debug run ... prints it)")
    assert not (tmp_path / "outputs").exists()  # it failed before writing anything: no empty folders left


def test_pqa_load_plugins_empty_turns_off_an_installed_plugin(store, tmp_path):
    env = pqa_env(tmp_path, PQA_LOAD_PLUGINS="",
                  PYTHONPATH=os.pathsep.join([_installed_boom_plugin(tmp_path), os.environ.get("PYTHONPATH", "")]))
    before = store["db"].runs.count_documents({})
    proc = pqa("run", "pipeline", "--mongo-url", store["url"], *RUN_ARGS, "selector.name=boom", env=env, check=False)
    assert_refused(proc, "unknown selector 'boom'; available: bilinear, cosine, dot, mlp", code=2, only_line=False)
    assert proc.stderr.splitlines()[0] == ("Warning: PQA_LOAD_PLUGINS is empty: 1 installed third-party plugin "
                                           "entry point(s) not loaded")  # it says so
    assert store["db"].runs.count_documents({}) == before and not (tmp_path / "outputs").exists()
