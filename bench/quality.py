"""(a) Answer quality: pqa against its controls, every system's reader trained the same way, with intervals.

Data (read in place from ``../shared/data/squad_v1.1``, never copied into the repository):

- **question split**: the first ``passages_per_article`` passages of the first ``articles`` articles; each
  passage's questions are split into training questions and held-out questions (``split_examples(...,
  "question")``): unseen questions about written passages.
- **article split**: the first ``new_passages_per_article`` passages of the next ``new_articles`` articles,
  all their questions held out. They are added to the corpus *after* every reader was trained: pqa writes
  only the new documents' z (``write.documents=new``, reader, projection and LoRA frozen), the controls'
  trained readers read the new passages as text. Adding documents without retraining.

Systems, same LLM, same k, same prompt, greedy decoding, the same training questions:

- ``pqa`` variants (``pqa_variants``: label -> config overrides): write then read phase, as ``pqa run
  pipeline`` runs them; in the article split their reader is reused and only the new documents are written;
- each control in ``controls`` with its own reader: ``control_read`` (a LoRA trained on the control's own
  input, with the read phase's epochs, batch size and learning rate), then scored;
- each control in ``floors`` with the plain LLM (no training): the floor.

Every metric has its 95% bootstrap interval; pqa's differences from closed-book and from the best text RAG
are paired tests on the same questions. The PNG plots F1 on the article split against the new documents'
write steps for each pqa variant, the controls as horizontal lines.

In parts: every row is measured on its own (a fresh copy of the LLM, everything seeded), so the table can
be measured a few rows at a time, on several cores or machines, and combined::

    python bench/quality.py --full --rows pqa "pqa, no write phase" --out part1
    python bench/quality.py --full --rows "closed_book (trained reader)" ... --out part2
    python bench/quality.py --full --combine part1/quality.json part2/quality.json

``--variant LABEL JSON`` adds a pqa variant (config overrides) to the profile's, e.g. an ablation row to
measure with ``--rows`` and combine into the stored table without rerunning the controls. Each row keeps
the command that measured it.

With pretraining (``python bench/pretrain.py --readers pqa closed_book text`` first, issue 17)::

    python bench/quality.py --full --pretrained outputs/pretrain \
        --variant "pqa, pretrained encoder" '{"model": {"pretrained": "outputs/pretrain/pqa"}, "writer": {"name": "encoder"}, "write": {"epochs": 0}}' \
        --variant "pqa, pretrained encoder + write phase" '{"model": {"pretrained": "outputs/pretrain/pqa"}, "writer": {"name": "encoder"}}'

``--pretrained DIR`` starts every control's trained reader from ``DIR/closed_book`` or ``DIR/text``; a variant
with ``write.epochs=0`` writes the article split's new documents with the encoder alone, no write steps.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402

NAME = "quality"
SQUAD_DIR = common.SQUAD_DIR
TEXT_RAG = ("bm25", "dense_minilm")
GOALS = {"oracle_f1": 50.0, "rag_ratio": 0.8, "p_value": 0.05, "above_closed_book": 15.0}
# pqa as `pqa run pipeline` runs it, and without its write phase (the read phase straight from the
# initial z: MiniLM keys and keyword soft tokens): what writing adds
DEFAULT_VARIANTS = {"pqa": {}, "pqa, no write phase": {"phases": ["read", "eval"]}}
PROFILES = {
    # tiny random LLM on the shipped sample: checks the script, measures nothing
    "smoke": dict(llm="tiny", data="sample", articles=0, passages_per_article=0, new_articles=0,
                  new_passages_per_article=0, eval_fraction=0.25, top_k=3, max_new_tokens=4,
                  controls=["closed_book", "oracle", "bm25"], floors=["closed_book"],
                  pqa_variants={"pqa": {"write": {"epochs": 1}}, "pqa, no write phase": {"phases": ["read", "eval"]}},
                  new_write_epochs=2, overrides={"model": {"num_memory_tokens": 2, "lora": {"r": 4}},
                                                 "read": {"epochs": 1}}),
    "quick": dict(llm="smollm2-135m", data="squad", articles=8, passages_per_article=4, new_articles=2,
                  new_passages_per_article=4, eval_fraction=0.45, top_k=3, max_new_tokens=24,
                  controls=["closed_book", "oracle", "dense_minilm"], floors=["closed_book"],
                  pqa_variants=DEFAULT_VARIANTS, new_write_epochs=3, overrides={}),
    # 100 passages, 324 training / 404 held-out questions, 102 on new articles: about two hours on 2 cores
    # (reader training of text RAG dominates); the plain-LLM floor is closed-book alone
    "full": dict(llm="smollm2-135m", data="squad", articles=20, passages_per_article=5, new_articles=4,
                 new_passages_per_article=5, eval_fraction=0.5, top_k=3, max_new_tokens=24,
                 controls=["closed_book", "oracle", "dense_minilm"], floors=["closed_book"],
                 pqa_variants=DEFAULT_VARIANTS, new_write_epochs=4, overrides={}),
}


# --------------------------------------------------------------------------- data
def _write_jsonl(path: Path, rows) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return str(path)


def _doc(d):
    return {"doc_id": d.doc_id, "title": d.title, "text": d.text}


def _question(q):
    return {"id": q.id, "question": q.question, "answers": q.answers, "gold_doc_ids": q.gold_doc_ids}


def _first_passages(corpus, titles, per_article):
    return [d for t in titles for d in [d for d in corpus if d.title == t][:per_article]]


def build_splits(params: dict, out_dir: Path, squad_dir: Path = SQUAD_DIR):
    """Files of both splits in ``out_dir``: ``corpus``, ``qa`` (training), ``eval_qa`` (held-out) of the
    question split; ``grown_corpus`` (its passages + the new ones) and ``new_eval_qa`` of the article split."""
    from pqa_core.data.loading import load_corpus, load_qa, sample_data_path, split_examples

    if params["data"] == "sample":  # the sample's passages are one-article each: the last 8 play the new articles
        corpus = load_corpus(sample_data_path("corpus.jsonl"))
        questions = load_qa(sample_data_path("qa_train.jsonl"), corpus) + load_qa(sample_data_path("qa_eval.jsonl"),
                                                                                   corpus)
        old, new = corpus[:28], corpus[28:]
    else:
        if not (squad_dir / "corpus.jsonl").exists():
            raise FileNotFoundError(f"SQuAD v1.1 data not found in {squad_dir} (corpus.jsonl, qa.jsonl)")
        corpus = load_corpus(squad_dir / "corpus.jsonl")
        questions = load_qa(squad_dir / "qa.jsonl", corpus)
        titles = list(dict.fromkeys(d.title for d in corpus))
        a, b = params["articles"], params["new_articles"]
        old = _first_passages(corpus, titles[:a], params["passages_per_article"])
        new = _first_passages(corpus, titles[a:a + b], params["new_passages_per_article"])
    old_ids, new_ids = {d.doc_id for d in old}, {d.doc_id for d in new}
    train, held_out = split_examples([q for q in questions if set(q.gold_doc_ids) <= old_ids], "question",
                                     eval_fraction=params["eval_fraction"], seed=0)
    new_questions = [q for q in questions if set(q.gold_doc_ids) <= new_ids]
    paths = {"corpus": _write_jsonl(out_dir / "corpus.jsonl", map(_doc, old)),
             "qa": _write_jsonl(out_dir / "train.jsonl", map(_question, train)),
             "eval_qa": _write_jsonl(out_dir / "eval.jsonl", map(_question, held_out)),
             "grown_corpus": _write_jsonl(out_dir / "grown_corpus.jsonl", map(_doc, old + new)),
             "new_eval_qa": _write_jsonl(out_dir / "new_eval.jsonl", map(_question, new_questions))}
    about = {"articles": sorted({d.title for d in old}, key=[d.title for d in old].index),
             "new_articles": sorted({d.title for d in new}, key=[d.title for d in new].index),
             "passages": len(old), "new_passages": len(new), "train_questions": len(train),
             "eval_questions": len(held_out), "new_eval_questions": len(new_questions)}
    return paths, about


# --------------------------------------------------------------------------- systems
def _merged(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = _merged(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def run_config(params: dict, data: dict, output_dir: Path, *overrides: dict):
    from pqa_core.config import PQAConfig

    values = {"seed": 0, "output_dir": str(output_dir), "model": {"llm": params["llm"], "device": "cpu"},
              "data": {"corpus": data["corpus"], "qa": data["qa"], "eval_qa": data["eval_qa"]},
              "read": {"top_k": params["top_k"], "eval_every": 0},
              "eval": {"max_new_tokens": params["max_new_tokens"]}}
    for extra in (params.get("overrides") or {},) + overrides:
        values = _merged(values, extra)
    return PQAConfig.from_dict(values)


def _scored(metrics: dict, predictions: Path, seconds: float, **extra) -> dict:
    from pqa_core.evaluation.stats import read_predictions

    records = read_predictions(predictions)
    return {"metrics": metrics, "seconds": seconds, "per_question": {
        qid: {k: r[k] for k in ("em", "f1", "substring")} for qid, r in records.items()}, **extra}


def control_label(name: str, trained: bool, pretrained: bool = False) -> str:
    """A control's row label: with its own trained reader (pretrained first, with ``--pretrained``), or the
    plain LLM (the floor)."""
    if not trained:
        return f"{name} (plain LLM)"
    return f"{name} (pretrained reader)" if pretrained else f"{name} (trained reader)"


def trained_control(rows: dict, name: str):
    """The row of control ``name`` with a trained reader, the pretrained one first."""
    for label in (control_label(name, True, True), control_label(name, True)):
        if label in rows:
            return label
    return None


def control_row(params, data, tmp: Path, name: str, trained: bool, llm):
    """A control scored on both splits: with its own trained reader, or with the plain LLM."""
    from pqa_core.training.controls import build_control, evaluate_control
    from pqa_core.pipeline import Pipeline
    from pqa_core.training.loop import RecordingLogger

    label = control_label(name, trained, bool(params.get("pretrained")))
    folder = tmp / label.replace(" ", "_").replace("(", "").replace(")", "")
    pretrained = pretrained_reader(params, "closed_book" if name == "closed_book" else "text") if trained else {}
    # a reader of k passages keeps the activations of ~500-token prompts: recomputing them in the backward pass
    # trains the same weights in a third more time and keeps a part of this table within 8 GB
    recompute = {"model": {"gradient_checkpointing": trained and name != "closed_book"}}
    config = run_config(params, data, folder, {"control": {"name": name},
                                               "phases": ["control_read", "control"] if trained else ["control"]},
                        pretrained, recompute)
    logger = RecordingLogger()
    start = time.perf_counter()
    pipeline = Pipeline(config, logger, llm_and_tokenizer=llm())
    metrics = pipeline.run()
    row = _scored(metrics, folder / "predictions.jsonl", time.perf_counter() - start,
                  reader_losses=[v for _, v in logger.scalars.get("control_read.epoch_loss", [])])
    # the article split: the same reader, the corpus grown by the new passages
    from pqa_core.data.loading import load_corpus, load_qa

    grown = load_corpus(data["grown_corpus"])
    control = build_control(config.control, grown, pipeline.tokenizer)
    new_questions = load_qa(data["new_eval_qa"], grown)
    start = time.perf_counter()
    path = folder / "new_predictions.jsonl"
    new_metrics = evaluate_control(pipeline.model, control, new_questions, top_k=params["top_k"],
                                   batch_size=config.eval.batch_size, max_new_tokens=config.eval.max_new_tokens,
                                   prompt=config.data.prompt, predictions_path=str(path))
    row["new"] = _scored(new_metrics, path, time.perf_counter() - start)
    return label, row


def pretrained_reader(params: dict, reader: str) -> dict:
    """The overrides that start a trained reader from ``--pretrained DIR``'s artifact for ``reader`` (``DIR/<reader>``,
    or a ``pqa run pretrain`` folder there), when one was given and exists: every reader of the table is then
    pretrained on the same questions with the same steps (``bench/pretrain.py``)."""
    folder = params.get("pretrained")
    if not folder:
        return {}
    path = Path(folder) / reader
    path = path / "pretrained" if (path / "pretrained" / "MANIFEST.json").exists() else path
    if not (path / "MANIFEST.json").exists():
        raise FileNotFoundError(f"--pretrained {folder}: no {reader} artifact in {path} (python bench/pretrain.py "
                                f"--readers {reader})")
    return {"model": {"pretrained": str(path)}}


def pqa_row(params, data, tmp: Path, label: str, overrides: dict, llm):
    """A pqa variant: write + read on the question split, then the new documents written with its reader."""
    from pqa_core.pipeline import Pipeline
    from pqa_core.training.loop import RecordingLogger

    folder = tmp / label.replace(" ", "_")
    config = run_config(params, data, folder, {"phases": ["write", "read", "eval"]}, overrides)
    logger = RecordingLogger()
    start = time.perf_counter()
    pipeline = Pipeline(config, logger, llm_and_tokenizer=llm())
    metrics = pipeline.run()
    k = params["top_k"]
    row = _scored(metrics, folder / "predictions.jsonl", time.perf_counter() - start, overrides=overrides,
                  training={"recall_before_write": logger.info.get(f"Recall@{k}_before_write"),
                            "recall_after_write": logger.info.get(f"Recall@{k}_after_write"),
                            "write_loss_per_epoch": [v for _, v in logger.scalars.get("write.epoch_loss", [])],
                            "greedy_token_acc": [v for _, v in logger.scalars.get("write.greedy_token_acc", [])],
                            "timings_s": dict(pipeline.timings), "documents": logger.info.get("documents")})
    # the article split: the trained run's reader and documents, the new documents' z written
    new_folder = folder.with_name(folder.name + "_new")
    # a variant without per-document writing (write.epochs=0: the encoder's z as it is) writes none here either
    epochs = params["new_write_epochs"] if overrides.get("write", {}).get("epochs", 1) else 0
    new_config = run_config(params, data, new_folder, overrides, {
        "phases": ["write", "eval"], "init_from": str(folder),
        "data": {"corpus": data["grown_corpus"], "eval_qa": data["new_eval_qa"]},
        "write": {"epochs": epochs, "documents": "new", "train_projection": False, "train_lora": False,
                  "eval_qa_every": 1, "eval_docs": 0}})
    new_logger = RecordingLogger()
    start = time.perf_counter()
    new_pipeline = Pipeline(new_config, new_logger, llm_and_tokenizer=llm())
    before = new_pipeline.evaluate_eval_questions()
    new_metrics = new_pipeline.run()
    steps_per_epoch = -(-len(new_pipeline.new_rows) // new_config.write.batch_size)
    curve = [{"write_steps": 0, "F1": before["F1"], "F1_ci95_low": before["F1_ci95_low"],
              "F1_ci95_high": before["F1_ci95_high"]}]
    series = {name: dict(new_logger.scalars.get(f"write.eval_{name}", [])) for name in
              ("F1", "F1_ci95_low", "F1_ci95_high")}
    for step in sorted(series["F1"]):
        curve.append({"write_steps": step, **{name: series[name][step] for name in series}})
    row["new"] = _scored(new_metrics, new_folder / "predictions.jsonl", time.perf_counter() - start,
                         curve=curve, steps_per_epoch=steps_per_epoch, new_documents=len(new_pipeline.new_rows))
    return label, row


# --------------------------------------------------------------------------- comparisons and goals
def on_split(row: dict, split: str) -> dict:
    """A row's scores on ``split``: the question split's (the row itself) or the article split's (``new``)."""
    return row if split == "question" else row["new"]


