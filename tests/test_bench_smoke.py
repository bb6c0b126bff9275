"""The benchmarks run end to end at tiny sizes and write their files. No timing is asserted here:
performance targets live in bench/ and bench/RESULTS.md, never in tests."""
import json

import pytest
import torch
from click.testing import CliRunner

from pqa_experiments.cli.bench import bench as bench_command
from pqa_experiments.cli.bench import load_driver

driver = load_driver()  # bench/ from the checkout, importable as ``bench``


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    summary = driver.run_all("smoke", out_dir=out, command="pytest smoke", log=lambda line: None)
    return out, summary


def test_every_benchmark_writes_json_and_markdown(smoke_run):
    out, summary = smoke_run
    assert summary["benchmarks"] == list(driver.BENCHMARKS)
    for name in driver.BENCHMARKS:
        result = json.loads((out / f"{name}.json").read_text())
        assert result["name"] == name and result["profile"] == "smoke" and result["command"] == "pytest smoke"
        assert result["machine"]["torch_threads"] >= 1 and result["machine"]["cpu_model"]
        md = (out / f"{name}.md").read_text()
        assert md.startswith("## (") and "| " in md and "Command: `pytest smoke`" in md
    saved = json.loads((out / "summary.json").read_text())
    assert set(saved["goals"]) == set(driver.BENCHMARKS)
    assert "## Goals" in (out / "SUMMARY.md").read_text()


def test_results_hold_both_sides_of_each_ratio(smoke_run):
    out, _ = smoke_run
    step = json.loads((out / "step_overhead.json").read_text())
    assert set(step["seconds"]) == {"read_step", "bare_hf_labels", "bare_hf_logits_to_keep"}
    assert len({len(v) for v in step["seconds"].values()}) == 1
    assert step["setup"]["sequence_length"] > step["setup"]["top_k"] * step["setup"]["soft_tokens_per_doc"]
    sel = json.loads((out / "selection_scale.json").read_text())
    assert {"peak_mm", "exact_topk", "chunked_topk"} <= set(sel["scale"][0]["seconds"])
    ev = json.loads((out / "batched_eval.json").read_text())
    row = ev["rows"][0]
    assert row["identical_predictions"] <= row["questions"] and len(row["seconds"]["seed_loop"]) >= 1


def test_tracking_overhead_stores_every_logged_point(smoke_run):
    out, _ = smoke_run
    result = json.loads((out / "tracking_overhead.json").read_text())
    assert set(result["seconds"]) == {"no_observer", "mongo_observer"}
    assert len({len(v) for v in result["seconds"].values()}) == 1
    observed = [r for r in result["runs"] if r["side"] == "mongo_observer"]
    assert observed and all(r["stored"]["status"] == "COMPLETED" and r["stored"]["equal"] for r in observed)
    assert all(r["stored"]["points_stored"] == r["points_logged"] > 0 for r in observed)
    assert result["points"]["all_equal"] and len(result["points"]["logged_per_run"]) == 1  # both sides: same run
    assert all(r["run_id"] is None for r in result["runs"] if r["side"] == "no_observer")
    assert "--no-db" in result["setup"]["commands"]["no_observer"]
    assert f"**{len(observed)} of {len(observed)} runs equal**" in (out / "tracking_overhead.md").read_text()


def test_results_md_keeps_every_section(smoke_run, tmp_path):
    """RESULTS.md is rendered from every result file in the folder, whichever script wrote it, in letter order."""
    out, _ = smoke_run
    for path in out.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    own = {"quality": ("(a) Answer quality", {"F1": {"metric": "pqa F1 / rag F1", "target": ">= 0.8", "value": 0.5,
                                                     "met": False}}),
           "write_capacity": ("(f) Write-phase capacity", None)}
    for name, (title, goals) in own.items():
        result = {"name": name, "profile": "full", "command": f"python bench/{name}.py", "wall_s": 60.0,
                  "machine": {"torch_threads": 1}, **({"goals": goals} if goals else {})}
        (tmp_path / f"{name}.json").write_text(json.dumps(result))
        (tmp_path / f"{name}.md").write_text(f"## {title}\n\nCommand: `python bench/{name}.py`\n")
    driver.rerender(tmp_path, results_md=False)
    text = (tmp_path / "SUMMARY.md").read_text()
    headings = [line[3:6] for line in text.splitlines() if line.startswith("## (")]
    assert headings == ["(a)", "(c)", "(d)", "(e)", "(f)", "(g)"]
    assert "| (a) quality | pqa F1 / rag F1 | >= 0.8 | 0.500 | **NOT met** |" in text
    assert "| (f) write_capacity | `python bench/write_capacity.py` | full | 60 s |" in text
    goal_rows = [line for line in text.split("## Goals")[1].split("\n## ")[0].splitlines() if line.startswith("| (")]
    assert len(goal_rows) == 1 + sum(len(driver.goals_of(json.loads((out / f"{n}.json").read_text())))
                                     for n in driver.BENCHMARKS)


