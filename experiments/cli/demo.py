"""``pqa demo``: the point of pqa in a few minutes.

Two tracked runs on the same questions: pqa (write, read, eval) and closed-book with its own reader
trained the same way (``train_reader``: the same epochs, batch size and learning rate), each reader
starting from the artifact shipped for the LLM (``model.pretrained=auto``: ``pqa_core/pretrained/``,
pretrained on SQuAD articles disjoint from the sample: for pqa the reader of 64 tokens of each document's
most salient sentences, the shape the ``demo`` config sets). Then the paired
comparison of the two on every held-out question, and where to look next. Both runs take the
``demo`` named config, so ``pqa demo with read.epochs=8`` changes them alike.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import click

from pqa_experiments.tracking.engine import describe_result, execute, interrupt_on_sigterm, split_sacred_args

PQA_ITEMS = ["demo"]
CONTROL_ITEMS = ["demo", "train_reader", "control.name=closed_book"]
NEXT_STEPS = """\
next:
  pqa analyze {a} --wrong          what pqa got wrong, and whether retrieval or reading missed
  pqa runs compare {a} {b}            the two runs side by side, with the paired tests
  pqa board                       browse every run in Omniboard
longer and more convincing (SQuAD passages, every control with its own trained reader, ~30 min):
  python bench/quality.py --quick   from a clone with ../shared/data (bench/RESULTS.md (a): --full)"""


def _predictions(run) -> Path:
    return Path(run.info["output_dir"]) / run.config["eval"]["predictions_file"]


def _run(phase: str, items: List[str], label: str, mongo_url, no_db, debug, quiet: bool):
    if not quiet:
        click.echo(f"{label}: pqa run {phase} with {' '.join(items)}", err=True)
    run = execute(phase, items, mongo_url=mongo_url, no_db=no_db, debug=debug, on_start=interrupt_on_sigterm)
    if not quiet:
        ident = f"run {run._id}" if run._id is not None else "(not recorded)"
        click.echo(f"{label}: {ident} {run.status}: {describe_result(run.result or {})}", err=True)
        started = (run.info or {}).get("pretrained") or {}
        click.echo(f"{label}: started from {started.get('path') or started.get('why') or 'no pretrained artifact'}",
                   err=True)
    return run


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("sacred_args", nargs=-1, type=click.UNPROCESSED)
@click.option("--mongo-url", default=None, help="MongoDB URL (else $PQA_MONGO_URL, the config file, or the embedded server).")
@click.option("--no-db", is_flag=True, help="Do not record the runs anywhere.")
@click.option("--json", "as_json", is_flag=True, help="Print both results and the paired tests as JSON on stdout.")
@click.pass_context
def demo(ctx, sacred_args, mongo_url: Optional[str], no_db: bool, as_json: bool):
    """pqa beside closed-book on the shipped sample, in minutes (SmolLM2-135M).

    Runs ``pqa run pipeline with demo`` and ``pqa run control with demo train_reader
    control.name=closed_book`` (a reader trained the same way, reading no documents), both starting from
    the pretrained artifacts shipped for the LLM (``model.pretrained=auto``), then compares
    them question by question: the mean difference in each metric, its 95% interval and a paired p-value.
    108 held-out questions (three per document, none asked in training) give intervals about 17 F1
    points wide: the demo shows the workflow and a first difference; bench (a) measures.

    \b
    Examples:
      pqa demo
      pqa demo with read.epochs=8          # both runs, alike
      pqa demo with model.llm=tiny --no-db # a fast check of the plumbing
    """
    from pqa_core.evaluation.stats import compare_predictions

    command, items = split_sacred_args(list(sacred_args))
    if command:
        raise click.UsageError(f"pqa demo takes only 'with' overrides, got the command {command!r}")
    debug = bool((ctx.find_root().obj or {}).get("debug"))
    pqa_run = _run("pipeline", PQA_ITEMS + items, "pqa", mongo_url, no_db, debug, as_json)
    control = _run("control", CONTROL_ITEMS + items, "closed-book", mongo_url, no_db, debug, as_json)
    compared = compare_predictions(_predictions(pqa_run), _predictions(control))
    if as_json:
        click.echo(json.dumps({"pqa": {"run_id": pqa_run._id, "result": pqa_run.result},
                               "closed_book": {"run_id": control._id, "result": control.result},
                               "paired": {c.metric: c.to_dict() for c in compared}}))
        return
    click.echo("pqa - closed-book on the same questions (mean difference [95% interval], paired p):")
    for comparison in compared:
        click.echo("  " + comparison.describe())
    f1 = next((c for c in compared if c.metric == "F1"), None)
    if f1 is not None:
        verdict = ("pqa's documents help" if f1.significant and f1.difference > 0 else
                   "pqa's documents hurt" if f1.significant else
                   "no significant difference on this many questions")
        click.echo(f"F1: {verdict} (p={f1.p_value:.3g}, n={f1.n})")
    if pqa_run._id is not None:
        click.echo(NEXT_STEPS.format(a=pqa_run._id, b=control._id))