def split_f1(rows: dict, split: str):
    """The F1 of a row (by label) on ``split``."""
    return lambda label: on_split(rows[label], split)["metrics"]["F1"]


def paired(rows: dict, a: str, b: str, split: str = "question") -> dict:
    from pqa_core.evaluation.stats import compare_records

    pick = lambda label: on_split(rows[label], split)["per_question"]  # noqa: E731
    out = {c.metric: c.to_dict() for c in compare_records(pick(a), pick(b), names=(a, b))}
    return out


def rag_ratio_interval(rows: dict, a: str, b: str, split: str = "question"):
    """The 95% paired-bootstrap interval of F1(a) / F1(b) over the questions both answered (without
    per-question records, or where b scores zero: None, None)."""
    from pqa_core.evaluation.stats import ratio_interval

    first, second = (on_split(rows[label], split).get("per_question") or {} for label in (a, b))
    ids = sorted(set(first) & set(second))
    if not ids:
        return None, None
    _, low, high = ratio_interval([first[i]["f1"] for i in ids], [second[i]["f1"] for i in ids])
    return (low, high) if low == low else (None, None)


def comparisons(rows: dict, variants) -> dict:
    """Paired tests: each pair of pqa variants (what an ablation changes), then each pqa variant against
    closed-book (its pretrained reader where measured) and the best text RAG; both splits."""
    out = {}
    for i, first in enumerate(variants):
        for variant in variants[i + 1:]:
            for split in ("question", "article"):
                out[f"{first} vs {variant} [{split} split]"] = paired(rows, first, variant, split)
    closed = trained_control(rows, "closed_book")
    rag = best_text_rag(rows)
    for variant in variants:
        for other in (closed, rag):
            if other is None:
                continue
            for split in ("question", "article"):
                out[f"{variant} vs {other} [{split} split]"] = paired(rows, variant, other, split)
    return out


