"""What the store-reading commands share (``pqa runs``, ``pqa analyze``, ``pqa sweep``): the store's
options and connection, one line per error with its exit code, and the text/JSON formatting of
values (numbers rounded as every table prints them)."""
from __future__ import annotations

import datetime as _dt
import functools
import json
import math
from typing import Any, List, Optional, Sequence

import click

from pqa_core.errors import PqaError

from pqa_experiments.store import runs as runs_lib
from pqa_experiments.store.urls import describe_error, redact_url, url_secrets


# --------------------------------------------------------------------------- plumbing


def remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Keep --mongo-url/--db-name in ctx.meta so both ``runs --mongo-url X list`` and
    ``runs list --mongo-url X`` work (the later one wins)."""
    if value is not None:
        ctx.meta[f"pqa_runs.{param.name}"] = value
    return value


def db_options(func):
    func = click.option("--db-name", default=None, metavar="NAME", expose_value=False, callback=remember,
                        help="Database name (default: the URL's path, else 'pqa').")(func)
    func = click.option("--mongo-url", default=None, metavar="URL", expose_value=False, callback=remember,
                        help="Run store (default: $PQA_MONGO_URL, the config file, else the embedded server).")(func)
    return func


def store_command(json_help: str, csv_help: str):
    """A subcommand's tail: ``--json``/``--csv``, the store's options, the context, one line per error."""
    def decorate(func):
        func = errors_to_exit_codes(func)
        func = click.pass_context(func)
        func = db_options(func)
        func = click.option("--csv", "as_csv", is_flag=True, help=csv_help)(func)
        return click.option("--json", "as_json", is_flag=True, help=json_help)(func)
    return decorate


def database(ctx: click.Context):
    """Connect once per invocation, on first use (so ``--help`` never touches the network)."""
    if "pqa_runs.db" not in ctx.meta:
        url, name = runs_lib.resolve_store(ctx.meta.get("pqa_runs.mongo_url"), ctx.meta.get("pqa_runs.db_name"))
        ctx.meta["pqa_runs.url"] = url
        ctx.meta["pqa_runs.db"] = runs_lib.open_database(url, name)
        ctx.call_on_close(ctx.meta["pqa_runs.db"].client.close)
    return ctx.meta["pqa_runs.db"]


def debug(ctx: click.Context) -> bool:
    obj = ctx.find_root().obj
    return bool(isinstance(obj, dict) and obj.get("debug"))


def errors_to_exit_codes(func):
    """PqaError -> its exit code (2 as a click usage error); pymongo errors -> one redacted line, exit 1."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        import pymongo.errors

        ctx = click.get_current_context()
        try:
            return func(*args, **kwargs)
        except PqaError as exc:
            if debug(ctx):
                raise
            if exc.exit_code == 2:
                raise click.UsageError(str(exc), ctx) from None
            error = click.ClickException(str(exc))
            error.exit_code = exc.exit_code
            raise error from None
        except pymongo.errors.PyMongoError as exc:
            if debug(ctx):
                raise
            url = ctx.meta.get("pqa_runs.url")
            where = f" at {redact_url(url)}" if url else ""
            secrets: List[str] = url_secrets(url) if url else []
            raise click.ClickException(f"MongoDB error{where}: {describe_error(exc, secrets)}") from None

    return wrapper


def exclusive(ctx: click.Context, **flags: bool) -> None:
    given = [f"--{name.replace('_', '-')}" for name, on in flags.items() if on]
    if len(given) > 1:
        raise click.UsageError(f"{' and '.join(given)} cannot be used together", ctx)


# --------------------------------------------------------------------------- formatting


def jsonable(value: Any) -> Any:
    """Strict JSON: datetimes as ISO 8601 UTC, NaN/inf as null, anything exotic as text."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=_dt.timezone.utc)
        return value.isoformat()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if hasattr(value, "item"):  # numpy scalars
        return jsonable(value.item())
    return str(value)


def dump(value: Any) -> None:
    click.echo(json.dumps(jsonable(value), indent=2, allow_nan=False))


def fmt(value: Any) -> str:
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
        return json.dumps(jsonable(value))
    return str(value)


def fmt_duration(seconds: Optional[float]) -> str:
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


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()
             for line in [list(headers)] + [list(r) for r in rows]]
    return "\n".join(lines)
