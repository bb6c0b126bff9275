"""Controls (closed book, random, oracle, BM25, dense MiniLM) chosen by name and scored through pqa's
own generation and metrics path, on the tiny model and the shipped sample; one CLI run; BM25 on SQuAD."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pqa_core.components import plugins
from pqa_core.config import PQAConfig
from pqa_core.training.controls import build_control, evaluate_control
from pqa_core.errors import UsageError
from pqa_core.evaluation.qa import evaluate_qa
from pqa_core.hookspecs import hookimpl
from pqa_core.interfaces import Control
from pqa_core.components.kinds import COMPONENT_KINDS
from pqa_core.evaluation.metrics import compute_em, compute_f1
from pqa_core.pipeline import Pipeline
from pqa_core.training.loop import RecordingLogger

REPO = Path(__file__).resolve().parents[1]
SQUAD = REPO.parent / "shared" / "data" / "squad_v1.1"
CONTROLS = ("closed_book", "random_docs", "oracle", "bm25", "dense_minilm")
METRICS = ("EM", "F1", "substring", "Recall@3")
KEYS = {"latency_ms_per_question", "prompt_tokens_per_question", "questions"} | {
    f"{m}{end}" for m in METRICS for end in ("", "_ci95_low", "_ci95_high")}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(tmp_path, **control):
    return PQAConfig.from_dict({
        "seed": 0, "output_dir": str(tmp_path / "run"), "phases": ["control"],
        "model": {"llm": "tiny", "doc_init": "random", "num_memory_tokens": 2, "lora": {"enabled": False}},
        "query_encoder": {"name": "llm_mean"}, "eval": {"max_new_tokens": 4},
        "control": control or {"name": "bm25"},
    })


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The tiny model and the sample, loaded once; each test scores a control on its eval questions."""
    return Pipeline(tiny_config(tmp_path_factory.mktemp("controls")))


def score(pipeline, name, path=None, **kwargs):
    control = build_control({"name": name, **kwargs}, pipeline.corpus, pipeline.tokenizer)
    return evaluate_control(pipeline.model, control, pipeline.eval_qa, top_k=3, batch_size=8, max_new_tokens=4,
                            prompt=pipeline.config.data.prompt, predictions_path=str(path) if path else None)


def test_every_control_registered_by_name_with_the_interface():
    found = plugins.components("control")
    assert set(CONTROLS) <= set(found)
    for name in CONTROLS:
        assert issubclass(found[name].factory, COMPONENT_KINDS["control"]), name
        assert found[name].plugin == "pqa_plugins.controls"
    with pytest.raises(UsageError, match="unknown control 'nope'; available: bm25, closed_book, dense_minilm"):
        plugins.validate("control", "nope")
    with pytest.raises(UsageError, match="control 'bm25' got unexpected parameter 'k3'; accepted: b, k1"):
        plugins.validate("control", "bm25", {"k3": 1})


@pytest.mark.parametrize("name", CONTROLS)
def test_each_control_reports_metrics_latency_and_prompt_tokens(pipeline, name, tmp_path):
    path = tmp_path / "predictions.jsonl"
    metrics = score(pipeline, name, path)
    assert set(metrics) == KEYS
    assert all(math.isfinite(v) for v in metrics.values())
    assert all(0 <= metrics[k] <= 100 for k in ("EM", "F1", "substring", "Recall@3"))
    assert metrics["latency_ms_per_question"] > 0 and metrics["prompt_tokens_per_question"] > 0
    # the same metrics path as pqa: the file's per-question scores average to the reported ones
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["id"] for r in records] == [ex.id for ex in pipeline.eval_qa]
    for r in records:
        assert r["em"] == compute_em(r["prediction"], r["answers"])
        assert r["f1"] == compute_f1(r["prediction"], r["answers"])
    assert metrics["F1"] == pytest.approx(100 * sum(r["f1"] for r in records) / len(records))
    assert metrics["prompt_tokens_per_question"] == pytest.approx(sum(r["prompt_tokens"] for r in records) / len(records))
    assert all(len(r["selected_ids"]) == (0 if name == "closed_book" else 3 if name != "oracle" else 1)
               for r in records)