def best_text_rag(rows: dict, split: str = "question"):
    candidates = [n for n in rows if n.split(" ")[0] in TEXT_RAG and "plain LLM" not in n]
    return max(candidates, key=split_f1(rows, split)) if candidates else None


def best_pqa(rows: dict, variants, split: str = "question"):
    """The pqa variant with the highest F1 on ``split`` (the goals are read on pqa's best variant)."""
    measured = [v for v in variants if v in rows]
    return max(measured, key=split_f1(rows, split)) if measured else None


def goals_of(rows: dict, compared: dict, variants) -> dict:
    """The goals, read on the best pqa variant of each split: the oracle reads (F1 >= 50); pqa beats
    closed-book by >= 15 F1 with p < 0.05; pqa reaches 0.8 of the best text RAG's F1."""
    closed, oracle = trained_control(rows, "closed_book"), trained_control(rows, "oracle")
    goals = {}
    if oracle:
        value = rows[oracle]["metrics"]["F1"]
        goals["oracle"] = {"metric": "oracle reader F1 (held-out questions)", "target": f">= {GOALS['oracle_f1']:.0f}",
                           "value": value, "met": value >= GOALS["oracle_f1"]}
    for split in ("question", "article"):
        pqa, rag = best_pqa(rows, variants, split), best_text_rag(rows, split)
        if pqa is None:
            continue
        suffix = "" if split == "question" else f"_{split}"
        f1 = split_f1(rows, split)
        test = compared.get(f"{pqa} vs {closed} [{split} split]", {}).get("F1") if closed else None
        if test:
            goals["above_closed_book" + suffix] = {
                "metric": f"{pqa} F1 - {closed} F1, {split} split (paired p = {test['p_value']:.2g})",
                "target": f">= +{GOALS['above_closed_book']:.0f} F1, p < 0.05", "value": 100 * test["difference"],
                "p_value": test["p_value"],
                "met": 100 * test["difference"] >= GOALS["above_closed_book"] and test["p_value"] < GOALS["p_value"]}
        if rag:
            value = f1(pqa) / f1(rag) if f1(rag) else None
            low, high = rag_ratio_interval(rows, pqa, rag, split)
            interval = f", 95% paired-bootstrap interval [{low:.2f}, {high:.2f}]" if low is not None else ""
            goals["rag_ratio" + suffix] = {
                "metric": f"{pqa} F1 / best text-RAG F1 ({rag}), {split} split{interval}",
                "target": f">= {GOALS['rag_ratio']}", "value": value, "low": low, "high": high,
                "met": value is not None and value >= GOALS["rag_ratio"]}
    return goals


