"""(b) Answer latency and prompt tokens per question: pqa (m soft tokens per document) vs text RAG (BM25), same k.

Both sides answer the same held-out questions of the (a) subset with the same LLM and decoding code
(``ParametricQA.generate_from``, greedy, KV cache), one at a time (batch 1: the latency a user waits
for) and in batches of 16 (a server's throughput):

- ``pqa``: ``evaluate_qa(..., with_cost=True)``: MiniLM query encoding, cosine top-k over the doc
  vectors, ``k*m`` soft tokens + the question;
- ``bm25``: ``evaluate_control`` with the ``bm25`` control: BM25 top-k, ``Context: <k passages>\\n``
  + the question as text;
- ``closed_book``: the question alone (the floor: what any reader pays).

Timing does not depend on training, but answer length does, so every answer is forced to exactly
``G`` new tokens (EOS is never taken as the end): ``G=1`` is the time to the first token (selection +
prefill), ``G=8`` a short answer (SQuAD gold answers average about 4 SmolLM2 tokens, plus EOS), ``G=24``
the evaluation's ``max_new_tokens``. The goals: answers per second at batch 16, G=8, and the time to the
first token at batch 1. ``--m`` sets pqa's soft tokens per document (the setting (a) found best per
token; several (``--m 32 16 8``) time a pqa of each m side by side in the same rounds, the first being
``pqa``, the one the goals are read on, the others ``pqa m=N``; ``--quality-row`` then names the (a) row
measured at that m, whose F1 the speedups are paired with, instead of (a)'s best pqa row). The model is
untrained and has no LoRA (a trained pqa model merges its LoRA into the weights to serve, so both sides run
the same weights). Rounds are interleaved (order reversed every other round);
medians, with the per-round spread of the ratios. The goal pairs the speedup with quality: F1 comes
from ``bench/results/quality.json`` (run (a) first): its best pqa row against its best text-RAG row.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from bench import quality  # noqa: E402

NAME = "latency"
SPEEDUP_GOAL, FIRST_TOKEN_GOAL, F1_GOAL = 5.0, 8.0, 0.8
ANSWER_TOKENS = 8  # the G the throughput goal is read at
THROUGHPUT_BATCH = 16  # the batch size the throughput goal is read at
SYSTEMS = ("pqa", "bm25", "closed_book")
_DATA_KEYS = ("llm", "data", "articles", "passages_per_article", "new_articles", "new_passages_per_article",
              "eval_fraction", "top_k")
PROFILES = {  # the held-out questions of (a)'s question split, of the same profile
    # batches: each batch size reads the first ``questions`` held-out questions, answers of each length G
    "smoke": dict({k: quality.PROFILES["smoke"][k] for k in _DATA_KEYS}, rounds=1, m=32,
                  batches=[dict(batch=1, questions=2, new_tokens=[1, 8]), dict(batch=2, questions=4, new_tokens=[1, 8])]),
    "quick": dict({k: quality.PROFILES["quick"][k] for k in _DATA_KEYS}, rounds=2, m=32,
                  batches=[dict(batch=1, questions=3, new_tokens=[1, 8]),
                           dict(batch=16, questions=16, new_tokens=[1, 8])]),
    "full": dict({k: quality.PROFILES["full"][k] for k in _DATA_KEYS}, rounds=3, m=32,
                 batches=[dict(batch=1, questions=6, new_tokens=[1, 8, 24]),
                          dict(batch=16, questions=32, new_tokens=[1, 8])]),
}


class FixedLengthTokenizer:
    """The LLM's tokenizer with an end-of-sequence id no token has: every answer runs ``max_new_tokens``."""

    eos_token_id = -1

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)

    def __len__(self):
        return len(self._tokenizer)


