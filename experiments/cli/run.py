"""``pqa run PHASE [Sacred args]``: the command; the run itself is ``experiments/tracking/engine.py``'s
``execute`` (shared with ``pqa demo`` and sweeps), which checks everything before the run exists."""
from __future__ import annotations

import json

import click

from pqa_core.errors import PqaError

from pqa_experiments.tracking.engine import (PHASES, accept, describe_result, execute, interrupt_on_sigterm, launch,
                                             show, split_sacred_args)


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("phase", type=click.Choice(PHASES))
@click.argument("sacred_args", nargs=-1, type=click.UNPROCESSED)
@click.option("--mongo-url", envvar=None, help="MongoDB URL (else $PQA_MONGO_URL, the config file, or the embedded server).")
@click.option("--no-db", is_flag=True, help="Do not record the run anywhere.")
@click.option("-F", "--file-storage", type=click.Path(file_okay=False), help="Record to a Sacred file-storage folder instead of MongoDB.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Train on N processes of this machine (torchrun: gloo on CPU, nccl on GPUs); the run is "
                   "recorded once. Several machines: run torchrun yourself (README).")
def run(phase, sacred_args, mongo_url, no_db, file_storage, as_json, nproc):
    """Run a Sacred experiment: pretrain, write, read, eval, pipeline or control (a baseline).

    \b
    Examples:
      pqa run pipeline
      pqa run pipeline with smoke
      pqa run pipeline with selector.name=dot read.top_k=5 model.llm=tiny
      pqa run read with init_from=outputs/pqa_write/<run> read.epochs=5
      pqa run pipeline with smoke resume=7   # continue run 7 (a new run) from its last checkpoint
      pqa run pipeline print_config with selector_mlp
      pqa run pipeline with configs/phase1_poc.yaml model.llm=tiny   # a YAML or JSON config file
      pqa run control with control.name=bm25 read.top_k=3
      pqa run pipeline --nproc 2 with smoke   # two processes, one global batch
    """
    command, items = split_sacred_args(list(sacred_args))
    if command:
        show(phase, command, items)
        return
    ctx = click.get_current_context(silent=True)
    debug = bool(ctx is not None and (ctx.find_root().obj or {}).get("debug"))
    if nproc > 1:
        from pqa_core.training.distributed import world_from_env

        if world_from_env() <= 1:  # check here, then start the processes: a bad input is one line, exit 2
            accept(phase, items, mongo_url, no_db, file_storage)
            ctx.exit(launch(nproc, phase, sacred_args, mongo_url=mongo_url, no_db=no_db, file_storage=file_storage,
                            as_json=as_json, debug=debug))
    recorded = []

    def announce(where):
        recorded.append(where)
        click.echo(f"recording to {where}", err=True)

    try:
        finished = execute(phase, items, mongo_url=mongo_url, no_db=no_db, file_storage=file_storage, debug=debug,
                           announce=announce, on_start=interrupt_on_sigterm)
    except PqaError as exc:  # under `pqa run --nproc N`: the main process says it, so the launcher need not
        from pqa_core.training import distributed

        if distributed.current().is_main:
            distributed.record_failure(str(exc))
        raise
    if finished is None:  # a process other than the main one: the main one reports
        return
    result = finished.result or {}
    if as_json:
        click.echo(json.dumps({"run_id": finished._id, "result": result}))
    else:
        click.echo(f"run {finished._id} {finished.status}: {describe_result(result)}")
        if recorded and recorded[0].startswith("MongoDB"):
            click.echo("browse it: pqa board    query it: pqa runs show " + str(finished._id))