# --------------------------------------------------------------------------- run
def row_labels(params: dict, every_reader: bool = False) -> list:
    """Every row a profile measures, in table order: the pqa variants, the trained controls, the floors."""
    pretrained = [True, False] if every_reader else [bool(params.get("pretrained"))]
    return (list(params["pqa_variants"]) + [control_label(n, True, p) for n in params["controls"] for p in pretrained]
            + [control_label(n, False) for n in params["floors"]])


@common.isolated
def run(profile: str = "full", command: str | None = None, threads: int | None = common.DEFAULT_THREADS,
        out_dir: str | None = None, rows: list | None = None, variants: dict | None = None,
        combine: list | None = None, renames: dict | None = None, **overrides) -> dict:
    """Measure the profile's rows (or only ``rows``, labels as the table prints them), with ``variants``
    (label -> config overrides) added to its pqa variants; ``combine``: measure nothing, join the rows of
    these result files (:func:`combine_results`, relabelling pqa variants by ``renames``)."""
    from pqa_core.modeling.llm import load_llm

    if combine:
        return combine_results([json.loads(Path(p).read_text(encoding="utf-8")) for p in combine], out_dir, command,
                               renames)
    if variants:
        overrides["pqa_variants"] = {**PROFILES[profile]["pqa_variants"], **variants}
    bench = common.Bench(NAME, profile, PROFILES, overrides, threads, command)
    params = bench.params
    known = row_labels(params)
    wanted = list(rows) if rows else known
    unknown = [label for label in wanted if label not in known]
    if unknown:
        raise ValueError(f"unknown row(s) {', '.join(map(repr, unknown))}; this profile's rows: "
                         f"{', '.join(map(repr, known))} (add a pqa variant with --variant LABEL JSON)")
    loaded = {}

    def llm():  # one load, a fresh copy of the weights per system (each trains its own LoRA)
        import copy

        if "pair" not in loaded:
            loaded["pair"] = load_llm(params["llm"])
        model, tokenizer = loaded["pair"]
        return copy.deepcopy(model), tokenizer

    measured = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data, about = build_splits(params, tmp / "data")
        for label, variant in params["pqa_variants"].items():
            if label in wanted:
                measured[label] = with_peak_memory(lambda: pqa_row(params, data, tmp, label, variant, llm)[1])
        for name, trained in [(n, True) for n in params["controls"]] + [(n, False) for n in params["floors"]]:
            label = control_label(name, trained, bool(params.get("pretrained")))
            if label in wanted:
                measured[label] = with_peak_memory(lambda: control_row(params, data, tmp, name, trained, llm)[1])
    for row in measured.values():
        row["command"] = bench.command
    result = bench.finish({"data": about, "rows": measured, **judged(measured, params)})
    if out_dir:
        plot(result, Path(out_dir) / "quality_write_curve.png")
    return result


