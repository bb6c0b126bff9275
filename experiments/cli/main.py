"""The ``pqa`` command line: run experiments, list plugins, manage the database, query runs.

Conventions follow git and llm: ``--help`` everywhere, exit 0 on success, 1 on an error,
2 on a usage error, ``--json`` where scripts read the output, and one line per error
(a traceback only with ``--debug``).
"""
from __future__ import annotations

import copy
import logging
import os
import signal
import warnings

import click

from pqa_core.errors import EnvironmentFailure, PqaError

warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)


class PqaGroup(click.Group):
    """Turns PqaError, and an OSError the machine raised (read-only or looping folder, full disk), into
    one line on stderr and its exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (PqaError, OSError) as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            error = exc if isinstance(exc, PqaError) else EnvironmentFailure.from_os_error(exc)
            click.echo(f"Error: {error}", err=True)
            ctx.exit(error.exit_code)


@click.group(cls=PqaGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.version_option(package_name="pqa")
@click.pass_context
def cli(ctx, debug):
    """pqa: parametric question answering experiments.

    \b
    Quick start:
      pqa demo                         # pqa beside closed-book on the shipped sample, in minutes
      pqa run pipeline                 # one run: SmolLM2-135M on the shipped sample
      pqa run pipeline with smoke      # a fast check on a tiny random model
      pqa runs list                    # what has run
      pqa board                        # browse runs in Omniboard
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    main_process = os.environ.get("RANK", "0") == "0"  # under torchrun the others only warn
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO if main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "transformers", "filelock", "pymongo"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _quiet_transformers(debug)


def _quiet_transformers(debug: bool) -> None:
    """Weight-loading bars and deprecation chatter would bury pqa's own progress."""
    if debug:
        return
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
    warnings.filterwarnings("ignore", category=FutureWarning)


def _add_commands():
    from pqa_core.components.plugins import register_commands

    from pqa_experiments.cli.analyze import analyze
    from pqa_experiments.cli.bench import bench
    from pqa_experiments.cli.board import board
    from pqa_experiments.cli.config import config
    from pqa_experiments.cli.data import data
    from pqa_experiments.cli.db import db
    from pqa_experiments.cli.demo import demo
    from pqa_experiments.cli.plugins import plugins
    from pqa_experiments.cli.run import run
    from pqa_experiments.cli.runs import runs
    from pqa_experiments.cli.sweep import sweep

    for command in (run, demo, config, db, board, runs, data, bench, analyze, plugins, sweep):
        cli.add_command(command)
    cli.add_command(_alias(plugins, "plugin"))
    register_commands(cli)  # plugins' commands; a raising hook or a taken name is skipped with a warning


def _alias(group: click.Group, name: str) -> click.Group:
    """``group`` under another name, hidden from ``pqa --help`` (``pqa plugin new`` = ``pqa plugins new``)."""
    alias = copy.copy(group)
    alias.name, alias.hidden = name, True
    return alias


def _show_plugin_warnings() -> None:
    """A plugin skipped by pqa is one ``Warning: ...`` line on stderr, not a Python warning with its source."""
    from pqa_core.components.plugins import PluginWarning

    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, PluginWarning):
            click.echo(f"Warning: {str(message).removeprefix('pqa: ')}", err=True)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show


_show_plugin_warnings()


_add_commands()


def main():
    try:
        cli(prog_name="pqa")
    finally:  # all is said and saved: a Ctrl-C while Python shuts down ends it quietly, with no traceback
        signal.signal(signal.SIGINT, signal.SIG_DFL)


if __name__ == "__main__":  # pragma: no cover
    main()
