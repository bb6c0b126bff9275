"""``pqa data import-squad FILE OUT_DIR``: SQuAD v1.1/v2.0 JSON -> pqa's JSONL files with a split.

The main CLI mounts it with ``cli.add_command(data)``. Errors are one line on stderr
(naming the file and JSON path for bad input) and a non-zero exit code.
"""
from __future__ import annotations

import json

import click

from pqa_core.errors import PqaError


class _OneLine(click.ClickException):
    """A PqaError shown the click way ("Error: ..."), keeping its exit code."""

    def __init__(self, exc: PqaError):
        super().__init__(str(exc))
        self.exit_code = exc.exit_code


@click.group("data")
def data():
    """Prepare data sets: convert, split."""


@data.command("import-squad")
@click.argument("file", type=click.Path(dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--split-mode", type=click.Choice(["article", "question"]), default="article", show_default=True,
              help="article: hold out whole articles; question: hold out questions, every passage stays in train.")
@click.option("--dev-fraction", type=float, default=0.1, show_default=True,
              help="Share of articles (article mode) or of each passage's questions (question mode) for dev.")
@click.option("--test-fraction", type=float, default=0.1, show_default=True, help="Likewise for test.")
@click.option("--seed", type=int, default=0, show_default=True, help="Changes which items are held out.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary (also written to OUT_DIR/import.json) as JSON.")
def import_squad_command(file, out_dir, split_mode, dev_fraction, test_fraction, seed, as_json):
    """Convert a SQuAD v1.1/v2.0 JSON FILE into OUT_DIR/corpus.jsonl, qa_train.jsonl, qa_dev.jsonl,
    qa_test.jsonl and import.json (one passage per document; v2.0 unanswerable questions are skipped).

    \b
    Deterministic: the same file, mode, fractions and seed give the same bytes.
    Files are written under temporary names and renamed, so a failed import leaves none.
    Use the result with: data.corpus=OUT_DIR/corpus.jsonl data.qa=OUT_DIR/qa_train.jsonl
    data.eval_qa=OUT_DIR/qa_dev.jsonl
    """
    from pqa_core.data.squad import import_squad

    try:
        summary = import_squad(file, out_dir, mode=split_mode, dev_fraction=dev_fraction,
                               test_fraction=test_fraction, seed=seed)
    except PqaError as exc:
        raise _OneLine(exc) from None
    if as_json:
        click.echo(json.dumps(summary, indent=2, ensure_ascii=False))
        return
    counts = summary["questions"]
    articles = summary["articles_per_split"]
    click.echo(f"{summary['documents']} passages from {summary['articles']} articles -> {out_dir}/corpus.jsonl")
    for name in ("train", "dev", "test"):
        click.echo(f"  qa_{name}.jsonl: {counts[name]} questions ({articles[name]} articles)")
    for reason, n in summary["skipped"].items():
        click.echo(f"  skipped {n} question(s): {reason.replace('_', ' ')}")
    click.echo(f"  split by {split_mode}, dev {dev_fraction}, test {test_fraction}, seed {seed}")