def test_closed_book_reads_exactly_pqas_question_prompt(pipeline):
    control = build_control({"name": "closed_book"}, pipeline.corpus, pipeline.tokenizer)
    inputs = control.prepare(pipeline.eval_qa, 3, pipeline.config.data.prompt)
    assert all(item.rows == [] and item.context is None for item in inputs)
    ids = pipeline.tokenizer([item.prompt for item in inputs], add_special_tokens=False)["input_ids"]
    assert [list(row) for row in ids] == pipeline.eval_dataset.query_ids
    metrics = score(pipeline, "closed_book")
    assert metrics["Recall@3"] == 0
    assert metrics["prompt_tokens_per_question"] == pytest.approx(
        sum(map(len, pipeline.eval_dataset.query_ids)) / len(pipeline.eval_qa))


def test_oracle_reads_the_gold_passage_and_has_full_recall(pipeline):
    assert score(pipeline, "oracle")["Recall@3"] == 100.0
    control = build_control({"name": "oracle"}, pipeline.corpus, pipeline.tokenizer)
    example = pipeline.eval_qa[0]
    item = control.prepare([example], 3, "Question: {question}\nAnswer:")[0]
    gold = pipeline.corpus[example.gold_rows[0]].text
    assert item.rows == example.gold_rows and item.context == gold
    assert item.prompt == f"Context: {gold}\nQuestion: {example.question}\nAnswer:"


def test_bm25_and_dense_find_gold_passages_far_more_often_than_random(pipeline):
    recall = {name: score(pipeline, name)["Recall@3"] for name in ("random_docs", "bm25", "dense_minilm")}
    assert recall["bm25"] >= 80 and recall["dense_minilm"] >= 80
    assert recall["random_docs"] < 30 < recall["bm25"] - 30


def test_random_docs_is_seeded_per_question_not_per_batch(pipeline):
    a = build_control({"name": "random_docs", "seed": 1}, pipeline.corpus)
    b = build_control({"name": "random_docs", "seed": 2}, pipeline.corpus)
    rows, _ = a.select(pipeline.eval_qa, 3)
    assert rows == a.select(pipeline.eval_qa, 3)[0]
    assert rows[5:] == a.select(pipeline.eval_qa[5:], 3)[0]
    assert all(len(set(r)) == 3 for r in rows)
    assert rows != b.select(pipeline.eval_qa, 3)[0]


def test_max_passage_tokens_keeps_the_start_of_each_passage(pipeline):
    control = build_control({"name": "oracle", "max_passage_tokens": 5}, pipeline.corpus, pipeline.tokenizer)
    for passage, doc in zip(control.passages, pipeline.corpus):
        assert doc.text.startswith(passage)
        assert len(pipeline.tokenizer(passage, add_special_tokens=False)["input_ids"]) <= 5
    full = score(pipeline, "oracle")["prompt_tokens_per_question"]
    assert score(pipeline, "oracle", max_passage_tokens=5)["prompt_tokens_per_question"] < full


def test_pqa_eval_reports_the_same_cost_fields_only_when_asked(pipeline):
    k = 3
    plain = evaluate_qa(pipeline.model, pipeline.eval_dataset, top_k=k, batch_size=8, max_new_tokens=4)
    costed = evaluate_qa(pipeline.model, pipeline.eval_dataset, top_k=k, batch_size=8, max_new_tokens=4,
                         with_cost=True)
    assert set(plain) == KEYS - {"latency_ms_per_question", "prompt_tokens_per_question"}
    assert set(costed) == KEYS
    soft = k * pipeline.model.z_to_embedding.num_tokens
    assert costed["prompt_tokens_per_question"] == pytest.approx(
        soft + sum(map(len, pipeline.eval_dataset.query_ids)) / len(pipeline.eval_qa))
    assert {k: costed[k] for k in plain} == plain


class _FirstDocs(Control):
    def select(self, examples, k):
        return [list(range(k)) for _ in examples], None