def with_peak_memory(measure) -> dict:
    """A row, with the peak resident memory of this process while it was measured (``peak_gib``; the LLM's
    one shared copy included): what a part of the table needs, so parts can share the machine."""
    reset = common.reset_peak_memory()
    row = measure()
    row["peak_gib"] = common.memory_gib()["peak_gib"] if reset else None
    return row


def judged(rows: dict, params: dict) -> dict:
    """The paired comparisons and the goals of the rows at hand (a part may lack closed-book or text RAG)."""
    variants = [label for label in params["pqa_variants"] if label in rows]
    compared = comparisons(rows, variants)
    return {"comparisons": compared, "goals": goals_of(rows, compared, variants)}


def renamed(result: dict, renames: dict) -> dict:
    """``result`` with its pqa variants' rows relabelled (old label -> new): a variant that named a shipped
    artifact (``shipped:<llm>/pqa``) keeps its measured answers under a label saying which artifact that was
    once another is shipped. Only pqa variants: a control's label is what pairs it with pqa."""
    variants = result["params"]["pqa_variants"]
    label = lambda name: renames.get(name, name)  # noqa: E731
    return {**result, "rows": {label(name): row for name, row in result["rows"].items()},
            "params": {**result["params"], "pqa_variants": {label(n): v for n, v in variants.items()}}}


