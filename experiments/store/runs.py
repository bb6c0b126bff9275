"""Read Sacred runs back out of MongoDB: one DataFrame row per run for notebooks,
plain dicts for ``pqa runs``.

Why a module of its own: Sacred's MongoObserver writes nested documents (config,
result, info) and keeps metric series in a separate collection, possibly split
into continuation documents. Every reader needs the same flattening, filtering
and merging, so it lives here once. Nothing here imports Sacred or torch.
"""
from __future__ import annotations

import ast
import datetime as _dt
import math
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import pandas as pd

from pqa_core.errors import PqaError, UsageError

from pqa_experiments.store.metric_chunks import metric_names, read_metric
from pqa_experiments.store.urls import describe_error

FIXED_COLUMNS = ["id", "experiment", "command", "status", "start_time", "stop_time", "duration_s"]
PROBABLY_DEAD = "PROBABLY_DEAD"  # Omniboard's name for a RUNNING run whose heartbeat stopped
STATUSES = ("QUEUED", "RUNNING", "COMPLETED", "FAILED", "INTERRUPTED", "TIMEOUT", PROBABLY_DEAD)
DEAD_AFTER_S = 120  # a run beats every 10 s; Omniboard calls it dead after the same 120 s
DEFAULT_TIMEOUT_MS = 5000

# Large or noisy fields a run listing never needs.
_LIST_PROJECTION = {"captured_out": 0, "experiment.sources": 0, "experiment.dependencies": 0,
                    "host.ENV": 0, "meta": 0, "resources": 0, "fail_trace": 0, "info": 0}
_SHOW_PROJECTION = {"captured_out": 0, "experiment.sources": 0}


class RunNotFound(PqaError, LookupError):
    """No run with that id in the database."""


class DatabaseUnavailable(PqaError):
    """The MongoDB server could not be reached or refused us; the message has no password."""


# --------------------------------------------------------------------------- connecting


def resolve_store(mongo_url: Optional[str] = None, db_name: Optional[str] = None) -> Tuple[str, str]:
    """``(url, db_name)`` of the run store, via ``pqa_experiments.store.settings``.

    ``mongo_url`` None means env, config file, else the embedded server (started on demand).
    ``db_name`` None means the URL's path, else ``pqa``.
    """
    from pqa_experiments.store import settings
    from pqa_experiments.store.db import ensure_running

    target = settings.resolve_mongo(mongo_url)
    url = ensure_running() if target.embedded else target.url
    return url, db_name or target.db_name


def open_database(url: str, db_name: str, timeout_ms: int = DEFAULT_TIMEOUT_MS):
    """A pymongo ``Database`` checked with a ping; :class:`DatabaseUnavailable` (URL redacted) if not."""
    import pymongo
    import pymongo.errors

    from pqa_experiments.store.urls import redact_url, url_secrets

    options = {}
    if "serverselectiontimeoutms" not in url.lower():
        options["serverSelectionTimeoutMS"] = timeout_ms
    shown, secrets = redact_url(url), url_secrets(url)
    try:
        client = pymongo.MongoClient(url, connect=False, appname="pqa", **options)
    except (pymongo.errors.ConfigurationError, ValueError, TypeError) as exc:
        raise UsageError(f"invalid MongoDB URL {shown}: {describe_error(exc, secrets)}") from None
    database = client[db_name]
    try:
        database.command("ping")
    except pymongo.errors.OperationFailure as exc:
        client.close()
        raise DatabaseUnavailable(f"MongoDB at {shown} refused pqa: {describe_error(exc, secrets)}") \
            from None
    except pymongo.errors.PyMongoError as exc:
        client.close()
        raise DatabaseUnavailable(f"cannot reach MongoDB at {shown}: {describe_error(exc, secrets)}") \
            from None
    return database


def connect(mongo_url: Optional[str] = None, db_name: Optional[str] = None,
            timeout_ms: int = DEFAULT_TIMEOUT_MS):
    """The run store's pymongo ``Database`` (see :func:`resolve_store`), checked with a ping."""
    url, name = resolve_store(mongo_url, db_name)
    return open_database(url, name, timeout_ms)


