"""``pqa db start|stop|status|recover``: manage the embedded SecantusDB run store, and upload
what runs could not store while it was away.

The main CLI mounts it with ``cli.add_command(db)``. Errors are one line on
stderr and a non-zero exit code (the :class:`PqaError`'s ``exit_code``).
"""
from __future__ import annotations

import functools
import json

import click

from pqa_core.errors import PqaError

from pqa_experiments.store import db as _db


class _OneLine(click.ClickException):
    """A PqaError shown the click way ("Error: ..."), keeping its exit code."""

    def __init__(self, exc: PqaError | OSError):
        super().__init__(str(exc) if isinstance(exc, PqaError) else f"{exc.strerror or exc}: {exc.filename or ''}".strip())
        self.exit_code = getattr(exc, "exit_code", 1)


def _one_line_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (PqaError, OSError) as exc:
            raise _OneLine(exc) from None

    return wrapper


@click.group("db")
def db():
    """The embedded run store (SecantusDB on 127.0.0.1, data under $PQA_HOME/db)."""


@db.command("start")
@click.option("--port", type=int, default=None, help="Port (default: $PQA_DB_PORT or 27117).")
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Seconds to wait for it to answer.")
@_one_line_errors
def start(port, timeout):
    """Start the embedded database (or reuse the running one) and print its URL."""
    url = _db.ensure_running(port=port, timeout=timeout)
    st = _db.status()
    click.echo(f"running: {url} (pid {st['pid']}, data {st['db_dir']})")


@db.command("stop")
@click.option("--timeout", type=float, default=15.0, show_default=True, help="Seconds before SIGKILL.")
@_one_line_errors
def stop(timeout):
    """Stop the embedded database."""
    click.echo("stopped" if _db.stop(timeout=timeout) else "not running")


@db.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_one_line_errors
def status(as_json):
    """Show whether the embedded database runs, where, and its files."""
    st = _db.status()
    if as_json:
        click.echo(json.dumps(st, indent=2, sort_keys=True))
        return
    if st["running"]:
        state = "running" if st["answering"] else "running but NOT answering"
        click.echo(f"{state}: {st['url']} (pid {st['pid']}, since {st['started_at']})")
    else:
        click.echo("not running")
    click.echo(f"data: {st['db_dir']}")
    click.echo(f"log:  {st['log_file']}")


@db.command("recover")
@click.option("--mongo-url", default=None, help="MongoDB URL (else $PQA_MONGO_URL, the config file, or the embedded server).")
@click.option("--dir", "failure_dir", type=click.Path(file_okay=False), default=None,
              help="Where runs saved what they could not store (default: $PQA_HOME/failed_runs).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_one_line_errors
def recover(mongo_url, failure_dir, as_json):
    """Upload the metric points, artifacts and final records that runs saved locally while the
    database was unreachable (each run gets its real final status back), and store runs whose
    heartbeat stopped long ago as PROBABLY_DEAD. Safe to run again."""
    import pymongo

    from pqa_experiments.store import settings
    from pqa_experiments.store.recovery import recover as _recover

    target = _db.ensure_database(mongo_url)
    folder = failure_dir or str(settings.data_dir() / "failed_runs")
    with pymongo.MongoClient(target.url, appname="pqa-recover", serverSelectionTimeoutMS=10_000) as client:
        report = _recover(client, folder, db_name=target.db_name)
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True, default=str))
    else:
        _print_recovery(report, folder)
    if report["runs_failed"]:
        raise click.exceptions.Exit(1)


def _print_recovery(report: dict, folder: str) -> None:
    for run in report["runs"]:
        if run["recovered"]:
            click.echo(f"run {run['run_id']} ({run['database']}): restored {run['points_uploaded']} metric points "
                       f"({run['points_already_stored']} were already stored), {run['artifacts_uploaded']} "
                       f"artifacts; status {run['status']}")
        else:
            click.echo(f"run {run['run_id']} ({run['database']}): NOT recovered: {run['error']}", err=True)
    for line in report["skipped"]:
        click.echo(f"skipped {line}", err=True)
    restored = [str(r["run_id"]) for r in report["runs"] if r["recovered"]]
    click.echo(f"restored {report['points_uploaded']} metric points and {report['artifacts_uploaded']} artifacts "
               f"to {len(restored)} runs ({', '.join(restored) or 'none'}) from {report['files']} files in {folder}"
               + (f"; {report['runs_failed']} runs NOT recovered" if report["runs_failed"] else ""))
    if report["marked_dead"]:
        click.echo(f"stored as PROBABLY_DEAD (RUNNING, no heartbeat for over {report['dead_after_s']} s): runs "
                   + ", ".join(str(i) for i in report["marked_dead"]))
