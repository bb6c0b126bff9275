"""(m) Is the answer in the soft tokens at all? What an extractive writer's m tokens hold of the gold answer.

The ``keywords`` and ``sentences`` writers make a passage's soft tokens from m of its own tokens (its salient
words, or its most salient sentences cut to m tokens), as the LLM's input embeddings. A reader of them
can copy an answer only if the answer's words are among those m tokens; otherwise it must guess. This
counts, on bench (a)'s held-out questions (both splits, the same files), how often the gold answer (any
of them, SQuAD-normalised) is a phrase of the text the writer keeps of a gold passage, for each writer and
m, with 95% bootstrap intervals. The passages are cut into rows as a run cuts them (``data.max_doc_tokens``),
and each writer's word statistics are the run's corpus's (its ``prepare``). No model runs. For ``sentences``
this bounds what a reader can copy from the soft tokens; ``keywords`` keeps each content word once and no
stop words, so an answer such as "University of Chicago" is never a phrase of its tokens though a reader
might reassemble it (counting answers whose words are all among the tokens, in any order, gives more:
44% at m = 32, 70% at m = 64, bench (a)'s notes). Text RAG's reader sees the whole passage.

With bench (a)'s results (``--quality-json``, default bench/results/quality.json, same profile), each of
its rows' F1 is also split by whether the ``--at`` writer's tokens (default ``sentences:64``) hold the answer:
what a system reads where the answer is there, and where it is not.

    python bench/coverage.py --full
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402

NAME = "coverage"
PROFILES = {
    "smoke": dict(llm="tiny", splits="smoke", m=[2, 8, 32], max_doc_tokens=256, at="sentences:32"),
    "quick": dict(llm="smollm2-135m", splits="quick", m=[16, 32, 64, 128], max_doc_tokens=256, at="sentences:64"),
    "full": dict(llm="smollm2-135m", splits="full", m=[8, 16, 32, 64, 96, 128, 256], max_doc_tokens=256,
                 at="sentences:64"),
}
SPLITS = {"question": ("corpus", "eval_qa"), "article": ("grown_corpus", "new_eval_qa")}  # bench (a)'s files


def answer_held(texts, questions, passage_rows) -> list:
    """Per question, 1.0 when one of its answers (normalised) is a phrase of a gold passage's kept text (the
    rows of each of its ``gold_rows``, the corpus positions ``load_qa`` resolved)."""
    from pqa_core.evaluation.metrics import normalize_answer

    kept = [f" {normalize_answer(t)} " for t in texts]
    return [float(any(f" {normalize_answer(a)} " in kept[row] for a in q.answers if normalize_answer(a)
                      for passage in q.gold_rows for row in passage_rows[passage]))
            for q in questions]


def f1_by_coverage(quality: dict, held: dict) -> dict:
    """(a)'s rows' mean F1 (x100) over the questions whose answer ``held`` (question id -> 1.0/0.0) says the
    tokens hold, and over the others, per split; a row lacking a question is left out of that split."""
    out = {}
    for label, row in quality.get("rows", {}).items():
        for split, per_question in (("question", row.get("per_question")),
                                    ("article", (row.get("new") or {}).get("per_question"))):
            ids = held.get(split, {})
            if not per_question or not ids or not set(ids) <= set(per_question):
                continue
            groups = {kind: [per_question[q]["f1"] for q, h in ids.items() if h == value]
                      for kind, value in (("held", 1.0), ("not held", 0.0))}
            out.setdefault(label, {})[split] = {kind: {"n": len(v), "F1": 100 * sum(v) / len(v) if v else None}
                                                for kind, v in groups.items()}
    return out


def run(profile: str = "full", command: str | None = None, threads: int | None = common.DEFAULT_THREADS,
        quality_json: str | None = None, **overrides) -> dict:
    import tempfile

    from bench import quality
    from pqa_core.data.loading import load_corpus, load_qa, split_passages
    from pqa_core.evaluation.stats import bootstrap_interval
    from pqa_core.modeling.keywords import SELECTIONS, document_frequencies
    from pqa_core.modeling.llm import load_tokenizer
    from plugins.writers import KeywordsWriter, SentencesWriter

    bench = common.Bench(NAME, profile, PROFILES, overrides, threads, command)
    p = bench.params
    quality_file = Path(quality_json) if quality_json else common.DEFAULT_OUT / "quality.json"
    quality_result = json.loads(quality_file.read_text()) if quality_file.exists() else {}
    if quality_result.get("profile") not in (None, p["splits"]):
        quality_result = {}  # another profile's questions
    at = p["at"]
    at_name, _, at_m = at.partition(":")
    by_question = {}
    tokenizer = load_tokenizer(p["llm"])
    held, sizes, about = {}, {}, None
    with tempfile.TemporaryDirectory() as tmp:
        paths, about = quality.build_splits(quality.PROFILES[p["splits"]], Path(tmp))
        for split, (corpus_key, qa_key) in SPLITS.items():
            corpus = load_corpus(paths[corpus_key])
            questions = load_qa(paths[qa_key], corpus)
            if not questions:
                continue
            rows = split_passages(corpus, tokenizer, p["max_doc_tokens"])
            texts = [d.text for d in rows.documents]
            frequencies = document_frequencies(texts)
            sizes[split] = {"questions": len(questions), "passages": len(corpus), "rows": len(texts),
                            "mean_row_tokens": sum(map(len, rows.tokens)) / len(texts)}
            cells = {"whole passage": answer_held(texts, questions, rows.rows_of_passage)}
            for writer in (KeywordsWriter, SentencesWriter):
                for m in p["m"]:
                    ids = SELECTIONS[writer.unit](texts, tokenizer, m, "tfidf_names", frequencies)
                    cells[f"{writer.name} m={m}"] = answer_held([tokenizer.decode(i) for i in ids], questions,
                                                                rows.rows_of_passage)
                    if (writer.name, str(m)) == (at_name, at_m):
                        by_question[split] = dict(zip((q.id for q in questions), cells[f"{writer.name} m={m}"]))
            held[split] = {name: dict(zip(("percent", "low", "high"), (100 * x for x in bootstrap_interval(v))))
                           for name, v in cells.items()}
    if not by_question and held:
        raise ValueError(f"--at {at!r}: expected WRITER:M among {[w.name for w in (KeywordsWriter, SentencesWriter)]} "
                         f"and m {p['m']}")
    return bench.finish({"splits": sizes, "answer_held": held, "data": about, "at": at,
                         "quality_json": str(quality_file) if quality_result else None,
                         "f1_by_coverage": f1_by_coverage(quality_result, by_question)})


def markdown(result: dict) -> str:
    held, sizes, p = result["answer_held"], result["splits"], result["params"]
    names = list(next(iter(held.values()))) if held else []
    rows = [[name] + [f"{held[s][name]['percent']:.1f} [{held[s][name]['low']:.1f}, {held[s][name]['high']:.1f}]"
                      for s in held] for name in names]
    table = common.md_table(["kept of the gold passage"] + [
        f"{s} split: answer held, % ({sizes[s]['questions']} questions)" for s in held], rows)
    described = "; ".join(f"{s} split: {v['passages']} passages in {v['rows']} rows of {v['mean_row_tokens']:.0f} "
                          f"tokens on average" for s, v in sizes.items())
    blocks = []
    by = result.get("f1_by_coverage") or {}
    if by:
        splits = [s for s in held if any(s in v for v in by.values())]
        blocks.append(f"F1 of bench (a)'s rows (`{result['quality_json']}`) where `{result['at']}`'s tokens hold the "
                      f"answer and where they do not:\n\n" + common.md_table(
                          ["system"] + [f"{s} split, {kind} (n = {next(v[s][kind]['n'] for v in by.values() if s in v)})"
                                        for s in splits for kind in ("held", "not held")],
                          [[label] + [f"{v[s][kind]['F1']:.1f}" if s in v and v[s][kind]["F1"] is not None else "-"
                                      for s in splits for kind in ("held", "not held")] for label, v in by.items()]))
    return common.section(
        "(m) Is the answer in the soft tokens at all? (extractive writers)", result,
        f"bench (a)'s `{p['splits']}` held-out questions, {p['llm']}'s tokenizer; {described}. A question counts when "
        f"one of its answers, SQuAD-normalised, is a phrase of the text a writer keeps of a gold passage (the "
        f"`keywords` writer's words in text order; the `sentences` writer's sentences cut to m tokens); intervals "
        f"are 95% bootstrap over questions.",
        table,
        "Where the answer is not among a passage's m sentence tokens, a reader of them has to guess it: for "
        "`sentences` this bounds what the soft tokens can give at each m. `keywords` keeps each content word "
        "once and no stop words, so an answer like \"University of Chicago\" is never a phrase of its tokens "
        "(counted in any order, as (a)'s notes do, more answers are held: 44% at m = 32, 70% at m = 64). A "
        "text-RAG reader sees the whole passage (bench (b) times it against pqa's m per document).",
        *blocks,
    )


def add_arguments(parser) -> None:
    parser.add_argument("--quality-json", default=None, help="bench (a)'s result to split by coverage "
                                                             "(default bench/results/quality.json)")
    parser.add_argument("--at", default=None, help="WRITER:M whose tokens split (a)'s F1 (default: the profile's, "
                                                    "sentences:64)")


def run_kwargs(args, out) -> dict:
    return {"quality_json": args.quality_json, **({"at": args.at} if args.at else {})}


def main(argv=None) -> int:
    return common.script_main(sys.modules[__name__], argv, add_arguments, run_kwargs)


if __name__ == "__main__":
    sys.exit(main())