# --------------------------------------------------------------------------- helpers


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and other values are kept whole."""
    out: Dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def coerce_value(text: Any) -> Any:
    """Type a command-line value the way Sacred does (Python literal, else string).

    ``"5"`` -> 5, ``"0.1"`` -> 0.1, ``"True"`` -> True, ``"[1, 2]"`` -> [1, 2], ``"cosine"``
    stays a string. Lowercase ``true``/``false``/``null``/``none`` are also accepted, since
    that is what people type. Non-strings are returned unchanged.
    """
    if not isinstance(text, str):
        return text
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("null", "none"):
        return None
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def parse_where(expressions: Iterable[str]) -> Dict[str, List[Any]]:
    """``["selector.name=cosine", "read.top_k=5"]`` -> ``{key: [values]}``; UsageError on bad syntax.

    A key given twice matches either value.
    """
    filters: Dict[str, List[Any]] = {}
    for expression in expressions:
        key, eq, value = expression.partition("=")
        key = key.strip()
        if not eq or not key or any(not part for part in key.split(".")) or key.startswith("$"):
            raise UsageError(f"bad filter {expression!r}: expected KEY=VALUE, e.g. selector.name=cosine")
        filters.setdefault(key, []).append(value)
    return filters


def build_query(filters: Optional[Mapping[str, Any]] = None, status: Optional[str] = None,
                experiment: Optional[str] = None) -> Dict[str, Any]:
    """The Mongo query for dotted config filters, a status and an experiment name.

    String values are typed with :func:`coerce_value`; the raw string also matches, so a
    config that stored ``"5"`` as text is still found by ``read.top_k=5``. A list of values
    (from a repeated ``--where``) matches any of them.
    """
    query: Dict[str, Any] = {}
    for key, value in (filters or {}).items():
        values = value if isinstance(value, list) else [value]
        candidates: List[Any] = []
        for raw in values:
            for candidate in (coerce_value(raw), raw):
                if not any(candidate == c and type(candidate) is type(c) for c in candidates):
                    candidates.append(candidate)
        field = f"config.{key}"
        query[field] = candidates[0] if len(candidates) == 1 else {"$in": candidates}
    if status:
        query.update(status_query(status.upper()))
    if experiment:
        query["experiment.name"] = experiment
    return query


def _dead_cutoff(now: Optional[_dt.datetime] = None) -> _dt.datetime:
    now = now or _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)  # Sacred stores naive UTC
    return now - _dt.timedelta(seconds=DEAD_AFTER_S)


def dead_runs_query(now: Optional[_dt.datetime] = None) -> Dict[str, Any]:
    """RUNNING runs whose last heartbeat (else start) is more than DEAD_AFTER_S old."""
    cutoff = _dead_cutoff(now)
    return {"status": "RUNNING", "$or": [{"heartbeat": {"$lt": cutoff}},
                                         {"heartbeat": None, "start_time": {"$lt": cutoff}}]}


def status_query(status: str, now: Optional[_dt.datetime] = None) -> Dict[str, Any]:
    """The query for runs showing ``status`` as :func:`effective_status` computes it."""
    if status == PROBABLY_DEAD:
        return {"$or": [{"status": PROBABLY_DEAD}, dead_runs_query(now)]}
    if status == "RUNNING":
        cutoff = _dead_cutoff(now)
        return {"status": "RUNNING", "$or": [{"heartbeat": {"$gte": cutoff}},
                                             {"heartbeat": None, "start_time": {"$gte": cutoff}}]}
    return {"status": status}


def effective_status(run: Mapping[str, Any], now: Optional[_dt.datetime] = None) -> Optional[str]:
    """The stored status, except PROBABLY_DEAD for a RUNNING run whose heartbeat stopped (as Omniboard shows it)."""
    status = run.get("status")
    last = run.get("heartbeat") or run.get("start_time")
    if status == "RUNNING" and isinstance(last, _dt.datetime) and last < _dead_cutoff(now):
        return PROBABLY_DEAD
    return status


def duration_s(run: Mapping[str, Any]) -> Optional[float]:
    """Stop minus start; for a run without a stop time, the last heartbeat (time alive so far)."""
    start = run.get("start_time")
    end = run.get("stop_time") or run.get("heartbeat")
    if isinstance(start, _dt.datetime) and isinstance(end, _dt.datetime):
        return round((end - start).total_seconds(), 3)
    return None


def result_dict(result: Any) -> Dict[str, Any]:
    """Final metrics as ``{name: value}``, nested dicts dotted; a non-dict result is ``{"": value}``."""
    if result is None:
        return {}
    if isinstance(result, Mapping):
        return flatten(result)
    return {"": result}


def _result_columns(result: Any) -> Dict[str, Any]:
    return {(f"result.{k}" if k else "result"): v for k, v in result_dict(result).items()}


# --------------------------------------------------------------------------- queries


def find_runs(db, filters: Optional[Mapping[str, Any]] = None, status: Optional[str] = None,
              experiment: Optional[str] = None, limit: Optional[int] = None) -> List[Dict[str, Any]]:
    """Run documents (without captured output, sources, info), newest (highest id) first."""
    cursor = db.runs.find(build_query(filters, status, experiment), _LIST_PROJECTION).sort("_id", -1)
    if limit:
        cursor = cursor.limit(int(limit))
    return list(cursor)


def run_row(run: Mapping[str, Any]) -> Dict[str, Any]:
    """One flat row: the fixed columns, ``config.*`` then ``result.*``."""
    row = {
        "id": run.get("_id"),
        "experiment": (run.get("experiment") or {}).get("name"),
        "command": run.get("command"),
        "status": effective_status(run),
        "start_time": run.get("start_time"),
        "stop_time": run.get("stop_time"),
        "duration_s": duration_s(run),
    }
    row.update(flatten(run.get("config") or {}, "config."))
    row.update(_result_columns(run.get("result")))
    return row


def rows_dataframe(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Rows from :func:`run_row` as a DataFrame: fixed columns, sorted config, results in first-seen order."""
    config_cols: set = set()
    result_cols: Dict[str, None] = {}
    for row in rows:
        for key in row:
            if key.startswith("config."):
                config_cols.add(key)
            elif key == "result" or key.startswith("result."):
                result_cols.setdefault(key)
    columns = FIXED_COLUMNS + sorted(config_cols) + list(result_cols)
    frame = pd.DataFrame(list(rows), columns=columns)
    for col in ("start_time", "stop_time"):
        frame[col] = pd.to_datetime(frame[col])
    return frame


