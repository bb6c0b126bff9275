"""``pqa runs``: list, show and compare the Sacred runs in the run store.

The main CLI registers this with ``add_command(runs)``. Text output is for people,
``--json`` (and ``--csv``) for scripts. Exit codes: 0 ok, 1 error (unknown run,
database unreachable), 2 usage error (bad ``--where``, conflicting flags).
Errors are one line and never show a password from the Mongo URL.
"""
from __future__ import annotations

import datetime as _dt
import functools
import json
import math
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import click

from pqa_core.errors import PqaError

from pqa_experiments.store import runs as runs_lib
from pqa_experiments.store.urls import describe_error, redact_url, url_secrets

_PREFERRED_METRICS = ("EM", "F1", "substring")
_MAX_LIST_METRICS = 6


# --------------------------------------------------------------------------- plumbing


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Keep --mongo-url/--db-name in ctx.meta so both ``runs --mongo-url X list`` and
    ``runs list --mongo-url X`` work (the later one wins)."""
    if value is not None:
        ctx.meta[f"pqa_runs.{param.name}"] = value
    return value


def _db_options(func):
    func = click.option("--db-name", default=None, metavar="NAME", expose_value=False, callback=_remember,
                        help="Database name (default: the URL's path, else 'pqa').")(func)
    func = click.option("--mongo-url", default=None, metavar="URL", expose_value=False, callback=_remember,
                        help="Run store (default: $PQA_MONGO_URL, the config file, else the embedded server).")(func)
    return func


def _store_command(json_help: str, csv_help: str):
    """A subcommand's tail: ``--json``/``--csv``, the store's options, the context, one line per error."""
    def decorate(func):
        func = _errors_to_exit_codes(func)
        func = click.pass_context(func)
        func = _db_options(func)
        func = click.option("--csv", "as_csv", is_flag=True, help=csv_help)(func)
        return click.option("--json", "as_json", is_flag=True, help=json_help)(func)
    return decorate


def _database(ctx: click.Context):
    """Connect once per invocation, on first use (so ``--help`` never touches the network)."""
    if "pqa_runs.db" not in ctx.meta:
        url, name = runs_lib.resolve_store(ctx.meta.get("pqa_runs.mongo_url"), ctx.meta.get("pqa_runs.db_name"))
        ctx.meta["pqa_runs.url"] = url
        ctx.meta["pqa_runs.db"] = runs_lib.open_database(url, name)
        ctx.call_on_close(ctx.meta["pqa_runs.db"].client.close)
    return ctx.meta["pqa_runs.db"]


def _debug(ctx: click.Context) -> bool:
    obj = ctx.find_root().obj
    return bool(isinstance(obj, dict) and obj.get("debug"))


def _errors_to_exit_codes(func):
    """PqaError -> its exit code (2 as a click usage error); pymongo errors -> one redacted line, exit 1."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        import pymongo.errors

        ctx = click.get_current_context()
        try:
            return func(*args, **kwargs)
        except PqaError as exc:
            if _debug(ctx):
                raise
            if exc.exit_code == 2:
                raise click.UsageError(str(exc), ctx) from None
            error = click.ClickException(str(exc))
            error.exit_code = exc.exit_code
            raise error from None
        except pymongo.errors.PyMongoError as exc:
            if _debug(ctx):
                raise
            url = ctx.meta.get("pqa_runs.url")
            where = f" at {redact_url(url)}" if url else ""
            secrets: List[str] = url_secrets(url) if url else []
            raise click.ClickException(f"MongoDB error{where}: {describe_error(exc, secrets)}") from None

    return wrapper


def _exclusive(ctx: click.Context, **flags: bool) -> None:
    given = [f"--{name.replace('_', '-')}" for name, on in flags.items() if on]
    if len(given) > 1:
        raise click.UsageError(f"{' and '.join(given)} cannot be used together", ctx)


# --------------------------------------------------------------------------- formatting


