"""``pqa sweep SPEC.yaml`` (run a sweep on Ray) and ``pqa sweep status ID``.

The spec format is in ``pqa_experiments.sweeps.spec``; how trials run, in ``pqa_experiments.sweeps.trials``.
``pqa runs compare --sweep ID`` compares a sweep's runs (table and parallel-coordinates plot).
Exit codes: 0 every trial completed, 1 a trial failed (the others still ran) or an error, 2 a bad spec.
"""
from __future__ import annotations

import json

import click

from pqa_experiments.cli.common import database, db_options, dump, errors_to_exit_codes, fmt, fmt_duration, table


class _DefaultToRun(click.Group):
    """``pqa sweep SPEC.yaml ...`` means ``pqa sweep run SPEC.yaml ...``; ``status`` is a subcommand."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group("sweep", cls=_DefaultToRun, subcommand_metavar="SPEC.yaml [OPTIONS] | status ID",
             context_settings={"help_option_names": ["-h", "--help"]})
def sweep() -> None:
    """Run a sweep of tracked runs on Ray, or show one.

    \b
    Examples:
      pqa sweep sweep.yaml                       # a local Ray instance, 2 workers
      pqa sweep sweep.yaml --workers 8
      pqa sweep sweep.yaml --address ray://head:10001 --mongo-url mongodb://db-host/pqa
      pqa sweep status sweep-20270101-120000-ab12
      pqa runs compare --sweep sweep-20270101-120000-ab12 --plot sweep.png

    \b
    A spec (YAML):
      experiment: pipeline
      with: [smoke]                   # named configs / key=value of every trial
      grid: {selector.name: [dot, cosine], read.top_k: [1, 3]}
      random: {samples: 2, seed: 0, params: {read.lr_z: {loguniform: [1.0e-5, 1.0e-3]}}}
      metric: F1
    """


@sweep.command("run", short_help="Run the trials of SPEC on Ray (the default command).")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--workers", "-w", type=click.IntRange(min=1), default=2, show_default=True,
              help="Trials at once on the local Ray instance (one CPU each).")
@click.option("--address", default=None, metavar="ADDR",
              help="An existing Ray cluster (ray://host:10001 or auto) instead of a local instance.")
@click.option("--mongo-url", default=None, metavar="URL",
              help="Run store (default: $PQA_MONGO_URL, the config file, else the embedded server). "
                   "A cluster's machines must reach it.")
@click.option("--dry-run", is_flag=True, help="Print the trials and check each one; run nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the finished sweep as JSON on stdout.")
@click.pass_context
def run_sweep_command(ctx, spec, workers, address, mongo_url, dry_run, as_json):
    """Run every trial of SPEC as a tracked run, in parallel on Ray."""
    from pqa_experiments.sweeps.spec import load_spec
    from pqa_experiments.sweeps.trials import check_trials, run_sweep

    loaded = load_spec(spec)
    if dry_run:
        trials = loaded.trials()
        refused = check_trials(loaded, trials)
        for trial in trials:
            mark = f"  REFUSED: {refused[trial.index]}" if trial.index in refused else ""
            click.echo(f"trial {trial.index}: pqa run {loaded.experiment} with {' '.join(trial.items)}{mark}")
        ctx.exit(1 if refused else 0)
    doc = run_sweep(loaded, workers=workers, address=address, mongo_url=mongo_url,
                    log=lambda line: click.echo(line, err=True))
    counts = ", ".join(f"{n} {status.lower()}" for status, n in doc["counts"].items())
    click.echo(f"sweep {doc['_id']} {doc['status']}: {counts} in {fmt_duration(doc.get('wall_s'))}", err=True)
    if as_json:
        click.echo(json.dumps({"sweep_id": doc["_id"], "status": doc["status"], "counts": doc["counts"],
                               "trials": doc["trials"]}, default=str))
    else:
        click.echo(f"compare them: pqa runs compare --sweep {doc['_id']}")
    ctx.exit(0 if doc["status"] == "COMPLETED" else 1)


@sweep.command("status", short_help="Show a sweep's trials: status, run, swept values, metric.")
@click.argument("sweep_id")
@click.option("--json", "as_json", is_flag=True, help="Output JSON.")
@db_options
@click.pass_context
@errors_to_exit_codes
def status(ctx, sweep_id, as_json):
    """Show a sweep: its status and each trial's status, run id, swept values and metric."""
    from pqa_experiments.sweeps.trials import SweepStore

    doc = SweepStore(database(ctx)).status(sweep_id)
    if as_json:
        dump({k: doc.get(k) for k in ("_id", "status", "experiment", "metric", "swept", "start_time", "stop_time",
                                       "wall_s", "workers", "address", "counts", "trials")})
        return
    counts = ", ".join(f"{n} {s.lower()}" for s, n in doc["counts"].items())
    click.echo(f"sweep {doc['_id']}  {doc['status']}  pqa_{doc['experiment']}  {len(doc['trials'])} trials: {counts}")
    click.echo(f"  started {fmt(doc.get('start_time'))} UTC on {doc.get('host')} ({doc.get('address')}, "
               f"{doc.get('workers')} workers); wall {fmt_duration(doc.get('wall_s'))}")
    metric = doc.get("metric") or ""
    swept = list(doc.get("swept") or [])
    headers = ["trial", "status", "run"] + swept + ([metric] if metric else []) + ["error"]
    rows = []
    for trial in doc["trials"]:
        result = trial.get("result") or {}
        rows.append([str(trial["trial"]), trial["status"], fmt(trial.get("run_id"))]
                    + [fmt(trial["params"].get(k)) for k in swept]
                    + ([fmt(result.get(metric)) if isinstance(result, dict) else "-"] if metric else [])
                    + [(trial.get("error") or "")[:80]])
    click.echo(table(headers, rows))