class _ControlPlugin:
    @hookimpl
    def pqa_register_controls(self, register):
        register("first_docs", _FirstDocs)


def test_a_plugin_control_is_used_by_name(pipeline):
    plugins.load_plugins()
    plugins.pm.register(_ControlPlugin(), name="test_control_plugin")
    try:
        metrics = score(pipeline, "first_docs")
    finally:
        plugins.pm.unregister(name="test_control_plugin")
    assert set(metrics) == KEYS
    first_three = sum(any(r < 3 for r in ex.gold_rows) for ex in pipeline.eval_qa)
    assert metrics["Recall@3"] == pytest.approx(100 * first_three / len(pipeline.eval_qa))


def test_control_phase_is_a_normal_pipeline_run(tmp_path):
    logger = RecordingLogger()
    result = Pipeline(tiny_config(tmp_path, name="oracle"), logger).run()
    assert set(result) == KEYS and result["Recall@3"] == 100.0
    assert (tmp_path / "run" / "predictions.jsonl").exists() and (tmp_path / "run" / "result.json").exists()
    assert logger.scalars["eval.Recall@3"] == [(0, 100.0)]
    assert "control_seconds" in logger.info and not any(k.startswith("Recall@3_before") for k in logger.info)


def test_cli_run_control_bm25(tmp_path):
    env = dict(os.environ, PQA_PROGRESS="0", PQA_OUTPUT_DIR=str(tmp_path / "outputs"))
    proc = subprocess.run([sys.executable, "-m", "pqa_experiments.cli.main", "run", "control", "--no-db", "--json",
                           "with", "smoke", "control.name=bm25", "read.top_k=2"],
                          capture_output=True, text=True, env=env, timeout=600, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])["result"]
    assert set(result) == {"latency_ms_per_question", "prompt_tokens_per_question", "questions"} | {
        f"{m}{end}" for m in ("EM", "F1", "substring", "Recall@2") for end in ("", "_ci95_low", "_ci95_high")}
    assert result["Recall@2"] > 80
    [run_dir] = (tmp_path / "outputs" / "pqa_control").iterdir()
    assert len((run_dir / "predictions.jsonl").read_text().splitlines()) == 108


@pytest.mark.skipif(not (SQUAD / "corpus.jsonl").exists(),
                    reason=f"SQuAD v1.1 data not found at {SQUAD} (the shared data folder beside the repository)")
def test_bm25_retrieves_squad_passages():
    """BM25 over all 1733 SQuAD dev passages (no LLM): the gold passage is usually in the top 5."""
    from pqa_core.data.loading import load_corpus, load_qa

    corpus = load_corpus(SQUAD / "corpus.jsonl")
    questions = load_qa(SQUAD / "qa.jsonl", corpus)[::40]
    control = build_control({"name": "bm25"}, corpus)
    rows, _ = control.select(questions, 5)
    recall = sum(bool(set(r) & set(ex.gold_rows)) for r, ex in zip(rows, questions)) / len(questions)
    random_rows, _ = build_control({"name": "random_docs"}, corpus).select(questions, 5)
    chance = sum(bool(set(r) & set(ex.gold_rows)) for r, ex in zip(random_rows, questions)) / len(questions)
    assert recall > 0.6 and chance < 0.05


