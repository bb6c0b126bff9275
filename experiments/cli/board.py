"""``pqa board``: browse the Sacred runs in Omniboard, bound to loopback unless asked otherwise.

The main CLI registers this with ``add_command(board)``. The run store is found the same
way as for every other command (``pqa_experiments.store.db.ensure_database``, i.e. the
``settings`` precedence); the embedded SecantusDB server is started on demand when that
is what the settings resolve to.
"""
from __future__ import annotations

import ipaddress
import webbrowser

import click

from pqa_experiments.board.omniboard import BoardError, parse_basic_auth, start_board, stop_board
from pqa_experiments.store.db import ensure_database
from pqa_experiments.store.urls import describe_error, redact_url, url_secrets


def _seed_columns(url: str, db_name: str, proc) -> None:
    """Omniboard's column settings get pqa's columns where the user has none (``board_columns``)."""
    import pymongo

    from pqa_experiments.board.columns import seed_columns

    try:
        with pymongo.MongoClient(url, serverSelectionTimeoutMS=5000, appname="pqa") as client:
            added = seed_columns(client[db_name])
    except pymongo.errors.PyMongoError as exc:
        stop_board(proc)
        raise BoardError(f"cannot write Omniboard's column settings to {redact_url(url)}: "
                         f"{describe_error(exc, url_secrets(url), limit=200)}") from None
    names = added["custom"] + added["metric"]
    if names:
        click.echo(f"added columns to Omniboard: {', '.join(names)} (remove or change them there; "
                   f"pqa does not add them again)", err=True)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command("board")
@click.option("--port", type=click.IntRange(0, 65535), default=9000, show_default=True,
              help="Port for Omniboard (0 picks a free one).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on; anything but loopback exposes the board (it can delete runs).")
@click.option("--mongo-url", default=None, metavar="URL",
              help="Run store (default: $PQA_MONGO_URL, the config file, else the embedded server).")
@click.option("--basic-auth", default=None, metavar="USER:PASSWORD", envvar="PQA_BOARD_BASIC_AUTH",
              help="Require HTTP basic auth (or set $PQA_BOARD_BASIC_AUTH, which stays out of `ps`).")
@click.option("--no-browser", is_flag=True, help="Only print the URL; do not open a browser.")
@click.option("--no-columns", is_flag=True,
              help="Do not add pqa's columns (components, key hyper-parameters, EM/F1/Recall@k) to Omniboard.")
def board(port: int, host: str, mongo_url: str | None, basic_auth: str | None, no_browser: bool,
          no_columns: bool) -> None:
    """Start Omniboard on the run store, print its URL and keep it running until Ctrl-C.

    \b
    Omniboard opens on pqa's columns (components, key settings, EM/F1/Recall@k);
    --no-columns leaves its column settings as they are.
    \b
    Examples:
      pqa board
      pqa board --port 0 --no-browser
    """
    parse_basic_auth(basic_auth)  # a malformed value fails before anything starts
    target = ensure_database(mongo_url)
    url_db, db_name, source = target.url, target.db_name, target.source
    if not _is_loopback(host) and not basic_auth:
        click.echo(f"warning: listening on {host} without --basic-auth: anyone who can reach this "
                   "port can read and delete runs", err=True)
    click.echo(f"starting Omniboard for {redact_url(url_db)} (database {db_name!r}, from {source}) ...", err=True)
    proc, url = start_board(url_db, db_name=db_name, host=host, port=port, basic_auth=basic_auth,
                            columns=not no_columns)
    if not no_columns:
        _seed_columns(url_db, db_name, proc)
    click.echo(url)
    click.echo(f"Omniboard log: {proc.log_path}. Press Ctrl-C to stop.", err=True)
    if not no_browser:
        webbrowser.open(url)
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        stop_board(proc)
        click.echo("board stopped", err=True)
        return
    raise BoardError(f"Omniboard exited with code {rc} (log: {proc.log_path})")
