"""``pqa analyze RUN``: per question, what was asked, read and answered, and where it went wrong.

RUN is a run id in the run store (its ``predictions.jsonl`` artifact, and its corpus for the titles)
or a predictions file. The breakdown counts retrieval misses (no gold document read), reading misses
(a gold document read, the answer wrong) and correct answers over all questions; ``--wrong``,
``--retrieval-miss``, ``--reading-miss`` and ``--limit`` choose the questions shown.
"""
from __future__ import annotations

import csv
import json
import sys
import tempfile
from pathlib import Path

import click

from pqa_experiments.cli.common import database, db_options, errors_to_exit_codes, exclusive
from pqa_experiments.store.runs import predictions_of_run

TEXT_LIMIT = 20
LABELS = {"correct": "correct", "reading_miss": "reading miss", "retrieval_miss": "retrieval miss"}


def _documents(docs) -> str:
    return " | ".join(f"{d.id}{' ' + d.title if d.title else ''}{f' ({d.score:.2f})' if d.score is not None else ''}"
                      f"{' [gold]' if d.gold else ''}" for d in docs) or "(none)"


def _show_text(analysis, questions) -> None:
    click.echo(f"{analysis.source}")
    for i, q in enumerate(questions, 1):
        click.echo(f"\n{q.id}  {LABELS[q.outcome]}  EM {q.em:.0f}  F1 {q.f1:.1f}")
        click.echo(f"  question:   {q.question}")
        click.echo(f"  gold:       {' | '.join(q.answers)}")
        click.echo(f"  predicted:  {q.prediction}")
        click.echo(f"  read:       {_documents(q.selected)}")
        gold = [f"{doc_id}{' ' + title if title else ''}" for doc_id, title in zip(q.gold_doc_ids, q.gold_titles)]
        click.echo(f"  gold docs:  {' | '.join(gold) or '(none)'}")
    for note in analysis.notes:
        click.echo(f"\nnote: {note}")


def _show_breakdown(analysis, shown: int, matching: int) -> None:
    b = analysis.breakdown
    parts = [f"{b[o]} {LABELS[o]} ({b['percent'][o]:.1f}%)" for o in LABELS]
    if shown < matching:
        click.echo(f"\n{shown} of {matching} matching questions shown (--limit N shows more, --limit 0 all)")
    click.echo(f"\n{b['questions']} questions: " + ", ".join(parts))


def _write_csv(questions) -> None:
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(["id", "outcome", "correct", "em", "f1", "question", "answers", "prediction", "selected_ids",
                     "selected_titles", "selected_scores", "gold_doc_ids", "gold_titles"])
    for q in questions:
        writer.writerow([q.id, q.outcome, q.correct, q.em, q.f1, q.question, " | ".join(q.answers), q.prediction,
                         " | ".join(str(d.id) for d in q.selected), " | ".join(d.title or "" for d in q.selected),
                         " | ".join("" if d.score is None else f"{d.score:.6g}" for d in q.selected),
                         " | ".join(str(g) for g in q.gold_doc_ids), " | ".join(t or "" for t in q.gold_titles)])


@click.command("analyze")
@click.argument("run")
@click.option("--corpus", type=click.Path(dir_okay=False), default=None,
              help="Corpus JSONL for document titles (default for a run id: the run's own corpus).")
@click.option("--wrong", is_flag=True, help="Only questions answered wrongly.")
@click.option("--retrieval-miss", is_flag=True, help="Only wrong answers whose gold document was not read.")
@click.option("--reading-miss", is_flag=True, help="Only wrong answers whose gold document was read.")
@click.option("--limit", "-n", type=click.IntRange(min=0), default=None, metavar="N",
              help=f"At most N questions (text: {TEXT_LIMIT} unless given; 0 = all). The breakdown counts all.")
@click.option("--json", "as_json", is_flag=True, help="Output JSON: source, breakdown, notes, questions.")
@click.option("--csv", "as_csv", is_flag=True, help="Output CSV: one row per question.")
@db_options
@click.pass_context
@errors_to_exit_codes
def analyze(ctx, run, corpus, wrong, retrieval_miss, reading_miss, limit, as_json, as_csv):
    """Per-question analysis of a run (its id) or a predictions file: question, gold answers, prediction,
    documents read with titles and scores, gold documents, EM/F1, and whether a wrong answer is a
    retrieval miss (gold document not read) or a reading miss (read, answered wrongly).

    \b
    Examples:
      pqa analyze 7
      pqa analyze 7 --retrieval-miss --limit 5
      pqa analyze outputs/pqa_pipeline/<run>/predictions.jsonl --corpus corpus.jsonl --json
    """
    from pqa_core.evaluation.analysis import analyze_predictions

    exclusive(ctx, json=as_json, csv=as_csv)
    exclusive(ctx, retrieval_miss=retrieval_miss, reading_miss=reading_miss)
    outcome = "retrieval_miss" if retrieval_miss else "reading_miss" if reading_miss else None
    with tempfile.TemporaryDirectory(prefix="pqa-analyze-") as folder:
        if Path(run).is_file() or not run.isdigit():
            if not Path(run).is_file():
                raise click.UsageError(f"{run!r} is neither a run id nor a predictions file", ctx)
            path, run_corpus, source = Path(run), None, str(run)
        else:
            path, run_corpus, source = predictions_of_run(database(ctx), int(run), Path(folder))
        titles_from = corpus or (run_corpus if run_corpus and Path(run_corpus).is_file() else None)
        analysis = analyze_predictions(path, titles_from, source=source)
    if run_corpus and not titles_from:
        analysis.notes.append(f"the run's corpus {run_corpus} is not on this machine: documents are shown by id "
                              f"only (--corpus PATH gives titles)")
    matching = analysis.select(wrong=wrong, outcome=outcome)
    count = limit if limit else None if limit == 0 or as_json or as_csv else TEXT_LIMIT
    shown = matching if count is None else matching[:count]
    if as_json:
        click.echo(json.dumps(analysis.to_dict(shown), indent=2, ensure_ascii=False))
    elif as_csv:
        _write_csv(shown)
    else:
        _show_text(analysis, shown)
        _show_breakdown(analysis, len(shown), len(matching))