def test_bench_quality_and_latency_scripts_run(tmp_path):
    """bench/quality.py and bench/latency.py end to end at smoke size (tiny LLM, sample data); no timing asserted."""
    from pqa_experiments.cli.bench import load_driver

    load_driver()  # puts the checkout's bench/ on sys.path
    from bench import latency, quality

    q = quality.run("smoke", command="pytest smoke", out_dir=str(tmp_path))
    assert set(q["rows"]) == {"pqa", "pqa, no write phase", "closed_book (trained reader)", "oracle (trained reader)",
                              "bm25 (trained reader)", "closed_book (plain LLM)"}
    for row in q["rows"].values():  # both splits scored, every question kept for the paired tests
        assert "F1_ci95_low" in row["metrics"] and "F1_ci95_low" in row["new"]["metrics"]
        assert len(row["per_question"]) == q["data"]["eval_questions"]
        assert len(row["new"]["per_question"]) == q["data"]["new_eval_questions"]
    assert q["rows"]["oracle (trained reader)"]["metrics"]["Recall@3"] == 100.0
    assert len(q["rows"]["oracle (trained reader)"]["reader_losses"]) == 1
    assert "pqa vs closed_book (trained reader) [question split]" in q["comparisons"]
    assert "no write phase" in quality.markdown(q)  # a variant without a write phase renders
    closed = q["rows"]["closed_book (trained reader)"]["metrics"]["prompt_tokens_per_question"]
    soft = q["params"]["top_k"] * q["params"]["overrides"]["model"]["num_memory_tokens"]
    line = next(x for x in quality.markdown(q).splitlines() if x.startswith("| **pqa** |"))
    assert f"| {q['rows']['pqa']['metrics']['Recall@3']:.0f} | {soft + closed:.0f} |" in line, line
    assert quality.soft_prompt_tokens(q["rows"]["pqa"], q["rows"], q["params"]["top_k"],
                                      q["params"]["overrides"]) == soft + closed  # k x m + the question
    curve = q["rows"]["pqa"]["new"]["curve"]  # F1 before and after each write epoch of the new documents
    assert [c["write_steps"] for c in curve][0] == 0 and len(curve) == 3
    assert {"oracle", "above_closed_book", "rag_ratio", "above_closed_book_article", "rag_ratio_article"} <= set(q["goals"])
    best = max(["pqa", "pqa, no write phase"], key=lambda n: q["rows"][n]["metrics"]["F1"])
    assert quality.best_pqa(q["rows"], q["params"]["pqa_variants"]) == best  # goals read on pqa's best variant
    assert q["goals"]["rag_ratio"]["metric"].startswith(best + " F1")
    assert {"low", "high"} <= set(q["goals"]["rag_ratio"])  # the ratio's interval (tests/test_bench_smoke.py)
    alone = quality.run("smoke", command="pytest alone", rows=["pqa, no write phase"])  # a row measured apart
    assert list(alone["rows"]) == ["pqa, no write phase"]  # ... is the row of the whole run, answer for answer
    assert alone["rows"]["pqa, no write phase"]["per_question"] == q["rows"]["pqa, no write phase"]["per_question"]
    (tmp_path / "quality.json").write_text(json.dumps(q, default=str))
    lat = latency.run("smoke", command="pytest smoke", quality_json=str(tmp_path / "quality.json"), m=[32, 4])
    assert [(r["batch"], r["new_tokens"], r["questions"]) for r in lat["rows"]] == [(1, 1, 2), (1, 8, 2), (2, 1, 4),
                                                                                  (2, 8, 4)]
    row = lat["rows"][0]
    assert row["prompt_tokens_per_question"]["bm25"] > row["prompt_tokens_per_question"]["pqa"]
    assert lat["f1_from_quality"]["bm25"] == q["rows"]["bm25 (trained reader)"]["metrics"]["F1"]
    assert lat["f1_from_quality"]["pqa"] == q["rows"][best]["metrics"]["F1"]  # the best pqa row of (a)
    assert "batch 2" in lat["goals"]["throughput"]["metric"] and "first token" in lat["goals"]["first_token"]["metric"]
    assert lat["memory_tokens"] == 32 and lat["systems"] == ["pqa", "pqa m=4", "bm25", "closed_book"]
    # a second m timed in the same rounds: 3 x 28 fewer soft tokens, text RAG's ratio against it too
    assert row["prompt_tokens_per_question"]["pqa"] - row["prompt_tokens_per_question"]["pqa m=4"] == 3 * 28
    assert "bm25_over_pqa m=4" in row and "pqa m=4_over_pqa" in row
    assert "with `pqa m=4` (timed in the same rounds): bm25 / pqa m=4" in latency.markdown(lat)
    for bad in (dict(m=[4, 4]), dict(quality_row="bm25 (trained reader)")):  # refused before any round is timed
        with pytest.raises(SystemExit):
            latency.run("smoke", command="pytest smoke", quality_json=str(tmp_path / "quality.json"), **bad)
    named = latency.with_quality(lat, str(tmp_path / "quality.json"), "pqa, no write phase")
    assert named["f1_from_quality"]["pqa"] == q["rows"]["pqa, no write phase"]["metrics"]["F1"]
    assert named["goals"]["f1"]["metric"].startswith("pqa F1 / bm25 F1 from (a) (rows pqa, no write phase,")
    # (a) measured again after (b): --render-only --quality-json reads its F1 again, the timings kept
    (tmp_path / "lat").mkdir()
    (tmp_path / "lat" / "latency.json").write_text(json.dumps(lat, default=str))
    better = json.loads(json.dumps(q, default=str))
    better["rows"][best]["metrics"]["F1"] = 99.0
    (tmp_path / "better.json").write_text(json.dumps(better))
    assert latency.main(["--smoke", "--render-only", "--out", str(tmp_path / "lat"),
                         "--quality-json", str(tmp_path / "better.json")]) == 0
    again = json.loads((tmp_path / "lat" / "latency.json").read_text())
    assert again["f1_from_quality"]["pqa"] == 99.0 and again["rows"] == json.loads(json.dumps(lat["rows"]))
    for md in (quality.markdown(q), latency.markdown(lat)):
        assert md.startswith("## (") and "Command: `pytest smoke`" in md and "| " in md