def memory_sizes(params: dict) -> list:
    """The m of each timed pqa: ``params["m"]``, one or several (the first is the goals' ``pqa``)."""
    sizes = [int(m) for m in params["m"]] if isinstance(params["m"], (list, tuple)) else [int(params["m"])]
    if len(set(sizes)) != len(sizes) or min(sizes) < 1:
        raise SystemExit(f"--m {' '.join(map(str, sizes))}: each m once, each >= 1")
    return sizes


def _setup(params: dict, tmp: Path, m: int):
    from pqa_core.config import PQAConfig
    from pqa_core.data.loading import ReadPhaseDataset
    from pqa_core.pipeline import Pipeline

    paths, about = quality.build_splits(params, tmp / "data")
    data = {key: paths[key] for key in ("corpus", "qa", "eval_qa")}
    config = PQAConfig.from_dict({"seed": 0, "output_dir": str(tmp / "run"), "phases": [],
                                  "model": {"llm": params["llm"], "device": "cpu", "lora": {"enabled": False},
                                            "num_memory_tokens": m},
                                  "data": data, "read": {"top_k": params["top_k"]}})
    pipeline = Pipeline(config)
    examples = pipeline.eval_qa[:max(b["questions"] for b in params["batches"])]
    d = config.data
    dataset = ReadPhaseDataset(examples, pipeline.tokenizer,
                               encoder_tokenizer=getattr(pipeline.model.query_encoder, "tokenizer", None),
                               max_query_length=d.max_query_tokens, max_answer_length=d.max_answer_tokens,
                               prompt=d.prompt)
    return config, pipeline, examples, dataset, about


