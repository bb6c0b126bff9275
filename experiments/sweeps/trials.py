"""``pqa sweep``: a spec's trials run in parallel on Ray, each a normal tracked run.

Ray schedules, pqa only describes the work: every trial is one Ray task (one CPU, a fresh worker
process, no retry) that calls the same path as ``pqa run`` (``cli_run.execute``: pre-flight,
output-folder lock, observer, Sacred run) with ``info.sweep = {id, trial, params}`` on the run. A local
Ray instance is started for the sweep (``workers`` CPUs) unless ``address`` names a running cluster;
then every node needs pqa installed and the run store must be reachable from them (``--mongo-url``).

The sweep itself is a document in the run store's ``sweeps`` collection: the spec, the trials with
their overrides, and each trial's outcome (run id, status, result or error) as it arrives, so
``pqa sweep status`` and ``pqa runs compare --sweep`` read it from any machine. Every trial is
checked (``cli_run.preflight``) before Ray starts: one refused is recorded FAILED with its error and
not launched; a trial failing while it runs is recorded FAILED and the others go on.
"""
from __future__ import annotations

import datetime as _dt
import os
import secrets
import socket
import time
from typing import Any, Callable, Dict, List, Optional

from pqa_core.errors import PqaError, UsageError

from pqa_experiments.sweeps.spec import SweepSpec, Trial

COLLECTION = "sweeps"
TAG = "sweep"  # runs carry info.sweep = {"id", "trial", "params"}
LOOPBACK = ("127.", "localhost", "[::1]", "::1")


def new_sweep_id() -> str:
    return f"sweep-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:500]


# --------------------------------------------------------------------------- one trial (in a Ray worker)


def run_trial(experiment: str, items: List[str], mongo_url: str, tag: Dict[str, Any]) -> Dict[str, Any]:
    """Run one trial as a tracked run; never raises: ``{status, run_id, result, error, seconds}``."""
    from pqa_experiments.tracking.engine import execute

    started = time.perf_counter()
    outcome: Dict[str, Any] = {"status": "FAILED", "run_id": None, "result": None, "error": None}
    try:
        finished = execute(experiment, items, mongo_url=mongo_url, info={TAG: tag})
        outcome.update(status=finished.status, run_id=finished._id, result=_plain(finished.result))
    except PqaError as exc:
        outcome.update(run_id=getattr(exc, "run_id", None), error=_one_line(exc))
    except BaseException as exc:  # click.Abort, KeyboardInterrupt: the trial ends, the sweep is told
        outcome.update(status="INTERRUPTED" if isinstance(exc, KeyboardInterrupt) else "FAILED",
                       error=f"{type(exc).__name__}: {_one_line(exc)}")
    outcome["seconds"] = round(time.perf_counter() - started, 2)
    return outcome


