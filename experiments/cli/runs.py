"""``pqa runs``: list, show and compare the Sacred runs in the run store.

The main CLI registers this with ``add_command(runs)``. Text output is for people,
``--json`` (and ``--csv``) for scripts. Exit codes: 0 ok, 1 error (unknown run,
database unreachable), 2 usage error (bad ``--where``, conflicting flags).
Errors are one line and never show a password from the Mongo URL.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import click

from pqa_core.errors import PqaError

from pqa_experiments.cli.common import (database, db_options, dump, errors_to_exit_codes, exclusive, fmt, fmt_duration,
                                        store_command, table)
from pqa_experiments.store import runs as runs_lib

_PREFERRED_METRICS = ("EM", "F1", "substring")
_MAX_LIST_METRICS = 6


def _metric_order(name: str) -> tuple:
    """EM, F1, substring, then Recall@k by k, then the rest alphabetically."""
    if name in _PREFERRED_METRICS:
        return (0, _PREFERRED_METRICS.index(name), 0, name)
    match = re.fullmatch(r"Recall@(\d+)", name)
    if match:
        return (1, 0, int(match.group(1)), name)
    return (2, 0, 0, name)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _first_metrics(names) -> List[str]:
    """The columns a listing has room for, in :func:`_metric_order`."""
    return sorted(set(names), key=_metric_order)[:_MAX_LIST_METRICS]


def _main_metrics(results: Sequence[Dict[str, Any]]) -> List[str]:
    return _first_metrics(k for result in results for k, v in result.items() if _is_number(v))


_INTERVAL = re.compile(r"(.+)_ci95_(low|high)")


def _listed_scores(result: Dict[str, Any]) -> Dict[str, Any]:
    """A result's numbers as ``runs list`` shows them: a score with its 95% interval in one cell (``8.33 [1.39,
    16.67]``) instead of three columns, and a pretraining run's held-out scores (``eval_F1``) under their plain
    names."""
    shown = {}
    for name, value in result.items():
        if _INTERVAL.fullmatch(name) or not _is_number(value):
            continue
        low, high = result.get(f"{name}_ci95_low"), result.get(f"{name}_ci95_high")
        cell = f"{fmt(value)} [{fmt(low)}, {fmt(high)}]" if low is not None and high is not None else value
        shown[name] = cell
    for name in [n for n in shown if n.startswith("eval_") and n[len("eval_"):] not in shown]:
        shown[name[len("eval_"):]] = shown.pop(name)
    return shown


# --------------------------------------------------------------------------- commands


@click.group("runs", context_settings={"help_option_names": ["-h", "--help"]})
@db_options
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
@store_command("Output a JSON list.", "Output CSV: every column of the runs DataFrame.")
def list_runs(ctx, where, status, experiment, limit, as_json, as_csv) -> None:
    """List runs, newest first, with their main final metrics."""
    exclusive(ctx, json=as_json, csv=as_csv)
    filters = runs_lib.parse_where(where)
    docs = runs_lib.find_runs(database(ctx), filters=filters, status=status, experiment=experiment, limit=limit)
    if as_csv:
        frame = runs_lib.rows_dataframe([runs_lib.run_row(doc) for doc in docs])
        click.echo(frame.to_csv(index=False), nl=False)
        return
    if as_json:
        dump([{
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
    results = [_listed_scores(runs_lib.result_dict(doc.get("result"))) for doc in docs]
    metrics = _first_metrics(name for result in results for name in result)
    headers = ["id", "experiment", "status", "start (UTC)", "duration"] + [m or "result" for m in metrics]
    rows = []
    for doc, result in zip(docs, results):
        rows.append([str(doc["_id"]), fmt((doc.get("experiment") or {}).get("name")),
                     fmt(runs_lib.effective_status(doc)), fmt(doc.get("start_time")),
                     fmt_duration(runs_lib.duration_s(doc))]
                    + [fmt(result.get(m)) for m in metrics])
    click.echo(table(headers, rows))


@runs.command("show", short_help="Show one run: config, result, info, metrics, artifacts.")
@click.argument("run_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Output JSON.")
@db_options
@click.pass_context
@errors_to_exit_codes
def show(ctx, run_id, as_json) -> None:
    """Show one run: config, result, info, final metric values, artifacts.

    Config and info are flattened to dotted keys; for each metric series the last
    value, its step and the number of points are shown.
    """
    summary = runs_lib.run_summary(database(ctx), run_id)
    if as_json:
        dump(summary)
        return
    click.echo(f"run {summary['id']}  {summary['experiment']}  {summary['status']}")
    click.echo(f"  command:  {fmt(summary['command'])}")
    click.echo(f"  host:     {fmt(summary['host'])}")
    click.echo(f"  started:  {fmt(summary['start_time'])} UTC")
    click.echo(f"  stopped:  {fmt(summary['stop_time'])} UTC")
    click.echo(f"  duration: {fmt_duration(summary['duration_s'])}")
    _section("config", summary["config"])
    _section("result", runs_lib.result_dict(summary["result"]))
    _section("info", runs_lib.flatten(summary["info"]))
    click.echo("metrics (final value @ step, points):")
    if not summary["metrics"]:
        click.echo("  (none)")
    width = max((len(name) for name in summary["metrics"]), default=0)
    for name, last in summary["metrics"].items():
        click.echo(f"  {name.ljust(width)}  {fmt(last['value'])} @ {last['step']}  ({last['points']})")
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
        click.echo(f"  {(key or 'value').ljust(width)}  {fmt(value)}")


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
@store_command("Output JSON: {runs, config, result}, values in run order.",
                "Output CSV: key, then one column per run.")
def compare(ctx, run_ids, sweep_id, metric, plot_path, as_json, as_csv) -> None:
    """Compare runs side by side: differing config keys, then final metrics.

    Rows are config.<key> for each config key whose value is not the same in every run
    (Sacred's random seed usually is one), then result.<name> for every final metric. Two runs
    evaluated on the same questions also get a paired test per metric (EM, F1, substring): the mean
    difference, its 95% paired-bootstrap interval and a sign-flip permutation p-value.
    With --sweep ID: one row per trial of the sweep, best first by the metric.
    """
    exclusive(ctx, json=as_json, csv=as_csv)
    if sweep_id is not None:
        if run_ids:
            raise click.UsageError("give run ids or --sweep, not both", ctx)
        _compare_sweep(ctx, sweep_id, metric, plot_path, as_json, as_csv)
        return
    if metric or plot_path:
        raise click.UsageError("--metric and --plot go with --sweep", ctx)
    if len(set(run_ids)) < 2:
        raise click.UsageError("compare needs at least two different run ids (or --sweep ID)", ctx)
    frame = runs_lib.compare_runs(database(ctx), run_ids)
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
            paired, why = paired_comparisons(database(ctx), ids[0], ids[1])
            out["paired"] = {c.metric: c.to_dict() for c in paired} if paired else {"unavailable": why}
        dump(out)
        return
    rows = [[key] + [fmt(row[i]) for i in ids] for key, row in frame.iterrows()]
    click.echo(table(["key"] + [str(i) for i in ids], rows))
    if len(ids) == 2:
        paired, why = paired_comparisons(database(ctx), ids[0], ids[1])
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

    found = sweep_rows(database(ctx), sweep_id)
    rows, params = found["rows"], found["params"]
    metric = metric or found["sweep"].get("metric") or next(iter(_main_metrics([r["metrics"] for r in rows])), None)
    if metric is None:
        raise PqaError(f"sweep {sweep_id}: no trial has a metric yet")
    rows = sorted(rows, key=lambda r: _best_first(r["metrics"].get(metric)))
    if plot_path:
        from pqa_experiments.sweeps.plot import parallel_coordinates

        parallel_coordinates(rows, params, metric, plot_path, title=f"{sweep_id} (pqa_{found['sweep']['experiment']})")
        click.echo(f"wrote {plot_path}", err=True)
    metrics = [metric] + [m for m in _main_metrics([r["metrics"] for r in rows]) if m != metric]
    if as_json:
        dump({"sweep": sweep_id, "metric": metric, "params": params, "rows": rows})
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
    click.echo(table(headers, [[fmt(v) for v in row] for row in values]))