def check_renames(results: list, renames: dict) -> None:
    """Refuse a relabelling that would merge or mislabel rows: an old label no part has as a row, a
    control's, or one more than one part has (which part's row was meant?), two old labels given one new
    one, a new label some part already uses, or one starting with a control's name (that is how controls
    and text RAG are found)."""
    used = {label for r in results for label in (*r["rows"], *r["params"]["pqa_variants"])} - set(renames)
    controls = {name for r in results for name in (*r["params"]["controls"], *r["params"]["floors"])} | set(TEXT_RAG)
    if len(set(renames.values())) < len(renames):
        raise ValueError("--rename: two labels renamed to one (their rows would merge)")
    for old, new in renames.items():
        parts = [i for i, r in enumerate(results) if old in r["rows"]]
        if not parts:
            raise ValueError(f"--rename: no part has a row {old!r}")
        if any(old not in results[i]["params"]["pqa_variants"] for i in parts):
            raise ValueError(f"--rename {old!r}: only a pqa variant's row can be renamed (a control's label pairs it)")
        if len(parts) > 1:
            raise ValueError(f"--rename {old!r}: parts {', '.join(str(i + 1) for i in parts)} all have "
                             "this row; rename it in one part only (measure the other under another label)")
        if new in used:
            raise ValueError(f"--rename {old!r} {new!r}: a part already has the label {new!r}")
        if new.split(" ")[0] in controls:
            raise ValueError(f"--rename {old!r} {new!r}: a pqa variant's label cannot start with a control's name")


def combine_results(results: list, out_dir: str | None = None, command: str | None = None,
                    renames: dict | None = None) -> dict:
    """One table from results measured in parts: the same benchmark, profile, parameters (bar the pqa
    variants, which are joined) and data. A row in several parts is taken from the last (a row measured
    again after a change replaces the old one; said on stderr). Comparisons and goals are recomputed.
    ``renames`` (old label -> new) relabels pqa variants first (:func:`renamed`)."""
    if not results:
        raise ValueError("--combine needs at least one result file")
    if renames:
        check_renames(results, renames)
        results = [renamed(result, renames) for result in results]
    first = results[0]
    # the pqa variants are joined; a part's --pretrained is its rows' own (their labels and commands say it)
    rest_of = lambda r: {k: v for k, v in r["params"].items() if k not in ("pqa_variants", "pretrained")}  # noqa: E731
    base = rest_of(first)
    variants = {}
    for index, result in enumerate(results):
        for field in ("name", "profile", "data"):
            if result.get(field) != first.get(field):
                raise ValueError(f"result {index + 1} differs from result 1 in {field!r}: not parts of one table")
        params = rest_of(result)
        if params != base:
            raise ValueError(f"result {index + 1} was measured with other parameters than result 1: "
                             f"{sorted(k for k in base if base[k] != params.get(k))}")
        for label, overrides in result["params"]["pqa_variants"].items():
            if label in variants and variants[label] != overrides:
                raise ValueError(f"pqa variant {label!r} has other overrides in result {index + 1}")
            variants[label] = overrides
    params = {**first["params"], "pqa_variants": variants}
    joined = {}
    for index, result in enumerate(results):
        for label, row in result["rows"].items():
            if label in joined:
                same = joined[label]["per_question"] == row["per_question"]
                print(f"[quality] row {label!r}: result {index + 1} replaces an earlier part's "
                      f"({'the same answers' if same else 'other answers'})", file=sys.stderr)
            joined[label] = row
    order = row_labels(params, every_reader=True)
    rows = {label: joined[label] for label in order if label in joined}
    combined = {**{k: first[k] for k in ("name", "profile", "machine")},
                "command": command or " + ".join(dict.fromkeys(r["command"] for r in results)),
                "params": params, "data": first["data"], "rows": rows, **judged(rows, params),
                "wall_s": sum(r["wall_s"] for r in results), "loadavg_at_end": results[-1].get("loadavg_at_end"),
                "combined_from": len(results), **({"renames": dict(renames)} if renames else {})}
    if out_dir:
        plot(combined, Path(out_dir) / "quality_write_curve.png")
    return combined