def runs_dataframe(mongo_url: Optional[str] = None, db_name: Optional[str] = None,
                   filters: Optional[Mapping[str, Any]] = None, status: Optional[str] = None,
                   experiment: Optional[str] = None, limit: Optional[int] = None,
                   db=None) -> pd.DataFrame:
    """One row per run, newest first, for notebooks.

    Columns: ``id experiment command status start_time stop_time duration_s``, then the
    flattened config as ``config.<dotted key>`` and the final metrics as ``result.<name>``.
    ``filters`` maps dotted config keys to values, e.g. ``{"selector.name": "cosine"}``.
    Times are naive UTC, as Sacred stores them. ``db_name`` None means the URL's path,
    else ``pqa``. Pass ``db`` (a pymongo Database) to reuse a connection.
    """
    if db is None:
        db = connect(mongo_url, db_name)
    runs = find_runs(db, filters=filters, status=status, experiment=experiment, limit=limit)
    return rows_dataframe([run_row(run) for run in runs])


def get_run(db, run_id: int, projection: Optional[Mapping[str, int]] = None) -> Dict[str, Any]:
    """The run document; :class:`RunNotFound` if there is none.

    Captured output and stored sources are left out unless ``projection`` says otherwise.
    """
    run = db.runs.find_one({"_id": _run_id(run_id)}, dict(projection or _SHOW_PROJECTION))
    if run is None:
        raise RunNotFound(f"no run with id {run_id} in database '{db.name}'")
    return run


def _run_id(run_id: Any) -> Any:
    """Sacred ids are ints; accept ``"12"`` from a command line or notebook too."""
    if isinstance(run_id, str) and run_id.strip().lstrip("-").isdigit():
        return int(run_id)
    return run_id


def metric_series(db, run_id: int) -> Dict[str, Tuple[List[Any], List[Any]]]:
    """``{name: (steps, values)}`` for every metric the run logged, each series whole across its chunks."""
    run_id = _run_id(run_id)
    return {name: read_metric(db, run_id, name) for name in metric_names(db, run_id)}


def final_metrics(series: Mapping[str, Tuple[List[Any], List[Any]]]) -> Dict[str, Dict[str, Any]]:
    """``{name: {"value": last value, "step": its step, "points": n}}`` for each non-empty series."""
    out = {}
    for name, (steps, values) in series.items():
        if values:
            out[name] = {"value": values[-1], "step": steps[-1] if steps else None, "points": len(values)}
    return out