def test_script_render_only_rewrites_markdown_from_json(smoke_run, tmp_path):
    from bench import common, step_overhead

    out, _ = smoke_run
    for ext in ("json", "md"):
        (tmp_path / f"step_overhead.{ext}").write_bytes((out / f"step_overhead.{ext}").read_bytes())
    (tmp_path / "step_overhead.md").write_text("stale")
    assert common.script_main(step_overhead, ["--render-only", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "step_overhead.md").read_text() == (out / "step_overhead.md").read_text()


def test_selection_plot_written_when_matplotlib_present(smoke_run):
    pytest.importorskip("matplotlib")
    out, _ = smoke_run
    assert (out / "selection_scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_selection_without_faiss_says_so(tmp_path, monkeypatch):
    from bench import selection_scale

    monkeypatch.setattr(selection_scale, "_faiss", lambda: None)
    result = selection_scale.run("smoke", command="x", out_dir=None)
    assert result["ann"] == [] and "pip install faiss-cpu" in result["faiss_note"]
    assert result["goals"]["recall"]["met"] is None
    assert "Skipped: faiss not installed" in selection_scale.markdown(result)


def test_interleaved_alternates_order():
    calls = []
    times = driver.common.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                      rounds=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}


def test_cli_runs_one_benchmark(tmp_path):
    result = CliRunner().invoke(bench_command, ["--smoke", "--only", "selection_scale", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "selection_scale.json").read_text())
    assert data["command"] == f"pqa bench --smoke --only selection_scale --out {tmp_path}"
    assert not (tmp_path / "step_overhead.json").exists()


def test_selection_refresh_recomputes_from_raw_seconds(smoke_run):
    from bench import selection_scale

    out, _ = smoke_run
    result = json.loads((out / "selection_scale.json").read_text())
    before = result["goals"]["efficiency"]["value"]
    for row in result["scale"]:
        row["seconds"]["chunked_topk"] = [t * 2 for t in row["seconds"]["chunked_topk"]]
    after = selection_scale.refresh(result)["goals"]["efficiency"]["value"]
    assert after == pytest.approx(before / 2)


def test_write_capacity_prefix_measure():
    from bench.write_capacity import first_mistakes, prefix_capacity

    hits = torch.tensor([[1, 1, 1, 1, 0, 1], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    valid = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    # pooled accuracy over the first l positions: 1, 1, 1, 1, 9/10, 10/11
    assert prefix_capacity(hits, valid) == 6
    assert prefix_capacity(hits, valid, target=0.95) == 4
    assert prefix_capacity(~hits & valid, valid) == 0
    assert first_mistakes(hits, valid) == [4, 5]  # the second passage is rebuilt whole


def test_write_capacity_smoke_runs_every_setting(tmp_path):
    from bench import write_capacity

    result = write_capacity.run("smoke", command="pytest smoke")
    assert [(s["projection"], s["m"]) for s in result["settings"]] == [("direct", 1), ("direct", 4), ("hybrid", 4)]
    tiny_d_model = 64
    assert [s["floats_per_doc"] for s in result["settings"]] == [tiny_d_model, 4 * tiny_d_model,
                                                                 384 + 4 * tiny_d_model]
    for setting in result["settings"]:
        assert [c["step"] for c in setting["curve"]] == [2, 4]
        assert 0 <= setting["capacity"] <= setting["tokens_per_doc"]
        assert setting["betas"] == [0.9, 0.9] and "to_target" in setting
    md = write_capacity.markdown(result)
    assert md.startswith("## (f) Write-phase capacity") and "| `hybrid` | 4 |" in md


def test_carry_pairs_own_and_other_soft_tokens_over_the_same_passages():
    """(l): every passage is scored after its own soft tokens and after another's, through one path: with
    each passage its own partner the two are equal, and the table names the writer with its interval."""
    from bench import carry
    from pqa_core.config import PQAConfig
    from pqa_core.data.loading import load_corpus, sample_data_path, split_passages
    from pqa_core.modeling.builder import build_model
    from pqa_core.modeling.llm import load_llm

    result = carry.run("smoke", command="pytest smoke")
    keywords = result["writers"]["keywords"]
    assert len(keywords["per_passage"]["own"]) == len(keywords["per_passage"]["other"]) == 8
    assert keywords["carried"]["n"] == 8 and keywords["own"] != keywords["none"]
    assert "| keywords |" in carry.markdown(result)
    llm, tokenizer = load_llm("tiny")
    passages = split_passages(load_corpus(sample_data_path("corpus.jsonl"))[:4], tokenizer, 256)
    model = build_model(PQAConfig.from_dict({"model": {"llm": "tiny", "num_memory_tokens": 2}}), passages.documents,
                        (llm, tokenizer), row_tokens=passages.tokens)
    rows = [0, 1, 2, 3]
    targets = {r: list(passages.tokens[r])[:8] for r in rows}
    same = carry.passage_losses(model, rows, targets, {r: r for r in rows}, batch_size=3)
    assert same["own"] == same["other"] and len(same["none"]) == 4
    swapped = carry.passage_losses(model, rows, targets, {0: 1, 1: 0, 2: 3, 3: 2}, batch_size=3)
    assert swapped["own"] == same["own"] and swapped["other"] != same["own"]
    # with no soft tokens, a start token predicts the text's first token: the LLM's own loss on it
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    for row, none in zip(rows, same["none"]):
        ids = torch.tensor([[start] + targets[row]])
        with torch.no_grad():
            plain = model.llm(input_ids=ids, labels=ids.masked_fill(torch.arange(ids.shape[1]) == 0, -100)).loss
        assert none == pytest.approx(float(plain), rel=1e-4)
    with pytest.raises(ValueError, match="nothing precedes the target"):
        ids = torch.tensor([targets[0]])
        model.continuation_logits(None, ids[:, :0], ids[:, :0], ids, torch.ones_like(ids))


def test_coverage_counts_an_answer_only_where_the_kept_text_holds_it():
    """(m): an answer counts when it is a phrase of a gold passage's kept text (any of its rows, normalised as
    SQuAD does); the whole passage holds every answer, and a sentence budget keeps more as it grows."""
    from types import SimpleNamespace

    from bench import coverage

    question = lambda answers, gold: SimpleNamespace(answers=answers, gold_rows=gold)  # noqa: E731
    kept = ["The tower is 300 metres tall.", "Built in 1889 by Eiffel.", "Paris is in France."]
    rows = [[0, 1], [2]]  # passage 0 (the tower) was cut into two rows
    held = coverage.answer_held(kept, [question(["the Eiffel"], [0]), question(["1889 by"], [0]),
                                       question(["France"], [0]), question(["France", "x"], [1]),
                                       question(["metres tall"], [1]), question(["tower is 300"], [0])], rows)
    assert held == [1.0, 1.0, 0.0, 1.0, 0.0, 1.0]  # "the Eiffel": articles dropped; France is not the tower's
    result = coverage.run("smoke", command="pytest smoke")
    for split in ("question", "article"):
        cells = result["answer_held"][split]
        assert cells["whole passage"]["percent"] == 100.0
        sentences = [cells[f"sentences m={m}"]["percent"] for m in result["params"]["m"]]
        assert sentences == sorted(sentences) and sentences[0] < sentences[-1] < 100.0
    assert "| sentences m=32 |" in coverage.markdown(result)
    # (a)'s rows split by coverage: each group's own mean, a row missing a question left out of that split
    quality = {"rows": {"pqa": {"per_question": {"a": {"f1": 1.0}, "b": {"f1": 0.5}, "c": {"f1": 0.0}},
                                "new": {"per_question": {"x": {"f1": 1.0}}}},
                        "partial": {"per_question": {"a": {"f1": 1.0}}}}}
    by = coverage.f1_by_coverage(quality, {"question": {"a": 1.0, "b": 0.0, "c": 0.0}, "article": {"x": 0.0}})
    assert by == {"pqa": {"question": {"held": {"n": 1, "F1": 100.0}, "not held": {"n": 2, "F1": 25.0}},
                          "article": {"held": {"n": 0, "F1": None}, "not held": {"n": 1, "F1": 100.0}}}}


def test_the_text_rag_ratio_goal_is_read_with_its_paired_interval():
    """(a)'s 0.8-of-text-RAG goal carries a paired-bootstrap interval of the ratio on each split: tight where
    pqa scores a steady share of text RAG's F1 on every question, wide where its scores scatter."""
    from bench import quality

    steady = {f"q{i}": {"f1": 0.4 + 0.1 * (i % 2)} for i in range(200)}
    rag = {f"q{i}": {"f1": 0.5 + 0.125 * (i % 2)} for i in range(200)}  # pqa = 0.8 x rag on each question
    scattered = {f"n{i}": {"f1": float(i % 3 == 0)} for i in range(60)}
    rag_new = {f"n{i}": {"f1": 0.5} for i in range(60)}

    def row(per_question, new):
        mean = lambda pq: 100 * sum(r["f1"] for r in pq.values()) / len(pq)  # noqa: E731
        return {"metrics": {"F1": mean(per_question)}, "per_question": per_question,
                "new": {"metrics": {"F1": mean(new)}, "per_question": new}}

    rows = {"pqa": row(steady, scattered), "dense_minilm (trained reader)": row(rag, rag_new)}
    goals = quality.goals_of(rows, {}, ["pqa"])
    question, article = goals["rag_ratio"], goals["rag_ratio_article"]
    assert question["value"] == pytest.approx(0.8) and question["high"] - question["low"] < 0.02
    assert question["low"] <= 0.8 <= question["high"] and "[0.80, 0.80]" in question["metric"]
    assert article["value"] == pytest.approx(2 / 3, abs=0.01) and article["high"] - article["low"] > 0.3
    rows["dense_minilm (trained reader)"]["per_question"] = {q: {"f1": 0.0} for q in rag}  # nothing to divide by
    rows["dense_minilm (trained reader)"]["metrics"]["F1"] = 0.0
    nothing = quality.goals_of(rows, {}, ["pqa"])["rag_ratio"]
    assert nothing["value"] is None and nothing["low"] is None and "interval" not in nothing["metric"]