def _jsonable(value: Any) -> Any:
    """Strict JSON: datetimes as ISO 8601 UTC, NaN/inf as null, anything exotic as text."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=_dt.timezone.utc)
        return value.isoformat()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if hasattr(value, "item"):  # numpy scalars
        return _jsonable(value.item())
    return str(value)


def _dump(value: Any) -> None:
    click.echo(json.dumps(_jsonable(value), indent=2, allow_nan=False))


def _fmt(value: Any) -> str:
    """A cell: short floats, UTC times to the second, JSON for containers."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.2f}" if abs(value) >= 1 or value == 0 else f"{value:.4g}"
    if isinstance(value, _dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(_jsonable(value))
    return str(value)


def _fmt_duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, float(seconds))
    if seconds < 10:
        return f"{seconds:.2f}s"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()
             for line in [list(headers)] + [list(r) for r in rows]]
    return "\n".join(lines)


def _metric_order(name: str) -> tuple:
    """EM, F1, substring, then Recall@k by k, then the rest alphabetically."""
    if name in _PREFERRED_METRICS:
        return (0, _PREFERRED_METRICS.index(name), 0, name)
    match = re.fullmatch(r"Recall@(\d+)", name)
    if match:
        return (1, 0, int(match.group(1)), name)
    return (2, 0, 0, name)