def run_summary(db, run_id: int) -> Dict[str, Any]:
    """Everything ``pqa runs show`` prints: flattened config, result, info, last metric values, artifacts."""
    run = get_run(db, run_id)
    info = dict(run.get("info") or {})
    info.pop("metrics", None)  # MongoObserver's own links to the metrics collection
    return {
        "id": run["_id"],
        "experiment": (run.get("experiment") or {}).get("name"),
        "command": run.get("command"),
        "status": effective_status(run),
        "start_time": run.get("start_time"),
        "stop_time": run.get("stop_time"),
        "heartbeat": run.get("heartbeat"),
        "duration_s": duration_s(run),
        "host": (run.get("host") or {}).get("hostname"),
        "config": dict(sorted(flatten(run.get("config") or {}).items())),
        "result": run.get("result"),
        "info": info,
        "metrics": final_metrics(metric_series(db, run["_id"])),
        "artifacts": [a.get("name") for a in run.get("artifacts") or [] if isinstance(a, Mapping)],
        "fail_trace": run.get("fail_trace"),
    }


def compare_runs(db, run_ids: Sequence[int]) -> pd.DataFrame:
    """Runs side by side: one column per run id, rows ``config.<key>`` for the config keys
    whose values differ (a key missing from some run counts as different), ``components.<kind>.<field>``
    for the components' identities that differ (``info.components``: plugin, package, version,
    source_sha256), then every final metric as ``result.<name>``."""
    ids: List[Any] = []
    for run_id in run_ids:
        run_id = _run_id(run_id)
        if run_id not in ids:
            ids.append(run_id)
    runs = [get_run(db, run_id, {"config": 1, "result": 1, "info.components": 1}) for run_id in ids]
    # a component's identity (plugin, package, version, source hash) beside the config: one name, other code
    configs = [{**flatten(run.get("config") or {}),
                **{f"components.{k}": v for k, v in flatten((run.get("info") or {}).get("components") or {}).items()}}
               for run in runs]
    results = [_result_columns(run.get("result")) for run in runs]
    missing = object()
    differing = []
    for key in sorted(set().union(*configs)):
        values = [config.get(key, missing) for config in configs]
        if any(not _same(values[0], v) for v in values[1:]):
            differing.append(key)
    metric_keys: Dict[str, None] = {}
    for result in results:
        for key in result:
            metric_keys.setdefault(key)
    index = [k if k.startswith("components.") else f"config.{k}" for k in differing] + list(metric_keys)
    data = {}
    for run, config, result in zip(runs, configs, results):
        data[run["_id"]] = [config.get(k) for k in differing] + [result.get(k) for k in metric_keys]
    frame = pd.DataFrame(data, index=index, columns=[run["_id"] for run in runs], dtype=object)
    frame.index.name = "key"
    return frame


def _same(a: Any, b: Any) -> bool:
    """Equality that treats NaN as equal to NaN and 1 as different from True."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, bool) != isinstance(b, bool):
        return False
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - exotic values: fall back to their text
        return repr(a) == repr(b)


def predictions_of_run(db, run_id: int, folder: Path) -> Tuple[Path, Optional[str], str]:
    """(predictions file, corpus path or None, description) of a stored run: its ``predictions.jsonl``
    artifact copied into ``folder``, else the file in its output folder."""
    import gridfs

    run = get_run(db, run_id, {"artifacts": 1, "info": 1, "config": 1, "experiment.name": 1})
    name = (run.get("config") or {}).get("eval", {}).get("predictions_file", "predictions.jsonl")
    info = run.get("info") or {}
    corpus = ((info.get("data") or {}).get("corpus") or {}).get("path")
    what = f"run {run_id} ({(run.get('experiment') or {}).get('name', '?')})"
    artifact = next((a for a in run.get("artifacts") or [] if a.get("name") == Path(name).name), None)
    if artifact is not None:
        path = folder / f"run-{run_id}-{Path(name).name}"
        path.write_bytes(gridfs.GridFS(db).get(artifact["file_id"]).read())
        return path, corpus, f"{what}, artifact {Path(name).name}"
    local = Path(info.get("output_dir") or "") / name
    if info.get("output_dir") and local.is_file():
        return local, corpus, f"{what}, {local}"
    raise PqaError(f"run {run_id} has no predictions (no {Path(name).name} artifact, nor one in its output "
                   f"folder): it has not finished an evaluation")