def _plain(value):
    """A run's result as plain JSON-able values (it goes back through Ray and into MongoDB)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item"):
        return value.item()
    return value


# --------------------------------------------------------------------------- the sweep record


class SweepStore:
    """The ``sweeps`` collection of a run store (a pymongo ``Database``)."""

    def __init__(self, database):
        self.collection = database[COLLECTION]
        self.runs = database["runs"]

    def create(self, sweep_id: str, spec: SweepSpec, trials: List[Trial], **fields) -> None:
        self.collection.insert_one({
            "_id": sweep_id, "status": "RUNNING", "spec": spec.to_dict(), "experiment": spec.experiment,
            "metric": spec.metric, "swept": spec.swept_keys, "start_time": _now(), "stop_time": None,
            "host": socket.gethostname(), "pid": os.getpid(), **fields,
            "trials": [{"trial": t.index, "params": t.params, "items": t.items, "status": "QUEUED", "run_id": None,
                        "result": None, "error": None, "seconds": None} for t in trials],
        })

    def record(self, sweep_id: str, index: int, outcome: Dict[str, Any]) -> None:
        self.collection.update_one({"_id": sweep_id}, {"$set": {
            f"trials.{index}.{key}": outcome.get(key) for key in ("status", "run_id", "result", "error", "seconds")}})

    def finish(self, sweep_id: str, status: str, wall_s: float) -> None:
        self.collection.update_one({"_id": sweep_id}, {"$set": {"status": status, "stop_time": _now(),
                                                                "wall_s": round(wall_s, 2)}})

    def get(self, sweep_id: str) -> Dict[str, Any]:
        doc = self.collection.find_one({"_id": sweep_id})
        if doc is None:
            known = [d["_id"] for d in self.collection.find({}, {"_id": 1}).sort("start_time", -1).limit(5)]
            hint = f"; recent sweeps: {', '.join(known)}" if known else "; no sweeps in this run store"
            raise PqaError(f"no sweep {sweep_id!r}{hint}")
        return doc

    def status(self, sweep_id: str) -> Dict[str, Any]:
        """The sweep document, each trial's status brought up to date from its run (RUNNING while it runs)."""
        doc = self.get(sweep_id)
        live = {}
        for run in self.runs.find({f"info.{TAG}.id": sweep_id}, {"status": 1, f"info.{TAG}.trial": 1}).sort("_id", 1):
            live[run["info"][TAG]["trial"]] = run  # the latest run of each trial
        for trial in doc["trials"]:
            run = live.get(trial["trial"])
            if run is not None and trial["status"] == "QUEUED":
                trial.update(status=run.get("status"), run_id=run["_id"])
        doc["counts"] = {s: sum(t["status"] == s for t in doc["trials"])
                         for s in sorted({t["status"] for t in doc["trials"]})}
        return doc


# --------------------------------------------------------------------------- running a sweep


def check_trials(spec: SweepSpec, trials: List[Trial]) -> Dict[int, str]:
    """Pre-flight of every trial in this process (nothing stored): ``{trial index: error line}``."""
    from pqa_experiments.tracking.engine import parse_updates, preflight
    from pqa_experiments.tracking.experiments import make_experiment

    refused = {}
    for trial in trials:
        try:
            updates, named_configs = parse_updates(trial.items)
            preflight(make_experiment(spec.experiment), updates, named_configs)
        except PqaError as exc:
            refused[trial.index] = _one_line(exc)
    return refused


def _ray():
    try:
        import ray
    except ImportError:
        raise PqaError("pqa sweep runs trials on Ray, which is not installed: pip install 'pqa[sweep]'") from None
    return ray