def _main_metrics(results: Sequence[Dict[str, Any]]) -> List[str]:
    names = {k for result in results for k, v in result.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return sorted(names, key=_metric_order)[:_MAX_LIST_METRICS]


# --------------------------------------------------------------------------- commands


@click.group("runs", context_settings={"help_option_names": ["-h", "--help"]})
@_db_options
def runs() -> None:
    """List, inspect and compare experiment runs stored by Sacred.

    \b
    Examples:
      pqa runs list --where selector.name=cosine --status completed
      pqa runs show 12
      pqa runs compare 12 13 --json
    """


@runs.command("list", short_help="List runs, newest first, with their main metrics.")
@click.option("--where", "where", multiple=True, metavar="KEY=VALUE",
              help="Only runs whose config KEY (dotted, e.g. selector.name) equals VALUE; "
                   "values are typed like Sacred's 'with' (5 is a number). Repeatable; "
                   "a key repeated matches any of its values.")
@click.option("--status", type=click.Choice(runs_lib.STATUSES, case_sensitive=False), default=None,
              help=f"Only runs with this status ({runs_lib.PROBABLY_DEAD}: RUNNING, but no heartbeat "
                   f"for {runs_lib.DEAD_AFTER_S} s).")
@click.option("--experiment", "-e", default=None, metavar="NAME", help="Only runs of this experiment.")
@click.option("--limit", "-n", type=click.IntRange(min=1), default=None, metavar="N",
              help="At most N runs (the newest).")
@_store_command("Output a JSON list.", "Output CSV: every column of the runs DataFrame.")
def list_runs(ctx, where, status, experiment, limit, as_json, as_csv) -> None:
    """List runs, newest first, with their main final metrics."""
    _exclusive(ctx, json=as_json, csv=as_csv)
    filters = runs_lib.parse_where(where)
    docs = runs_lib.find_runs(_database(ctx), filters=filters, status=status, experiment=experiment, limit=limit)
    if as_csv:
        frame = runs_lib.rows_dataframe([runs_lib.run_row(doc) for doc in docs])
        click.echo(frame.to_csv(index=False), nl=False)
        return
    if as_json:
        _dump([{
            "id": doc["_id"],
            "experiment": (doc.get("experiment") or {}).get("name"),
            "command": doc.get("command"),
            "status": runs_lib.effective_status(doc),
            "start_time": doc.get("start_time"),
            "stop_time": doc.get("stop_time"),
            "duration_s": runs_lib.duration_s(doc),
            "config": dict(sorted(runs_lib.flatten(doc.get("config") or {}).items())),
            "result": doc.get("result"),
        } for doc in docs])
        return
    if not docs:
        click.echo("no runs found", err=True)
        return
    results = [runs_lib.result_dict(doc.get("result")) for doc in docs]
    metrics = _main_metrics(results)
    headers = ["id", "experiment", "status", "start (UTC)", "duration"] + [m or "result" for m in metrics]
    rows = []
    for doc, result in zip(docs, results):
        rows.append([str(doc["_id"]), _fmt((doc.get("experiment") or {}).get("name")),
                     _fmt(runs_lib.effective_status(doc)), _fmt(doc.get("start_time")),
                     _fmt_duration(runs_lib.duration_s(doc))]
                    + [_fmt(result.get(m)) for m in metrics])
    click.echo(_table(headers, rows))


@runs.command("show", short_help="Show one run: config, result, info, metrics, artifacts.")
@click.argument("run_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Output JSON.")
@_db_options
@click.pass_context
@_errors_to_exit_codes
def show(ctx, run_id, as_json) -> None:
    """Show one run: config, result, info, final metric values, artifacts.

    Config and info are flattened to dotted keys; for each metric series the last
    value, its step and the number of points are shown.
    """
    summary = runs_lib.run_summary(_database(ctx), run_id)
    if as_json:
        _dump(summary)
        return
    click.echo(f"run {summary['id']}  {summary['experiment']}  {summary['status']}")
    click.echo(f"  command:  {_fmt(summary['command'])}")
    click.echo(f"  host:     {_fmt(summary['host'])}")
    click.echo(f"  started:  {_fmt(summary['start_time'])} UTC")
    click.echo(f"  stopped:  {_fmt(summary['stop_time'])} UTC")
    click.echo(f"  duration: {_fmt_duration(summary['duration_s'])}")
    _section("config", summary["config"])
    _section("result", runs_lib.result_dict(summary["result"]))
    _section("info", runs_lib.flatten(summary["info"]))
    click.echo("metrics (final value @ step, points):")
    if not summary["metrics"]:
        click.echo("  (none)")
    width = max((len(name) for name in summary["metrics"]), default=0)
    for name, last in summary["metrics"].items():
        click.echo(f"  {name.ljust(width)}  {_fmt(last['value'])} @ {last['step']}  ({last['points']})")
    click.echo("artifacts:")
    click.echo("".join(f"  {name}\n" for name in summary["artifacts"]) or "  (none)\n", nl=False)
    if summary.get("fail_trace"):
        lines = [ln for chunk in summary["fail_trace"] for ln in str(chunk).splitlines() if ln.strip()]
        if lines:
            click.echo(f"failure: {lines[-1].strip()}")


def _section(title: str, values: Dict[str, Any]) -> None:
    click.echo(f"{title}:")
    if not values:
        click.echo("  (none)")
        return
    width = max(len(key or "value") for key in values)
    for key, value in values.items():
        click.echo(f"  {(key or 'value').ljust(width)}  {_fmt(value)}")


def paired_comparisons(db, a: int, b: int):
    """(paired comparisons of runs ``a`` and ``b`` on their questions, or [] and why not)."""
    import tempfile

    from pqa_core.evaluation.stats import compare_predictions

    with tempfile.TemporaryDirectory() as folder:
        try:
            first = runs_lib.predictions_of_run(db, a, Path(folder))[0]
            second = runs_lib.predictions_of_run(db, b, Path(folder))[0]
            return compare_predictions(first, second), ""
        except PqaError as exc:
            return [], f"no paired test: {exc}"


@runs.command("compare", short_help="Compare runs: config, final metrics, paired tests; or a sweep.")
@click.argument("run_ids", type=int, nargs=-1)
@click.option("--sweep", "sweep_id", default=None, metavar="ID",
              help="Compare the runs of a sweep (pqa sweep): one row per trial, its swept values and metrics.")
@click.option("--metric", default=None, metavar="NAME", help="With --sweep: the metric to sort and plot by "
                                                              "(default: the spec's, else the first of EM, F1 ...).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, metavar="FILE.png",
              help="With --sweep: write a parallel-coordinates plot of the swept values against the metric.")
@_store_command("Output JSON: {runs, config, result}, values in run order.",
                "Output CSV: key, then one column per run.")
def compare(ctx, run_ids, sweep_id, metric, plot_path, as_json, as_csv) -> None:
    """Compare runs side by side: differing config keys, then final metrics.

    Rows are config.<key> for each config key whose value is not the same in every run
    (Sacred's random seed usually is one), then result.<name> for every final metric. Two runs
    evaluated on the same questions also get a paired test per metric (EM, F1, substring): the mean
    difference, its 95% paired-bootstrap interval and a sign-flip permutation p-value.
    With --sweep ID: one row per trial of the sweep, best first by the metric.
    """
    _exclusive(ctx, json=as_json, csv=as_csv)
    if sweep_id is not None:
        if run_ids:
            raise click.UsageError("give run ids or --sweep, not both", ctx)
        _compare_sweep(ctx, sweep_id, metric, plot_path, as_json, as_csv)
        return
    if metric or plot_path:
        raise click.UsageError("--metric and --plot go with --sweep", ctx)
    if len(set(run_ids)) < 2:
        raise click.UsageError("compare needs at least two different run ids (or --sweep ID)", ctx)
    frame = runs_lib.compare_runs(_database(ctx), run_ids)
    if as_csv:
        click.echo(frame.to_csv(), nl=False)
        return
    ids = list(frame.columns)
    if as_json:
        out: Dict[str, Any] = {"runs": ids, "config": {}, "components": {}, "result": {}}
        for key, row in frame.iterrows():
            section, _, name = key.partition(".")
            out[section][name or "value"] = [row[i] for i in ids]
        if len(ids) == 2:
            paired, why = paired_comparisons(_database(ctx), ids[0], ids[1])
            out["paired"] = {c.metric: c.to_dict() for c in paired} if paired else {"unavailable": why}
        _dump(out)
        return
    rows = [[key] + [_fmt(row[i]) for i in ids] for key, row in frame.iterrows()]
    click.echo(_table(["key"] + [str(i) for i in ids], rows))
    if len(ids) == 2:
        paired, why = paired_comparisons(_database(ctx), ids[0], ids[1])
        click.echo(f"\npaired on the same questions (run {ids[0]} - run {ids[1]}):" if paired else f"\n{why}")
        for comparison in paired:
            click.echo("  " + comparison.describe())


def _best_first(value: Any) -> tuple:
    """Sort key: numbers, largest first, then the trials without one."""
    number = isinstance(value, (int, float))
    return (not number, -value if number else 0)


def _compare_sweep(ctx, sweep_id: str, metric: Optional[str], plot_path: Optional[str], as_json: bool,
                   as_csv: bool) -> None:
    from pqa_experiments.sweeps.trials import sweep_rows

    table = sweep_rows(_database(ctx), sweep_id)
    rows, params = table["rows"], table["params"]
    metric = metric or table["sweep"].get("metric") or next(iter(_main_metrics([r["metrics"] for r in rows])), None)
    if metric is None:
        raise PqaError(f"sweep {sweep_id}: no trial has a metric yet")
    rows = sorted(rows, key=lambda r: _best_first(r["metrics"].get(metric)))
    if plot_path:
        from pqa_experiments.sweeps.plot import parallel_coordinates

        parallel_coordinates(rows, params, metric, plot_path, title=f"{sweep_id} (pqa_{table['sweep']['experiment']})")
        click.echo(f"wrote {plot_path}", err=True)
    metrics = [metric] + [m for m in _main_metrics([r["metrics"] for r in rows]) if m != metric]
    if as_json:
        _dump({"sweep": sweep_id, "metric": metric, "params": params, "rows": rows})
        return
    headers = ["trial", "run", "status"] + params + metrics
    values = [[r["trial"], r["run_id"], r["status"]] + [r["params"].get(p) for p in params]
              + [r["metrics"].get(m) for m in metrics] for r in rows]
    if as_csv:
        import csv
        import io

        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(headers)
        writer.writerows(values)
        click.echo(buffer.getvalue(), nl=False)
        return
    click.echo(_table(headers, [[_fmt(v) for v in row] for row in values]))
