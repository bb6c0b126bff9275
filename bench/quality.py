"""(a) Answer quality on a SQuAD subset: pqa against its controls, same LLM, same k, same questions.

The subset: the first ``passages_per_article`` passages of the first ``articles`` articles of the SQuAD
v1.1 dev data in ``../shared/data/squad_v1.1`` (read in place, never copied into the repository), their
questions split per passage into train and held-out questions (``split_examples(..., "question")``:
unseen questions about seen passages). pqa runs the ``pipeline`` phases on it with the default config
(MiniLM-initialised doc vectors, cosine selector, MiniLM query encoder, m=4 soft tokens, LoRA r=8),
shortened epochs: write on the subset's passages, read on the train questions, then every system
answers the held-out questions:

- ``pqa``: ``evaluate_qa(..., with_cost=True)``, the LLM with its read-phase LoRA;
- each control: ``evaluate_control`` (``pqa_core.controls``), the same LLM with LoRA switched off
  (plain SmolLM2), retrieving from the same subset passages.

Same prompt template, greedy decoding, ``max_new_tokens`` and metrics for all. Latency here is at the
evaluation batch size (16) on whatever this machine was doing; ``bench/latency.py`` measures it properly.
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
SQUAD_DIR = common.REPO_ROOT.parent / "shared" / "data" / "squad_v1.1"
CONTROLS = ("closed_book", "random_docs", "oracle", "bm25", "dense_minilm")
# pqa ablations scored in the same run, each trained like the default: label -> config overrides
VARIANTS = {"pqa hybrid": {"model": {"d_z": 0}, "projection": {"name": "hybrid"}}}
PROFILES = {
    # tiny random LLM on the shipped sample: checks the script, measures nothing
    "smoke": dict(llm="tiny", data="sample", articles=0, passages_per_article=0, write_epochs=2, read_epochs=1,
                  top_k=3, max_new_tokens=4, eval_fraction=0.25, lora_controls=["bm25"], pqa_variants=VARIANTS),
    "quick": dict(llm="smollm2-135m", data="squad", articles=2, passages_per_article=4, write_epochs=4,
                  read_epochs=1, top_k=3, max_new_tokens=24, eval_fraction=0.25, lora_controls=["bm25"]),
    # write 30 epochs as pqa's default: 90 updates per passage, the budget (f) shows hybrid needs to rebuild them
    "full": dict(llm="smollm2-135m", data="squad", articles=3, passages_per_article=8, write_epochs=30,
                 read_epochs=3, top_k=3, max_new_tokens=24, eval_fraction=0.25,
                 lora_controls=["closed_book", "oracle", "bm25", "dense_minilm"], pqa_variants=VARIANTS),
}


def squad_subset(out_dir: Path, articles: int, passages_per_article: int, eval_fraction: float, seed: int = 0,
                 squad_dir: Path = SQUAD_DIR):
    """Write ``corpus.jsonl``, ``train.jsonl``, ``eval.jsonl`` of the subset into ``out_dir``; returns their paths
    and a description. Passages keep their SQuAD doc ids; questions keep their ids."""
    from pqa_core.data import load_corpus, load_qa, split_examples

    if not (squad_dir / "corpus.jsonl").exists():
        raise FileNotFoundError(f"SQuAD v1.1 data not found in {squad_dir} (corpus.jsonl, qa.jsonl)")
    corpus = load_corpus(squad_dir / "corpus.jsonl")
    titles, picked = [], []
    for doc in corpus:
        if doc.title not in titles:
            if len(titles) == articles:
                continue
            titles.append(doc.title)
        if sum(d.title == doc.title for d in picked) < passages_per_article:
            picked.append(doc)
    keep = {d.doc_id for d in picked}
    questions = [q for q in load_qa(squad_dir / "qa.jsonl", corpus) if set(q.gold_doc_ids) <= keep]
    train, held_out = split_examples(questions, "question", eval_fraction=eval_fraction, seed=seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"corpus": out_dir / "corpus.jsonl", "qa": out_dir / "train.jsonl", "eval_qa": out_dir / "eval.jsonl"}
    with open(paths["corpus"], "w", encoding="utf-8") as handle:
        for d in picked:
            handle.write(json.dumps({"doc_id": d.doc_id, "title": d.title, "text": d.text}, ensure_ascii=False) + "\n")
    for key, items in (("qa", train), ("eval_qa", held_out)):
        with open(paths[key], "w", encoding="utf-8") as handle:
            for q in items:
                handle.write(json.dumps({"id": q.id, "question": q.question, "answers": q.answers,
                                         "gold_doc_ids": q.gold_doc_ids}, ensure_ascii=False) + "\n")
    about = {"articles": titles, "passages": len(picked), "train_questions": len(train),
             "eval_questions": len(held_out)}
    return {k: str(v) for k, v in paths.items()}, about


def data_paths(params: dict, tmp: Path):
    if params["data"] == "sample":
        about = {"articles": ["pqa sample (invented)"], "passages": 36, "train_questions": 108, "eval_questions": 36}
        return {"corpus": "sample:corpus.jsonl", "qa": "sample:qa_train.jsonl", "eval_qa": "sample:qa_eval.jsonl"}, about
    return squad_subset(tmp / "squad_subset", params["articles"], params["passages_per_article"],
                        params["eval_fraction"])


def pqa_config(params: dict, data: dict, output_dir: str, overrides: dict | None = None):
    from pqa_core.config import PQAConfig

    return PQAConfig.from_dict(_merged({
        "seed": 0, "output_dir": output_dir, "phases": ["write", "read"],
        "model": {"llm": params["llm"], "device": "cpu"},
        "data": data,
        "write": {"epochs": params["write_epochs"], "eval_every": params["write_epochs"], "eval_docs": 8},
        "read": {"epochs": params["read_epochs"], "top_k": params["top_k"], "eval_every": 0},
        "eval": {"max_new_tokens": params["max_new_tokens"]},
    }, overrides or {}))


def _merged(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = _merged(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def trained_pqa(params: dict, data: dict, output_dir: str, overrides: dict | None = None):
    """Run pqa's write and read phases on the subset; returns (pipeline, training facts)."""
    from pqa_core.pipeline import Pipeline
    from pqa_core.training import RecordingLogger

    config = pqa_config(params, data, output_dir, overrides)
    logger = RecordingLogger()
    t0 = time.perf_counter()
    pipeline = Pipeline(config, logger)
    pipeline.run()
    k = params["top_k"]
    write_acc = [v for _, v in logger.scalars.get("write.greedy_token_acc", [])]
    return pipeline, {"seconds": time.perf_counter() - t0, "overrides": overrides or {},
                      "write_greedy_token_acc_last": write_acc[-1] if write_acc else None,
                      "read_recall_per_epoch": [v for _, v in logger.scalars.get(f"read.eval_Recall@{k}", [])],
                      "recall_before_write": logger.info.get(f"Recall@{k}_before_read"),
                      "timings_s": dict(pipeline.timings)}