def test_bench_quality_measured_in_parts_combines_into_one_table():
    """--rows measures part of bench (a), --variant adds a pqa variant, --combine joins the parts and
    recomputes the paired tests; parts of different parameters are refused."""
    from pqa_experiments.cli.bench import load_driver

    load_driver()
    from bench import quality

    zero = {"model": {"content_init": "zero"}, "write": {"epochs": 1}}
    part1 = quality.run("smoke", command="part one", rows=["pqa", "closed_book (trained reader)"])
    part2 = quality.run("smoke", command="part two", rows=["pqa, zero content"], variants={"pqa, zero content": zero})
    assert set(part1["rows"]) == {"pqa", "closed_book (trained reader)"} and list(part2["rows"]) == ["pqa, zero content"]
    assert "pqa vs closed_book (trained reader) [question split]" in part1["comparisons"]
    assert not part2["comparisons"] and "above_closed_book" not in part2["goals"]  # nothing to pair with yet
    combined = quality.combine_results([part1, part2])
    assert list(combined["rows"]) == ["pqa", "pqa, zero content", "closed_book (trained reader)"]
    assert combined["params"]["pqa_variants"]["pqa, zero content"] == zero
    assert {"pqa vs pqa, zero content [question split]", "pqa, zero content vs closed_book (trained reader) "
            "[question split]"} <= set(combined["comparisons"])
    md = quality.markdown(combined)
    assert "Measured in parts" in md and "- `part two`: pqa, zero content" in md
    with pytest.raises(ValueError, match="unknown row.*'nope'"):
        quality.run("smoke", rows=["nope"])
    # a part measured with --pretrained: its rows say so in their labels, and closed-book pairs with its
    # pretrained reader where both readers were measured
    pre_row = {**part1["rows"]["closed_book (trained reader)"], "command": "part three"}
    part3 = {**part2, "params": {**part2["params"], "pretrained": "/artifacts"},
             "rows": {"closed_book (pretrained reader)": pre_row}}
    joined = quality.combine_results([part1, part2, part3])
    assert list(joined["rows"]) == ["pqa", "pqa, zero content", "closed_book (pretrained reader)",
                                    "closed_book (trained reader)"]
    assert "pqa vs closed_book (pretrained reader) [question split]" in joined["comparisons"]
    assert "pqa vs closed_book (trained reader) [question split]" not in joined["comparisons"]
    # --rename relabels a pqa variant's rows (its answers kept, its pairs recomputed); never a control's
    old = "pqa, zero content (1 epoch)"
    relabelled = quality.combine_results([part1, part2], renames={"pqa, zero content": old})
    assert list(relabelled["rows"]) == ["pqa", old, "closed_book (trained reader)"]
    assert relabelled["rows"][old]["per_question"] == part2["rows"]["pqa, zero content"]["per_question"]
    assert f"{old} vs closed_book (trained reader) [question split]" in relabelled["comparisons"]
    assert relabelled["params"]["pqa_variants"][old] == zero and "pqa, zero content" not in relabelled["rows"]
    assert f"(`--rename`): `pqa, zero content` is now `{old}`" in quality.markdown(relabelled)
    with pytest.raises(ValueError, match="only a pqa variant's row can be renamed"):
        quality.combine_results([part1], renames={"closed_book (trained reader)": "closed_book (old)"})
    with pytest.raises(ValueError, match="no part has a row 'nope'"):
        quality.combine_results([part1], renames={"nope": "x"})
    with pytest.raises(ValueError, match="a part already has the label 'pqa'"):  # its rows would merge
        quality.combine_results([part1, part2], renames={"pqa, zero content": "pqa"})
    with pytest.raises(ValueError, match="two labels renamed to one"):
        quality.combine_results([part1, part2], renames={"pqa": "pqa (a)", "pqa, zero content": "pqa (a)"})
    with pytest.raises(ValueError, match="cannot start with a control's name"):
        quality.combine_results([part1, part2], renames={"pqa, zero content": "closed_book (pretrained reader)"})
    again = {**part2, "command": "part two, again"}  # which part's row would the new label mean?
    with pytest.raises(ValueError, match="parts 2, 3 all have this row"):
        quality.combine_results([part1, part2, again], renames={"pqa, zero content": old})
    alone = quality.markdown(quality.combine_results([part2], renames={"pqa, zero content": old}))
    assert ("Relabelled when combined (`--rename`):\n\n- relabelled when combined (`--rename`): "
            f"`pqa, zero content` is now `{old}`") in alone
    with pytest.raises(SystemExit, match="--rename relabels rows of --combine's parts"):
        quality.main(["--smoke", "--rename", "pqa", "pqa (old)"])
    changed = {**part2, "params": {**part2["params"], "top_k": 5}}
    with pytest.raises(ValueError, match="other parameters than result 1: \\['top_k'\\]"):
        quality.combine_results([part1, changed])
    with pytest.raises(SystemExit, match="--rows measures part of the table: give --out"):
        quality.main(["--smoke", "--rows", "pqa"])


