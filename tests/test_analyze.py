"""``pqa analyze`` and ``analyze_predictions``: per question what was read and answered, and the
breakdown of wrong answers into retrieval misses and reading misses, from a file or a stored run."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from pqa_core.evaluation.analysis import analyze_predictions, read_predictions
from pqa_core.data.loading import Document
from pqa_core.errors import DataError

REPO = Path(__file__).resolve().parents[1]

RECORDS = [
    {"id": "q1", "question": "Who?", "answers": ["Ada"], "prediction": "Ada", "selected_ids": [3, 1],
     "gold_doc_ids": [1], "scores": [2.0, 1.5], "em": 1.0, "f1": 1.0},
    {"id": "q2", "question": "Where?", "answers": ["Oslo"], "prediction": "Bergen", "selected_ids": [2, 5],
     "gold_doc_ids": [5], "scores": [0.9, 0.8], "em": 0.0, "f1": 0.0},
    {"id": "q3", "question": "When?", "answers": ["in 1900", "1900"], "prediction": "1901", "selected_ids": [4],
     "gold_doc_ids": [1, 2], "scores": [0.3], "em": 0.0, "f1": 0.0},
    # a control without scores, a legacy file's field name, and no em/f1: computed
    {"id": "q4", "question": "What?", "answers": ["a lamp"], "prediction": "lamp", "selected_ids": [],
     "gold_ids": [4], "scores": None},
]
CORPUS = [Document(i, f"Title {i}", f"text {i}") for i in range(6)]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_each_question_gets_its_outcome_titles_and_scores(tmp_path):
    analysis = analyze_predictions(write_jsonl(tmp_path / "p.jsonl", RECORDS), CORPUS)
    by_id = {q.id: q for q in analysis.questions}
    assert [q.outcome for q in analysis.questions] == ["correct", "reading_miss", "retrieval_miss", "correct"]
    q2 = by_id["q2"]
    assert [(d.id, d.title, d.score, d.gold) for d in q2.selected] == [(2, "Title 2", 0.9, False),
                                                                       (5, "Title 5", 0.8, True)]
    assert q2.gold_titles == ["Title 5"] and q2.prediction == "Bergen" and q2.answers == ["Oslo"]
    assert by_id["q4"].gold_doc_ids == [4] and by_id["q4"].em == 100.0 and by_id["q4"].selected == []
    assert by_id["q1"].em == 100.0 and by_id["q3"].f1 == 0.0
    assert analysis.breakdown == {"questions": 4, "correct": 2, "reading_miss": 1, "retrieval_miss": 1,
                                  "percent": {"correct": 50.0, "reading_miss": 25.0, "retrieval_miss": 25.0}}
    assert [q.id for q in analysis.select(wrong=True)] == ["q2", "q3"]
    assert [q.id for q in analysis.select(outcome="retrieval_miss")] == ["q3"]
    assert [q.id for q in analysis.select(limit=1)] == ["q1"]
    assert not analysis.notes
    assert analyze_predictions(RECORDS[:1]).notes == ["no corpus given: documents are shown by id only"]


def test_a_malformed_predictions_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"question": "x"}) + "\n")
    with pytest.raises(DataError, match=rf"^{path}:2: missing field 'answers'$"):
        read_predictions(path)


def pqa(*args, env=None, check=True):
    full = dict(os.environ, PQA_PROGRESS="0", **(env or {}))
    proc = subprocess.run([sys.executable, "-m", "pqa_experiments.cli.main", *args], capture_output=True, text=True,
                          env=full, timeout=900, cwd=str(REPO))
    if check and proc.returncode != 0:
        raise AssertionError(f"pqa {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def stored_run(embedded_db, tmp_path_factory):
    """One smoke pipeline run recorded in its own database."""
    url = f"{embedded_db.rstrip('/')}/pqa_analyze_{uuid.uuid4().hex[:8]}"
    outputs = tmp_path_factory.mktemp("outputs")
    proc = pqa("run", "pipeline", "--mongo-url", url, "--json", "with", "smoke", env={"PQA_OUTPUT_DIR": str(outputs)})
    reported = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"url": url, "id": str(reported["run_id"]), "result": reported["result"]}


def test_analyze_a_stored_run_prints_questions_and_the_breakdown(stored_run):
    url, run_id = stored_run["url"], stored_run["id"]
    text = pqa("analyze", run_id, "--mongo-url", url, "--limit", "2").stdout
    lines = text.splitlines()
    assert lines[0] == f"run {run_id} (pqa_pipeline), artifact predictions.jsonl"
    assert "  question:   How tall is the lighthouse at Marrowick?" in lines
    assert any(line.startswith("  read:       ") and "(" in line for line in lines)  # titles and scores
    assert any(line.startswith("  gold docs:  0 Marrowick") for line in lines)  # titles from the run's corpus
    assert "2 of 108 matching questions shown (--limit N shows more, --limit 0 all)" in lines
    assert lines[-1].startswith("108 questions: ") and "reading miss (" in lines[-1] and "retrieval miss (" in lines[-1]

    report = json.loads(pqa("analyze", run_id, "--mongo-url", url, "--json").stdout)
    b = report["breakdown"]
    assert b["questions"] == 108 == len(report["questions"]) == b["correct"] + b["reading_miss"] + b["retrieval_miss"]
    assert abs(100 * b["correct"] / 108 - stored_run["result"]["EM"]) < 1e-6
    for q in report["questions"]:
        read_gold = any(d["gold"] for d in q["selected"])
        assert q["outcome"] == ("correct" if q["correct"] else "reading_miss" if read_gold else "retrieval_miss")
        assert len(q["selected"]) == 3 and all(d["title"] for d in q["selected"])
    recall = sum(any(d["gold"] for d in q["selected"]) for q in report["questions"]) / 108  # one gold doc each
    assert abs(100 * recall - stored_run["result"]["Recall@3"]) < 1e-6

    misses = json.loads(pqa("analyze", run_id, "--mongo-url", url, "--json", "--retrieval-miss").stdout)
    assert len(misses["questions"]) == b["retrieval_miss"]
    assert {q["outcome"] for q in misses["questions"]} <= {"retrieval_miss"}
    rows = list(csv.DictReader(io.StringIO(pqa("analyze", run_id, "--mongo-url", url, "--csv", "--wrong",
                                               "-n", "3").stdout)))
    assert len(rows) == min(3, 108 - b["correct"]) and all(r["correct"] == "False" for r in rows)
    assert rows[0]["selected_titles"].count(" | ") == 2 and rows[0]["gold_doc_ids"]


def test_a_run_writes_gold_doc_ids_and_analyze_reads_its_file(stored_run, tmp_path):
    import pymongo
    import gridfs

    client = pymongo.MongoClient(stored_run["url"])
    db = client.get_default_database()
    run = db.runs.find_one({"_id": int(stored_run["id"])})
    artifact = next(a for a in run["artifacts"] if a["name"] == "predictions.jsonl")
    record = json.loads(gridfs.GridFS(db).get(artifact["file_id"]).read().splitlines()[0])
    client.close()
    assert "gold_doc_ids" in record and "gold_ids" not in record
    path = Path(run["info"]["output_dir"]) / "predictions.jsonl"
    out = pqa("analyze", str(path), "--wrong", "-n", "1").stdout
    assert out.splitlines()[0] == str(path) and "note: no corpus given: documents are shown by id only" in out


def test_analyze_bad_input_is_one_line(stored_run, tmp_path):
    proc = pqa("analyze", "999999", "--mongo-url", stored_run["url"], check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        f"Error: no run with id 999999 in database '{stored_run['url'].rsplit('/', 1)[1]}'"]
    proc = pqa("analyze", str(tmp_path / "missing.jsonl"), check=False)
    assert proc.returncode == 2 and "is neither a run id nor a predictions file" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("field, value, message", [
    ("f1", "abc", "field 'f1' = 'abc': must be a number in [0, 1]"),
    ("em", 7, "field 'em' = 7: must be a number in [0, 1]"),
    ("f1", -50, "field 'f1' = -50: must be a number in [0, 1]"),
    ("em", True, "field 'em' = True: must be a number in [0, 1]"),
    ("scores", ["high", 1.0], "field 'scores' must be a list of numbers, one per selected document (2)"),
    ("scores", [1.0], "field 'scores' must be a list of numbers, one per selected document (2)"),
])
def test_analyze_a_file_with_bad_field_types_or_values_is_one_line(tmp_path, field, value, message):
    """Issue 19: ``"f1": "abc"`` was a 37-line traceback; em=7, f1=-50 were shown as EM 700 F1 -5000."""
    path = write_jsonl(tmp_path / "p.jsonl", [RECORDS[1], {**RECORDS[0], field: value}])
    proc = pqa("analyze", str(path), check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [f"Error: {path}:2: {message}"], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