@common.isolated
def run(profile: str = "full", command: str | None = None, threads: int | None = common.DEFAULT_THREADS,
        **overrides) -> dict:
    from pqa_core.controls import build_control, evaluate_control
    from pqa_core.evaluation import evaluate_qa

    bench = common.Bench(NAME, profile, PROFILES, overrides, threads, command)
    params = bench.params
    with tempfile.TemporaryDirectory() as tmp:
        data, about = data_paths(params, Path(tmp))
        pipeline, training = trained_pqa(params, data, str(Path(tmp) / "run"))
        config = pipeline.config
        k, e = params["top_k"], config.eval
        rows = {}
        llm = pipeline.model.llm

        def scored(name, fn):
            path = Path(tmp) / f"{len(rows)}.jsonl"
            t0 = time.perf_counter()
            rows[name] = fn(str(path))
            rows[name]["seconds"] = time.perf_counter() - t0
            answers = [json.loads(line)["prediction"] for line in path.read_text(encoding="utf-8").splitlines()]
            lengths = pipeline.tokenizer(answers, add_special_tokens=False)["input_ids"] if answers else []
            rows[name]["answer_tokens_per_question"] = sum(map(len, lengths)) / max(len(answers), 1)

        scored("pqa", lambda path: evaluate_qa(pipeline.model, pipeline.eval_dataset, top_k=k,
                                               batch_size=e.batch_size, max_new_tokens=e.max_new_tokens,
                                               with_cost=True, predictions_path=path))
        # controls read with the plain LLM, then (text RAG only) with the LoRA pqa's read phase trained: that
        # LoRA learnt the answer format (short span, then EOS), which F1 and EM reward
        variants = [(name, False) for name in CONTROLS]
        if hasattr(llm, "disable_adapter"):
            variants += [(name, True) for name in params["lora_controls"]]
        for name, with_lora in variants:
            control = build_control({"name": name}, pipeline.corpus, pipeline.tokenizer)
            with (_nothing() if with_lora else llm.disable_adapter() if hasattr(llm, "disable_adapter")
                  else _nothing()):
                scored(f"{name} +LoRA" if with_lora else name,
                       lambda path: evaluate_control(pipeline.model, control, pipeline.eval_qa, top_k=k,
                                                     batch_size=e.batch_size, max_new_tokens=e.max_new_tokens,
                                                     prompt=config.data.prompt, predictions_path=path))
        variants_training = {}
        for label, overrides in (params.get("pqa_variants") or {}).items():
            pipeline, variants_training[label] = trained_pqa(params, data, str(Path(tmp) / label.replace(" ", "_")),
                                                             overrides)
            scored(label, lambda path: evaluate_qa(pipeline.model, pipeline.eval_dataset, top_k=k,
                                                   batch_size=e.batch_size, max_new_tokens=e.max_new_tokens,
                                                   with_cost=True, predictions_path=path))
    text_rags = [n for n in rows if n.split(" ")[0] in ("bm25", "dense_minilm")]
    goals = {}
    for metric in ("F1", "substring"):
        best = max(text_rags, key=lambda n: rows[n][metric])
        value = rows["pqa"][metric] / rows[best][metric] if rows[best][metric] else None
        goals[metric] = {"metric": f"pqa {metric} / best text-RAG {metric} ({best}), k={k}", "target": ">= 0.8",
                         "value": value, "met": value is not None and value >= 0.8}
    return bench.finish({
        "data": about, "rows": rows,
        "pqa_training": training, "pqa_variants_training": variants_training,
        "goals": goals,
    })


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def markdown(result: dict) -> str:
    p, d, t, goals = result["params"], result["data"], result["pqa_training"], result["goals"]
    k, rows = p["top_k"], result["rows"]
    table = common.md_table(
        ["system", "EM", "F1", "substring", f"Recall@{k}", "prompt tokens/q", "answer tokens/q",
         "latency ms/q (batch 16)"],
        [[f"**{name}**" if name == "pqa" else name, f"{r['EM']:.1f}", f"{r['F1']:.1f}", f"{r['substring']:.1f}",
          f"{r[f'Recall@{k}']:.1f}", f"{r['prompt_tokens_per_question']:.0f}",
          f"{r['answer_tokens_per_question']:.1f}", f"{r['latency_ms_per_question']:.0f}"]
         for name, r in result["rows"].items()])
    acc = t["write_greedy_token_acc_last"]
    recall = ", ".join(f"{v:.0f}" for v in t["read_recall_per_epoch"])
    before = t.get("recall_before_write")

    def verdict(g):
        value = "n/a" if g["value"] is None else f"{g['value']:.2f}"
        return f"{g['metric']}: **{value}** (goal >= 0.8: **{common.verdict(g['met'])}**)"

    return common.section("(a) Answer quality: pqa vs controls on a SQuAD subset", result, "\n".join([
        (f"Data: the shipped sample ({d['passages']} invented passages), " if p["data"] == "sample" else
         f"Data: {d['passages']} passages ({', '.join(d['articles'])}; the first {p['passages_per_article']} of each "
         f"article) of SQuAD v1.1 dev, their questions split per passage: ")
        + f"{d['train_questions']} train (read phase), "
        f"**{d['eval_questions']} held-out questions scored**. LLM `{p['llm']}`, k={k} for every system, greedy, at most "
        f"{p['max_new_tokens']} new tokens, prompt `Question: ...\\nAnswer:` (controls put `Context: <passages>\\n` "
        f"before it), retrieval over the same {d['passages']} passages. pqa: default config, write "
        f"{p['write_epochs']} epochs (greedy reconstruction token accuracy at the end: "
        f"{'n/a' if acc is None else f'{100 * acc:.1f}%'}), read {p['read_epochs']} epochs (Recall@{k} on the "
        f"held-out questions: {'n/a' if before is None else f'{before:.0f}'} before the write phase, {recall} after "
        f"each read epoch); training took {t['seconds'] / 60:.1f} min. Controls read with the plain LLM (pqa's LoRA "
        f"switched off); `+LoRA` rows read with the LoRA pqa's read phase trained, which learnt the answer format "
        f"(a short span, then EOS). \"answer tokens/q\" is the length of the decoded answers: the plain instruct "
        f"model answers in sentences, which EM and F1 punish and substring does not.",
        "",
        table,
        "",
        f"- {verdict(goals['F1'])}",
        f"- {verdict(goals['substring'])}",
    ] + [_variant_line(label, v, k) for label, v in (result.get("pqa_variants_training") or {}).items()] + ([
        f"- What pqa's documents add: pqa vs `closed_book +LoRA` (the same LoRA-trained LLM with no documents): "
        f"F1 {rows['pqa']['F1']:.1f} vs {rows['closed_book +LoRA']['F1']:.1f}, substring "
        f"{rows['pqa']['substring']:.1f} vs {rows['closed_book +LoRA']['substring']:.1f}.",
    ] if "closed_book +LoRA" in rows else []) + [
        "",
        "A CPU-sized budget (minutes of write phase on 64-token passage prefixes, a short read phase): pqa's documents "
        "hold only what the write phase put in them, so this is a floor for pqa, not its ceiling. Latency: see (b).",
    ]))


def _variant_line(label: str, training: dict, k: int) -> str:
    """One bullet on how a pqa ablation row was trained: its overrides, reconstruction, Recall per epoch."""
    from pqa_experiments.runs import flatten

    overrides = " ".join(f"{key}={value}" for key, value in flatten(training["overrides"]).items())
    acc = training["write_greedy_token_acc_last"]
    before = training.get("recall_before_write")
    return (f"- `{label}`: pqa `with {overrides}`, trained like the default: greedy reconstruction token accuracy "
            f"{'n/a' if acc is None else f'{100 * acc:.1f}%'}, Recall@{k} "
            f"{'n/a' if before is None else f'{before:.0f}'} before the write phase, "
            f"{', '.join(f'{v:.0f}' for v in training['read_recall_per_epoch'])} after each read epoch; "
            f"training took {training['seconds'] / 60:.1f} min.")


def main(argv=None) -> int:
    return common.script_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