def _f1_from_quality(quality_json: str | None = None, row: str | None = None):
    """F1 and substring of the best pqa row (or ``row``) and of the best text RAG row of (a) (readers trained
    alike), from ``quality_json`` or bench/results/quality.json. The latency side is timed with BM25; dense
    retrieval (MiniLM) costs about as much per question."""
    path = Path(quality_json) if quality_json else common.DEFAULT_OUT / "quality.json"
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
        rows = result["rows"]
        rag = quality.best_text_rag(rows)
        if row is not None and (row not in rows or row not in result["params"]["pqa_variants"]):
            raise SystemExit(f"--quality-row {row!r}: no such pqa row in {path}; its pqa rows: "
                             f"{', '.join(repr(v) for v in result['params']['pqa_variants'] if v in rows)}")
        best = row or quality.best_pqa(rows, result["params"]["pqa_variants"])
        pqa, text = rows[best]["metrics"], rows[rag]["metrics"]
        return {"pqa": pqa["F1"], "bm25": text["F1"], "bm25_row": rag, "pqa_row": best,
                "pqa_substring": pqa["substring"], "bm25_substring": text["substring"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


@common.isolated
def run(profile: str = "full", command: str | None = None, threads: int | None = common.DEFAULT_THREADS,
        quality_json: str | None = None, quality_row: str | None = None, **overrides) -> dict:
    import torch

    from pqa_core.training.controls import build_control, evaluate_control
    from pqa_core.evaluation.qa import evaluate_qa

    bench = common.Bench(NAME, profile, PROFILES, overrides, threads, command)
    params = bench.params
    k = params["top_k"]
    sizes = memory_sizes(params)  # a wrong --m or --quality-row stops here, before the rounds are timed
    if quality_row is not None:
        _f1_from_quality(quality_json, quality_row)
    pqas = ["pqa"] + [f"pqa m={m}" for m in sizes[1:]]
    systems = [*pqas, *SYSTEMS[1:]]
    setups = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, m in zip(pqas, sizes):
            torch.manual_seed(0)
            setups[name] = _setup(params, Path(tmp) / f"m{m}", m)
    models = {name: setup[1].model.eval() for name, setup in setups.items()}
    config, pipeline, examples, dataset, about = setups["pqa"]
    model, prompt = models["pqa"], config.data.prompt
    real_tokenizer = model.tokenizer
    for each in models.values():
        each.tokenizer = FixedLengthTokenizer(real_tokenizer)
    controls = {name: build_control({"name": name}, pipeline.corpus, real_tokenizer) for name in ("bm25", "closed_book")}
    outputs = {}

    d = config.data
    parts = {b["batch"]: type(dataset)(examples[:b["questions"]], real_tokenizer,
                                       encoder_tokenizer=dataset.encoder_tokenizer, max_query_length=d.max_query_tokens,
                                       max_answer_length=d.max_answer_tokens, prompt=prompt)
             for b in params["batches"]}

    def system(name, batch, new_tokens):
        questions = examples[:batch["questions"]]
        size = batch["batch"]

        def call():
            if name in models:
                outputs[name, size, new_tokens] = evaluate_qa(models[name], parts[size], top_k=k, batch_size=size,
                                                              max_new_tokens=new_tokens, with_cost=True)
            else:
                outputs[name, size, new_tokens] = evaluate_control(
                    model, controls[name], questions, top_k=k, batch_size=size, max_new_tokens=new_tokens,
                    prompt=prompt)
        return call

    try:
        fns = {f"{name}@B={b['batch']},G={g}": system(name, b, g)
               for b in params["batches"] for g in b["new_tokens"] for name in systems}
        warm = examples[:1]  # first calls pay one-off costs (allocations, lazy imports): one question each
        for each in models.values():
            evaluate_qa(each, type(dataset)(warm, real_tokenizer, encoder_tokenizer=dataset.encoder_tokenizer,
                                            prompt=prompt), top_k=k, batch_size=1, max_new_tokens=2)
        for control in controls.values():
            evaluate_control(model, control, warm, top_k=k, batch_size=1, max_new_tokens=2, prompt=prompt)
        times = common.interleaved(fns, rounds=params["rounds"], warmup=0)
    finally:
        for each in models.values():
            each.tokenizer = real_tokenizer
    rows = []
    for b in params["batches"]:
        size, n = b["batch"], b["questions"]
        for g in b["new_tokens"]:
            key = lambda s: f"{s}@B={size},G={g}"  # noqa: E731
            row = {"batch": size, "new_tokens": g, "questions": n,
                   "seconds": {s: times[key(s)] for s in systems},
                   "ms_per_question": {s: 1000 * common.median(times[key(s)]) / n for s in systems},
                   "answers_per_second": {s: n / common.median(times[key(s)]) for s in systems},
                   "prompt_tokens_per_question": {s: outputs[s, size, g]["prompt_tokens_per_question"]
                                                  for s in systems},
                   f"Recall@{k}": {s: outputs[s, size, g][f"Recall@{k}"] for s in systems}}
            for other in systems[1:]:
                row[f"{other}_over_pqa"] = common.ratio_stats(times[key(other)], times[key("pqa")])
            for other in pqas[1:]:  # text RAG against each further m, as the goals read it against pqa
                row[f"bm25_over_{other}"] = common.ratio_stats(times[key("bm25")], times[key(other)])
            rows.append(row)
    gold_tokens = [len(ids) for ids in real_tokenizer([ex.answers[0] for ex in pipeline.eval_qa],
                                                      add_special_tokens=False)["input_ids"]]
    throughput, first = goal_rows(rows)
    goals = {}
    if throughput:
        value = throughput["bm25_over_pqa"]["ratio_of_medians"]
        goals["throughput"] = {"metric": f"pqa / bm25 text RAG answers per second, batch {throughput['batch']}, "
                                         f"G={ANSWER_TOKENS} new tokens, k={k}",
                               "target": f">= {SPEEDUP_GOAL}", "value": value, "met": value >= SPEEDUP_GOAL}
    if first:
        value = first["bm25_over_pqa"]["ratio_of_medians"]
        goals["first_token"] = {"metric": f"bm25 text RAG / pqa time to the first token, batch 1, k={k}",
                                "target": f">= {FIRST_TOKEN_GOAL}", "value": value, "met": value >= FIRST_TOKEN_GOAL}
    return with_quality(bench.finish({
        "data": about, "rows": rows, "memory_tokens": config.model.num_memory_tokens, "systems": systems,
        "memory_sizes": dict(zip(pqas, sizes)),
        "mean_gold_answer_tokens": sum(gold_tokens) / max(len(gold_tokens), 1), "goals": goals,
    }), quality_json, quality_row)


def with_quality(result: dict, quality_json: str | None = None, quality_row: str | None = None) -> dict:
    """``result`` with the F1 of (a)'s best pqa row (or ``quality_row``: the row measured at this m) against
    its best text RAG (``quality_json``, or bench/results/quality.json): the quality the speed goals are
    paired with. (a) may be measured after (b): ``--render-only --quality-json FILE`` reads it again."""
    row = quality_row or result.get("quality_row")
    f1 = _f1_from_quality(quality_json, row)
    ratio = f1["pqa"] / f1["bm25"] if f1 and f1.get("bm25") else None
    which = "pqa" if row else "best pqa"
    goal = {"metric": f"{which} F1 / bm25 F1 from (a) (rows {f1['pqa_row'] if f1 else '?'}, "
                      f"{f1['bm25_row'] if f1 else '?'})",
            "target": f">= {F1_GOAL}", "value": ratio, "met": None if ratio is None else ratio >= F1_GOAL}
    return {**result, "quality_row": row, "f1_from_quality": f1, "goals": {**result["goals"], "f1": goal}}


def _row(rows, batch, new_tokens):
    return next((r for r in rows if r.get("batch", 1) == batch and r["new_tokens"] == new_tokens), None)


def goal_rows(rows):
    """The rows the goals are read on: answers per second at the throughput batch (or the largest measured)
    and G new tokens, and the first token at batch 1."""
    largest = max(r.get("batch", 1) for r in rows)
    return _row(rows, min(largest, THROUGHPUT_BATCH), ANSWER_TOKENS), _row(rows, 1, 1)


def markdown(result: dict) -> str:
    p, d, goals = result["params"], result["data"], result["goals"]
    k = p["top_k"]
    table_rows = []
    systems = result.get("systems", SYSTEMS)
    for r in result["rows"]:
        for s in systems:
            ratio = r.get(f"{s}_over_pqa")
            per_second = r.get("answers_per_second", {}).get(s, 1000 / r["ms_per_question"][s])
            table_rows.append([
                r.get("batch", 1), r["new_tokens"], f"**{s}**" if s == "pqa" else s,
                f"{r['prompt_tokens_per_question'][s]:.0f}", f"{r['ms_per_question'][s]:.0f}", f"{per_second:.2f}",
                "1 (reference)" if ratio is None else
                f"**{ratio['ratio_of_medians']:.2f}x** ({common.ratio_span(ratio)})",
                f"{r[f'Recall@{k}'][s]:.0f}"])
    table = common.md_table(["batch", "new tokens G", "system", "prompt tokens/q", "ms/question", "answers/s",
                             "time / pqa's (per-round range)", f"Recall@{k} (untrained pqa)"], table_rows)
    f1 = goals["f1"]
    fq = result["f1_from_quality"]
    f1_text = ("no F1 yet (run `python bench/quality.py` first)" if not fq else
               f"no F1 ratio: bm25's F1 in (a) is {fq.get('bm25', 0):.1f}" if f1["value"] is None else
               f"F1 of the {'named' if result.get('quality_row') else 'best'} pqa row of (a) "
               f"(`{fq.get('pqa_row', 'pqa')}`) / the best text RAG's "
               f"(`{fq['bm25_row']}`) = **{f1['value']:.2f}** (goal >= {F1_GOAL}: **{common.verdict(f1['met'])}**; "
               f"by substring match "
               f"{fq['pqa_substring'] / fq['bm25_substring'] if fq['bm25_substring'] else float('nan'):.2f})")
    speed = [f"{goal['metric']}: **{goal['value']:.1f}x** (goal {goal['target']}x: **{common.verdict(goal['met'])}**)"
             for name in ("throughput", "first_token", "speedup") for goal in [goals.get(name)] if goal]
    throughput, first = goal_rows(result["rows"])
    for other in [s for s in systems if s.startswith("pqa m=")]:
        parts = [f"{what} **{row[f'bm25_over_{other}']['ratio_of_medians']:.1f}x**"
                 for what, row in (("answers per second", throughput), ("time to the first token", first))
                 if row and f"bm25_over_{other}" in row]
        if parts:
            speed.append(f"with `{other}` (timed in the same rounds): bm25 / {other} " + ", ".join(parts))
    batch_one = {r["new_tokens"]: r for r in result["rows"] if r.get("batch", 1) == 1}
    decode = ""
    if len(batch_one) >= 2:
        lo, hi = min(batch_one), max(batch_one)
        per_token = {s: (batch_one[hi]["ms_per_question"][s] - batch_one[lo]["ms_per_question"][s]) / (hi - lo)
                     for s in ("pqa", "bm25")}
        at_answer = batch_one.get(ANSWER_TOKENS)
        decode = (f" At batch 1 each further answer token costs about {per_token['pqa']:.0f} ms (pqa) and "
                  f"{per_token['bm25']:.0f} ms (bm25) on this CPU: decoding reads every weight per token whatever "
                  f"the prompt, so the prompt saving shows fully in the time to the first token and is diluted by "
                  f"every token generated after it"
                  + (f" (a whole answer of G={ANSWER_TOKENS} at batch 1: "
                     f"{at_answer['bm25_over_pqa']['ratio_of_medians']:.2f}x)." if at_answer else "."))
    sizes = ", ".join(f"batch {b['batch']} on the first {b['questions']} (G = {', '.join(map(str, b['new_tokens']))})"
                      for b in p.get("batches", [dict(batch=1, questions=result["rows"][0]["questions"],
                                                      new_tokens=p.get("new_tokens", []))]))
    return common.section(
        "(b) Answer latency and prompt tokens: pqa vs text RAG, same k", result,
        f"Held-out questions of the (a) subset ({d['passages']} passages): {sizes}. LLM `{p['llm']}` without LoRA "
        f"on both sides, k={k}; pqa reads k x {result.get('memory_tokens', 4)} soft tokens + the question"
        + "".join(f" (`{name}`: k x {m})" for name, m in result.get("memory_sizes", {}).items() if name != "pqa")
        + ", bm25 "
        f"reads `Context: <k whole passages>` + the question. Every answer is forced to exactly G new tokens "
        f"(G=1: selection + prefill, the time to the first token; the held-out gold answers average "
        f"{result['mean_gold_answer_tokens']:.1f} tokens, so G={ANSWER_TOKENS} is a short answer with its EOS). "
        f"{p['rounds']} interleaved rounds after a one-question warm-up.",
        table,
        "; ".join(speed) + f"; {f1_text}." + decode,
    )


def main(argv=None) -> int:
    def add_arguments(parser):
        parser.add_argument("--quality-json", default=None, help="F1 source (default bench/results/quality.json)")
        parser.add_argument("--m", type=int, nargs="+", default=None,
                            help="pqa's soft tokens per document (default 32); several: each timed in the same "
                                 "rounds, the goals read on the first")
        parser.add_argument("--quality-row", default=None,
                            help="the (a) pqa row whose F1 the speedups are paired with (the one measured at --m; "
                                 "default the best pqa row)")

    def run_kwargs(args, out):
        m = (args.m if len(args.m) > 1 else args.m[0]) if args.m else None
        return {"quality_json": args.quality_json, "quality_row": args.quality_row, **({"m": m} if m else {})}

    def refresh(result, args):
        if args.quality_json or args.quality_row:
            return with_quality(result, args.quality_json, args.quality_row)
        return result

    return common.script_main(sys.modules[__name__], argv, add_arguments=add_arguments, run_kwargs=run_kwargs,
                              refresh=refresh)


if __name__ == "__main__":
    sys.exit(main())