def plot(result: dict, path: Path):
    """F1 on the article split against the new documents' write steps; controls as horizontal lines."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label in [v for v in result["params"]["pqa_variants"] if v in result["rows"]]:
        curve = result["rows"][label]["new"]["curve"]
        steps = [c["write_steps"] for c in curve]
        ax.plot(steps, [c["F1"] for c in curve], marker="o", label=label)
        ax.fill_between(steps, [c["F1_ci95_low"] for c in curve], [c["F1_ci95_high"] for c in curve], alpha=0.15)
    styles = iter(["--", ":", "-.", (0, (5, 1)), (0, (1, 3))])
    for name, row in result["rows"].items():
        if name in result["params"]["pqa_variants"]:
            continue
        ax.axhline(row["new"]["metrics"]["F1"], linestyle=next(styles, "--"), color="grey", linewidth=1)
        ax.text(0, row["new"]["metrics"]["F1"], f" {name}", fontsize=7, va="bottom", color="dimgrey")
    ax.set_xlabel("write steps on the new documents (reader frozen)")
    ax.set_ylabel("F1 on the new articles' questions")
    ax.set_title("(a) article split: documents added after training")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- markdown
def _cell(metrics: dict, name: str) -> str:
    return f"{metrics[name]:.1f} [{metrics[f'{name}_ci95_low']:.1f}, {metrics[f'{name}_ci95_high']:.1f}]"


def soft_prompt_tokens(row: dict, rows: dict, k: int, profile_overrides: dict | None = None):
    """A pqa row's prompt tokens per question: k x m soft tokens (m: the row's, else the profile's, else the
    default) plus the question as a closed-book reader reads it (the same prompt around it); None without a
    closed-book row to take the question's length from."""
    from pqa_core.config import PQAConfig

    question = next((r["metrics"].get("prompt_tokens_per_question") for label, r in rows.items()
                     if label.startswith("closed_book") and r["metrics"].get("prompt_tokens_per_question")), None)
    if question is None:
        return None
    sections = {name: {**(profile_overrides or {}).get(name, {}), **(row.get("overrides") or {}).get(name, {})}
                for name in ("model", "read", "eval")}
    config = PQAConfig.from_dict({**sections, "read": {"top_k": k, **sections["read"]}})
    return config.eval_top_k * config.model.num_memory_tokens + question


def markdown(result: dict) -> str:
    p, d, rows, k = result["params"], result["data"], result["rows"], result["params"]["top_k"]
    headers = ["system", "EM", "F1 [95% CI]", "substring", f"Recall@{k}", "prompt tokens/q", "minutes", "peak GiB",
               "article split: F1 [95% CI]", f"Recall@{k}"]
    table = []
    for name, row in rows.items():
        m, n = row["metrics"], row["new"]["metrics"]
        tokens = m.get("prompt_tokens_per_question")
        if tokens is None and name in p["pqa_variants"]:
            tokens = soft_prompt_tokens(row, rows, k, p.get("overrides"))
        table.append([f"**{name}**" if name in p["pqa_variants"] else name, f"{m['EM']:.1f}", _cell(m, "F1"),
                      f"{m['substring']:.1f}", f"{m[f'Recall@{k}']:.0f}", "" if tokens is None else f"{tokens:.0f}",
                      f"{(row['seconds'] + row['new']['seconds']) / 60:.1f}",
                      "" if row.get("peak_gib") is None else f"{row['peak_gib']:.1f}", _cell(n, "F1"),
                      f"{n[f'Recall@{k}']:.0f}"])
    tests = []
    for label, by_metric in result["comparisons"].items():
        f1 = by_metric["F1"]
        tests.append([label, f"{100 * f1['difference']:+.1f} [{100 * f1['low']:+.1f}, {100 * f1['high']:+.1f}]",
                      f"{f1['p_value']:.3g}", "**yes**" if f1["significant"] else "no"])
    commands = {}
    for name, row in rows.items():
        commands.setdefault(row.get("command") or result["command"], []).append(name)
    provenance = [] if len(commands) < 2 else ["Measured in parts (`--rows`, then `--combine`):", ""] + [
        f"- `{command}`: {', '.join(names)}" for command, names in commands.items()]
    renames = result.get("renames") or {}
    if renames and not provenance:
        provenance = ["Relabelled when combined (`--rename`):", ""]
    provenance += [f"- relabelled when combined (`--rename`): `{before}` is now `{after}`"
                   for before, after in renames.items()]
    goal_lines = []
    for g in result["goals"].values():
        value = "n/a" if g["value"] is None else f"{g['value']:.3g}"
        extra = f" (difference {g['difference']:+.1f} F1)" if "difference" in g else ""  # a goal stored with its p as value
        goal_lines.append(f"- {g['metric']}: **{value}**{extra}, goal {g['target']}: **{common.verdict(g['met'])}**")
    training = []
    for label in [v for v in p["pqa_variants"] if v in rows]:
        t = rows[label]["training"]
        acc = t["greedy_token_acc"][-1] if t["greedy_token_acc"] else None
        losses = ", ".join(f"{v:.2f}" for v in t["write_loss_per_epoch"])
        before, after = t["recall_before_write"], t["recall_after_write"]
        recall = (f"Recall@{k} {before:.0f} before the write phase, {after:.0f} after" if before is not None
                  and after is not None else "no write phase")
        training.append(f"- `{label}` (`{json.dumps(rows[label]['overrides'])}`): write loss per epoch "
                        f"{losses or 'n/a'}; greedy reconstruction {'n/a' if acc is None else f'{100 * acc:.0f}%'}; "
                        f"{recall}; phases {', '.join(f'{ph} {s / 60:.1f} min' for ph, s in t['timings_s'].items())}.")
    return common.section("(a) Answer quality: pqa vs controls, readers trained alike, with intervals", result, "\n".join([
        f"Data: **question split** {d['passages']} passages of {len(d['articles'])} articles of SQuAD v1.1 dev (the "
        f"first {p['passages_per_article']} of each), their questions split per passage: {d['train_questions']} "
        f"training questions, **{d['eval_questions']} held-out questions scored**. **Article split**: "
        f"{d['new_passages']} passages of {len(d['new_articles'])} further articles added after training, "
        f"**{d['new_eval_questions']} questions**; pqa writes only the new documents' z ({p['new_write_epochs']} "
        f"epochs, reader frozen), the controls' readers read the new passages as text." if p["data"] != "sample" else
        f"Data: the shipped sample ({d['passages']} + {d['new_passages']} invented passages).",
        "",
        f"LLM `{p['llm']}`, k={k} for every system, greedy, at most {p['max_new_tokens']} new tokens. "
        f"\"trained reader\": a LoRA trained on the same {d['train_questions']} questions with the read phase's "
        f"settings, reading the system's own input (pqa: soft tokens; oracle: the gold passage; text RAG: the "
        f"top-{k} passages; closed book: nothing). \"pretrained reader\": the same, started from a reader "
        f"pretrained on questions of the SQuAD articles no benchmark uses (`bench/pretrain.py`; pqa variants name "
        f"their artifact, `model.pretrained`). \"plain LLM\": no training, the floor. Intervals: 95% bootstrap "
        f"over questions.",
        "",
        common.md_table(headers, table),
        "",
        *([*provenance, ""] if provenance else []),
        "Paired tests (F1, same questions; difference in points [95% CI], sign-flip permutation p-value):",
        "",
        common.md_table(["comparison", "F1 difference", "p", "p < 0.05"], tests),
        "",
        *goal_lines,
        *training,
        "",
        "![F1 against write steps on the article split](results/quality_write_curve.png)"
        if p["data"] != "sample" else "",
    ]))