def worker_env() -> Dict[str, str]:
    """What each trial's process needs from this one: no progress bars, the same output folder root."""
    env = {"PQA_PROGRESS": "0", "TOKENIZERS_PARALLELISM": "false",
           "PQA_OUTPUT_DIR": os.path.abspath(os.environ.get("PQA_OUTPUT_DIR", "outputs"))}
    for key in ("PQA_HOME", "PQA_LOAD_PLUGINS", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def run_sweep(spec: SweepSpec, *, workers: int = 2, address: Optional[str] = None, mongo_url: Optional[str] = None,
              log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run every trial of ``spec``; returns the final sweep document (with ``counts``)."""
    from pqa_experiments.store import db
    from pqa_experiments.store.runs import open_database

    if workers < 1:
        raise UsageError(f"--workers must be >= 1, got {workers}")
    ray = _ray()
    trials = spec.trials()
    target = db.ensure_database(mongo_url)
    if address and target.url.split("://", 1)[-1].split("@")[-1].startswith(LOOPBACK):
        log(f"warning: the run store {target.redacted_url} is on this machine's loopback address; trials on "
            f"other machines of the cluster cannot reach it (pass --mongo-url of a server they can reach)")
    database = open_database(target.url, target.db_name)
    store = SweepStore(database)
    refused = check_trials(spec, trials)
    sweep_id = new_sweep_id()
    store.create(sweep_id, spec, trials, workers=workers, address=address or "local")
    log(f"sweep {sweep_id}: {len(trials)} trials of pqa_{spec.experiment} on "
        f"{address or f'a local Ray instance with {workers} workers'}, recorded to {target.redacted_url}")
    for index, error in refused.items():
        store.record(sweep_id, index, {"status": "FAILED", "error": f"refused before it started: {error}"})
        log(f"trial {index} FAILED before it started ({trials[index].describe()}): {error}")
    started = time.perf_counter()
    status = "COMPLETED"
    launch = [t for t in trials if t.index not in refused]
    owns_ray = not ray.is_initialized()
    try:
        if launch and owns_ray:
            _init_ray(ray, workers, address)
        remote = ray.remote(num_cpus=1, max_calls=1, max_retries=0)(run_trial)
        pending = {remote.remote(spec.experiment, t.items, target.url,
                                 {"id": sweep_id, "trial": t.index, "params": t.params}): t for t in launch}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            trial = pending.pop(done[0])
            try:
                outcome = ray.get(done[0])
            except Exception as exc:  # the worker died (killed, out of memory): Ray says why
                outcome = {"status": "FAILED", "error": f"the trial's worker failed: {_one_line(exc)}"}
            store.record(sweep_id, trial.index, outcome)
            log(_outcome_line(trial, outcome))
    except KeyboardInterrupt:
        status = "INTERRUPTED"
        raise
    finally:
        if owns_ray and ray.is_initialized():
            ray.shutdown()
        doc = store.status(sweep_id)
        if status == "COMPLETED" and any(t["status"] != "COMPLETED" for t in doc["trials"]):
            status = "FAILED"
        store.finish(sweep_id, status, time.perf_counter() - started)
    doc = store.status(sweep_id)
    database.client.close()
    return doc


def _init_ray(ray, workers: int, address: Optional[str]) -> None:
    runtime_env = {"env_vars": worker_env()}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
    else:  # a private instance: these CPUs, a small object store (trials pass back only small results);
        # Ray's memory monitor would kill trials when *other* programs fill this machine's memory: the
        # kernel's own out-of-memory handling is left to decide
        os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env,
                 object_store_memory=80 * 2 ** 20, configure_logging=False)


def _outcome_line(trial: Trial, outcome: Dict[str, Any]) -> str:
    run = f"run {outcome['run_id']}" if outcome.get("run_id") is not None else "no run"
    head = f"trial {trial.index} {outcome['status']} ({run}, {trial.describe()})"
    if outcome.get("error"):
        return f"{head}: {outcome['error']}"
    result = outcome.get("result") or {}
    metrics = ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()) \
        if isinstance(result, dict) else str(result)
    return f"{head}: {metrics}"


# --------------------------------------------------------------------------- comparing a sweep's runs


def sweep_rows(database, sweep_id: str) -> Dict[str, Any]:
    """``{"sweep": doc, "params": swept keys, "rows": [{trial, run_id, status, params..., metrics...}]}``:
    one row per trial, from its run (the latest when a trial was run again) and the sweep's record."""
    from pqa_experiments.store.runs import result_dict

    doc = SweepStore(database).status(sweep_id)
    runs = {}
    for run in database["runs"].find({f"info.{TAG}.id": sweep_id},
                                     {"status": 1, "result": 1, f"info.{TAG}": 1}).sort("_id", 1):
        runs[run["info"][TAG]["trial"]] = run
    rows = []
    for trial in doc["trials"]:
        run = runs.get(trial["trial"])
        result = result_dict(run.get("result") if run is not None else trial.get("result"))
        rows.append({"trial": trial["trial"], "run_id": run["_id"] if run is not None else trial.get("run_id"),
                     "status": run.get("status") if run is not None else trial["status"],
                     "params": dict(trial["params"]), "metrics": result, "error": trial.get("error")})
    return {"sweep": doc, "params": list(doc.get("swept") or []), "rows": rows}