def test_gradient_checkpointing_trains_the_same_reader_recomputing_each_layer(tmp_path):
    """model.gradient_checkpointing: a text reader (oracle) trained with it reaches the same LoRA weights
    as without, while every LLM layer's insides run twice per step (forward, then again in the backward pass)."""
    def trained(checkpointing: bool):
        config = PQAConfig.from_dict({
            "seed": 0, "output_dir": str(tmp_path / f"run_{checkpointing}"), "phases": ["control_read"],
            "model": {"llm": "tiny", "doc_init": "random", "num_memory_tokens": 2, "lora": {"r": 4},
                      "gradient_checkpointing": checkpointing},
            "query_encoder": {"name": "llm_mean"}, "read": {"epochs": 1, "batch_size": 4},
            "control": {"name": "oracle"}})
        pipe = Pipeline(config)
        mlp = pipe.model.llm.get_base_model().model.layers[0].mlp  # runs inside the checkpointed forward
        calls, forward = [], mlp.forward  # (module hooks do not fire when the backward pass recomputes)

        def counted(*args, **kwargs):
            calls.append(1)
            return forward(*args, **kwargs)
        mlp.forward = counted
        pipe.run_control_read()
        lora = {n: p.detach().clone() for n, p in pipe.model.llm.named_parameters() if "lora_" in n}
        steps = math.ceil(len(pipe.train_qa) / 4)
        return lora, len(calls), steps

    plain, plain_calls, steps = trained(False)
    recomputed, recomputed_calls, _ = trained(True)
    assert plain_calls == steps and recomputed_calls == 2 * steps
    assert plain.keys() == recomputed.keys() and plain
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in plain.items() if "lora_B" in n)  # it trained
