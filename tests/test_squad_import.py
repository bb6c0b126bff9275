"""`pqa data import-squad`: SQuAD JSON -> corpus + deterministic train/dev/test splits."""
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pqa_core.data.loading import load_corpus, load_qa
from pqa_core.errors import DataError, UsageError
from pqa_core.data.squad import assign_splits, convert_squad, import_squad, read_squad
from pqa_experiments.cli.data import data as data_cli

SQUAD_DIR = Path(__file__).resolve().parent.parent / ".." / "shared" / "data" / "squad_v1.1"
OUT_FILES = ("corpus.jsonl", "qa_train.jsonl", "qa_dev.jsonl", "qa_test.jsonl", "import.json")


def make_squad(n_articles=6, paragraphs=3, questions=5, version="1.1"):
    """A small well-formed SQuAD file: every answer is a span of its context."""
    data = []
    for a in range(n_articles):
        paras = []
        for p in range(paragraphs):
            context = f"Article {a} passage {p} says the answer is word{a}_{p} and more."
            qas = [{"id": f"q{a}-{p}-{q}", "question": f"What does passage {p} of article {a} say ({q})?",
                    "answers": [{"text": f"word{a}_{p}", "answer_start": context.index(f"word{a}_{p}")},
                                {"text": f"word{a}_{p}", "answer_start": context.index(f"word{a}_{p}")},
                                {"text": "the answer", "answer_start": context.index("the answer")}]}
                   for q in range(questions)]
            paras.append({"context": context, "qas": qas})
        data.append({"title": f"Article_{a}", "paragraphs": paras})
    return {"version": version, "data": data}


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def read_jsonl(path: Path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_conversion_format_and_loadable(tmp_path):
    src = write_json(tmp_path / "squad.json", make_squad())
    summary = import_squad(src, tmp_path / "out", mode="article", dev_fraction=0.2, test_fraction=0.2, seed=1)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(OUT_FILES)
    corpus = load_corpus(out / "corpus.jsonl")
    assert [d.doc_id for d in corpus] == list(range(18))
    assert corpus[4].title == "Article_1" and corpus[4].text.startswith("Article 1 passage 1")
    rows = read_jsonl(out / "qa_train.jsonl")
    assert rows[0]["answers"] == [rows[0]["answers"][0], "the answer"]  # deduplicated, first-seen order
    total = 0
    for split in ("train", "dev", "test"):
        examples = load_qa(out / f"qa_{split}.jsonl", corpus)
        assert len(examples) == summary["questions"][split]
        total += len(examples)
    assert total == 90
    assert summary["questions"]["train"] == 60 and summary["articles_per_split"] == {"train": 4, "dev": 1, "test": 1}
    assert json.loads((out / "import.json").read_text()) == summary


def test_article_split_holds_out_whole_articles_deterministically(tmp_path):
    data = convert_squad(make_squad(n_articles=20))
    splits = assign_splits(data, "article", dev_fraction=0.1, test_fraction=0.15, seed=0)
    article_split = {}
    for q, s in zip(data.questions, splits):
        article = data.article_of_doc[q["gold_doc_ids"][0]]
        assert article_split.setdefault(article, s) == s  # one split per article
    assert sorted(article_split.values()).count("test") == 3 and list(article_split.values()).count("dev") == 2
    assert assign_splits(data, "article", 0.1, 0.15, seed=0) == splits
    assert assign_splits(data, "article", 0.1, 0.15, seed=1) != splits


def test_question_split_keeps_every_passage_in_train(tmp_path):
    data = convert_squad(make_squad(n_articles=10, paragraphs=4, questions=7))
    splits = assign_splits(data, "question", dev_fraction=0.2, test_fraction=0.2, seed=3)
    by_doc = {}
    for q, s in zip(data.questions, splits):
        by_doc.setdefault(q["gold_doc_ids"][0], []).append(s)
    for doc, s in by_doc.items():
        assert "train" in s
        assert s.count("test") in (1, 2) and s.count("dev") in (1, 2)  # floor/ceil of 0.2 * 7
    n = len(splits)
    assert abs(splits.count("test") / n - 0.2) < 0.05 and abs(splits.count("dev") / n - 0.2) < 0.05
    assert assign_splits(data, "question", 0.2, 0.2, seed=3) == splits


def test_question_split_never_empties_a_passage():
    data = convert_squad(make_squad(n_articles=3, paragraphs=2, questions=2))
    splits = assign_splits(data, "question", dev_fraction=0.45, test_fraction=0.5, seed=0)
    for d in range(6):
        assert "train" in [s for q, s in zip(data.questions, splits) if q["gold_doc_ids"] == [d]]


def test_same_input_same_bytes(tmp_path):
    src = write_json(tmp_path / "squad.json", make_squad())
    for name in ("a", "b"):
        import_squad(src, tmp_path / name, mode="question", dev_fraction=0.2, test_fraction=0.2, seed=5)
    for f in OUT_FILES:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_squad_v2_unanswerable_questions_are_skipped_and_counted(tmp_path):
    squad = make_squad(n_articles=3, version="v2.0")
    qas = squad["data"][0]["paragraphs"][0]["qas"]
    qas[0].update(is_impossible=True, answers=[], plausible_answers=[{"text": "x", "answer_start": 0}])
    qas[1]["is_impossible"] = False
    qas[2]["question"] = "   "
    src = write_json(tmp_path / "v2.json", squad)
    summary = import_squad(src, tmp_path / "out", mode="question", dev_fraction=0.2, test_fraction=0.2)
    assert summary["skipped"] == {"empty_question": 1, "unanswerable": 1}
    assert sum(summary["questions"].values()) == 3 * 3 * 5 - 2
    assert summary["squad_version"] == "v2.0"


@pytest.mark.parametrize("mutate, path, message", [
    (lambda s: s.pop("data"), "$", "missing field 'data'"),
    (lambda s: s.__setitem__("data", {}), "$.data", "expected an array of articles, got object"),
    (lambda s: s["data"][1].pop("title"), "$.data[1]", "missing field 'title'"),
    (lambda s: s["data"][1]["paragraphs"][2].__setitem__("context", 7), "$.data[1].paragraphs[2].context",
     "expected a string, got integer"),
    (lambda s: s["data"][0]["paragraphs"][1]["qas"][3]["answers"][0].__setitem__("text", None),
     "$.data[0].paragraphs[1].qas[3].answers[0].text", "expected a string, got null"),
    (lambda s: s["data"][0]["paragraphs"][1]["qas"][3].__setitem__("answers", []),
     "$.data[0].paragraphs[1].qas[3].answers",
     "no non-empty answer text (and the question is not marked is_impossible)"),
    (lambda s: s["data"][2]["paragraphs"][0]["qas"][0].__setitem__("id", "q0-0-0"),
     "$.data[2].paragraphs[0].qas[0].id", "duplicate question id 'q0-0-0' (first at $.data[0].paragraphs[0].qas[0])"),
    (lambda s: s["data"][0]["paragraphs"][0]["qas"][0].__setitem__("is_impossible", "no"),
     "$.data[0].paragraphs[0].qas[0].is_impossible", "expected true or false, got string"),
])
def test_bad_input_names_file_and_json_path(tmp_path, mutate, path, message):
    squad = make_squad(n_articles=3)
    mutate(squad)
    src = write_json(tmp_path / "bad.json", squad)
    with pytest.raises(DataError) as info:
        read_squad(src)
    assert str(info.value) == f"{src}: {path}: {message}"


def test_cli_bad_input_one_line_nonzero_exit_nothing_written(tmp_path):
    src = tmp_path / "broken.json"
    src.write_text('{"data": [', encoding="utf-8")
    out = tmp_path / "out"
    result = CliRunner().invoke(data_cli, ["import-squad", str(src), str(out)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {src}: invalid JSON:"), result.output
    assert not out.exists()
    result = CliRunner().invoke(data_cli, ["import-squad", str(tmp_path / "missing.json"), str(out)])
    assert result.exit_code == 1 and "missing.json: cannot open" in result.output


def test_cli_imports_and_reports(tmp_path):
    src = write_json(tmp_path / "squad.json", make_squad())
    out = tmp_path / "out"
    result = CliRunner().invoke(data_cli, ["import-squad", str(src), str(out), "--split-mode", "question",
                                           "--dev-fraction", "0.2", "--test-fraction", "0.2", "--seed", "2"])
    assert result.exit_code == 0, result.output
    assert "18 passages from 6 articles" in result.output
    assert json.loads((out / "import.json").read_text())["split_mode"] == "question"
    result = CliRunner().invoke(data_cli, ["import-squad", str(src), str(out), "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["split_mode"] == "article"


def test_bad_fractions_are_usage_errors(tmp_path):
    src = write_json(tmp_path / "squad.json", make_squad(n_articles=2))
    with pytest.raises(UsageError):
        import_squad(src, tmp_path / "o", dev_fraction=0.5, test_fraction=0.5)
    with pytest.raises(UsageError, match="cannot give"):
        import_squad(src, tmp_path / "o", mode="article", dev_fraction=0.1, test_fraction=0.1)
    result = CliRunner().invoke(data_cli, ["import-squad", str(src), str(tmp_path / "o"), "--dev-fraction", "1.5"])
    assert result.exit_code == 2 and "dev_fraction=1.5" in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not (SQUAD_DIR / "corpus.jsonl").exists(), reason="shared SQuAD sample not present")
def test_real_squad_round_trip_gives_the_shared_files(tmp_path):
    """Rebuild SQuAD JSON from shared/data/squad_v1.1, import it: the same corpus bytes and questions."""
    corpus = read_jsonl(SQUAD_DIR / "corpus.jsonl")
    qa_bytes = (SQUAD_DIR / "qa.jsonl").read_bytes()
    by_doc = {}
    for q in read_jsonl(SQUAD_DIR / "qa.jsonl"):
        by_doc.setdefault(q["gold_doc_ids"][0], []).append(q)
    articles = []
    for doc in corpus:
        if not articles or articles[-1]["title"] != doc["title"]:
            articles.append({"title": doc["title"], "paragraphs": []})
        articles[-1]["paragraphs"].append({"context": doc["text"], "qas": [
            {"id": q["id"], "question": q["question"],
             "answers": [{"text": t, "answer_start": doc["text"].find(t)} for t in q["answers"]]}
            for q in by_doc.get(doc["doc_id"], [])]})
    src = tmp_path / "dev-v1.1-first40.json"
    src.write_text(json.dumps({"version": "1.1", "data": articles}, ensure_ascii=False), encoding="utf-8")
    for mode in ("article", "question"):
        out = tmp_path / mode
        summary = import_squad(src, out, mode=mode, dev_fraction=0.1, test_fraction=0.1, seed=0)
        assert (out / "corpus.jsonl").read_bytes() == (SQUAD_DIR / "corpus.jsonl").read_bytes()
        lines = [line for s in ("train", "dev", "test") for line in (out / f"qa_{s}.jsonl").read_bytes().splitlines(True)]
        assert sorted(lines) == sorted(qa_bytes.splitlines(True))
        assert summary["articles"] == 40 and summary["documents"] == 1733
        counts = summary["questions"]
        if mode == "question":
            assert abs(counts["test"] / 8981 - 0.1) < 0.01 and abs(counts["dev"] / 8981 - 0.1) < 0.01
        else:
            assert summary["articles_per_split"] == {"train": 32, "dev": 4, "test": 4}