def add_arguments(parser) -> None:
    parser.add_argument("--rows", nargs="+", metavar="LABEL", help="measure only these rows (labels as the table "
                                                                   "prints them)")
    parser.add_argument("--variant", nargs=2, action="append", metavar=("LABEL", "JSON"), default=[],
                        help="add a pqa variant: a label and its config overrides as JSON, e.g. "
                             "'pqa, rarest keywords' '{\"model\": {\"keyword_scoring\": \"idf\"}}'")
    parser.add_argument("--pretrained", metavar="DIR", default=None,
                        help="start every trained reader from DIR/<reader> (closed_book, text: bench/pretrain.py's "
                             "--out, or pqa_core/pretrained/<llm>); pqa variants name theirs with --variant")
    parser.add_argument("--combine", nargs="+", metavar="RESULT_JSON",
                        help="measure nothing: one table from results measured in parts (--rows)")
    parser.add_argument("--rename", nargs=2, action="append", metavar=("OLD", "NEW"), default=[],
                        help="with --combine: relabel a pqa variant's row (e.g. one that named the artifact shipped "
                             "then, after another is shipped); repeatable")


def run_kwargs(args, out) -> dict:
    variants = {}
    for label, text in args.variant:
        try:
            variants[label] = json.loads(text)
        except json.JSONDecodeError as error:
            raise SystemExit(f"--variant {label!r}: its overrides are not JSON: {error}")
        if not isinstance(variants[label], dict):
            raise SystemExit(f"--variant {label!r}: its overrides must be a JSON object, got {text!r}")
    if args.rows and not args.out:
        raise SystemExit("--rows measures part of the table: give --out (then --combine the parts)")
    extra = {"pretrained": str(Path(args.pretrained).resolve())} if args.pretrained else {}
    if args.rename:
        if not args.combine:
            raise SystemExit("--rename relabels rows of --combine's parts: give --combine")
        if len({old for old, _ in args.rename}) < len(args.rename):
            raise SystemExit("--rename: a label is renamed twice")
        extra["renames"] = dict(args.rename)
    return {"out_dir": str(out), "rows": args.rows, "variants": variants, "combine": args.combine, **extra}


def main(argv=None) -> int:
    return common.script_main(sys.modules[__name__], argv, add_arguments=add_arguments, run_kwargs=run_kwargs)


if __name__ == "__main__":
    sys.exit(main())
