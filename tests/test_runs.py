"""``pqa runs`` and ``pqa_experiments.store.runs`` against a real SecantusDB, with runs written by a
real (tiny, model-free) Sacred experiment through Sacred's own MongoObserver."""
from __future__ import annotations

import csv
import io
import json
import socket
import uuid

import pytest
from click.testing import CliRunner

from pqa_experiments.store import runs as runs_lib
from pqa_experiments.cli.runs import runs

EM = {"dot": 12.5, "cosine": 30.0}

pytestmark = pytest.mark.filterwarnings("ignore:pkg_resources is deprecated")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def store(embedded_db, tmp_path_factory):
    """A database of its own (the daemon is shared) holding three runs of a tiny Sacred
    experiment: selector dot, selector cosine, and one that fails."""
    from sacred import Experiment
    from sacred.observers import MongoObserver

    db_name = f"pqa_test_runs_{uuid.uuid4().hex[:8]}"
    folder = tmp_path_factory.mktemp("artifacts")
    predictions = {}
    for name, right in (("dot", 12), ("cosine", 30)):  # the same 50 questions; cosine answers 18 more right
        predictions[name] = folder / f"{name}.jsonl"
        predictions[name].write_text("".join(json.dumps({"id": f"q{i}", "em": float(i < right), "f1": float(i < right),
                                                         "substring": float(i < right)}) + "\n" for i in range(50)))

    ex = Experiment("tiny_runs", save_git_info=False)

    @ex.config
    def config():
        selector = {"name": "dot"}  # noqa: F841 - Sacred reads the local names
        read = {"top_k": 3}  # noqa: F841

    @ex.main
    def main(selector, read, _run):
        if selector["name"] == "broken":
            raise RuntimeError("selector exploded")
        for step in range(4):
            _run.log_scalar("train.loss", 1.0 / (step + 1), step)
        _run.log_scalar("eval.EM", EM[selector["name"]], 3)
        _run.info["note"] = f"selector {selector['name']}"
        _run.add_artifact(str(predictions[selector["name"]]), name="predictions.jsonl")
        return {"EM": EM[selector["name"]], "F1": EM[selector["name"]] + 5, f"Recall@{read['top_k']}": 88.0}

    observer = MongoObserver(url=embedded_db, db_name=db_name)
    ex.observers.append(observer)
    options = {"--capture": "no", "--loglevel": "ERROR"}
    dot = ex.run(options=options)
    cosine = ex.run(config_updates={"selector": {"name": "cosine"}}, options=options)
    with pytest.raises(RuntimeError):
        ex.run(config_updates={"selector": {"name": "broken"}}, options=options)
    observer.runs.database.client.close()
    ids = {"dot": dot._id, "cosine": cosine._id, "broken": cosine._id + 1}
    db = runs_lib.open_database(embedded_db, db_name)
    assert db.runs.find_one({"_id": ids["broken"]})["status"] == "FAILED"
    yield {"url": embedded_db, "db_name": db_name, "ids": ids, "db": db}
    db.client.drop_database(db_name)
    db.client.close()


def cli(store, *args):
    """Run ``pqa runs --mongo-url URL --db-name NAME *args``."""
    result = CliRunner().invoke(runs, ["--mongo-url", store["url"], "--db-name", store["db_name"], *args],
                                catch_exceptions=False)
    return result


def cli_json(store, *args):
    result = cli(store, *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


# --------------------------------------------------------------------------- pqa runs list


def test_list_json_shows_every_run_newest_first(store):
    ids = store["ids"]
    listed = cli_json(store, "list")
    assert [r["id"] for r in listed] == [ids["broken"], ids["cosine"], ids["dot"]]
    by_id = {r["id"]: r for r in listed}
    assert by_id[ids["dot"]]["config"]["selector.name"] == "dot"
    assert by_id[ids["cosine"]]["config"]["selector.name"] == "cosine"
    assert by_id[ids["cosine"]]["result"] == {"EM": 30.0, "F1": 35.0, "Recall@3": 88.0}
    assert by_id[ids["dot"]]["status"] == "COMPLETED"
    assert by_id[ids["broken"]]["status"] == "FAILED"
    assert by_id[ids["dot"]]["experiment"] == "tiny_runs"
    assert by_id[ids["dot"]]["duration_s"] >= 0
    assert by_id[ids["dot"]]["start_time"].endswith("+00:00")


def test_list_where_filters_on_config(store):
    ids = store["ids"]
    assert [r["id"] for r in cli_json(store, "list", "--where", "selector.name=cosine")] == [ids["cosine"]]
    # "3" is typed like Sacred's `with read.top_k=3`: it matches the integer 3
    assert len(cli_json(store, "list", "--where", "read.top_k=3")) == 3
    assert cli_json(store, "list", "--where", "read.top_k=4") == []
    both = cli_json(store, "list", "--where", "selector.name=dot", "--where", "selector.name=cosine")
    assert {r["id"] for r in both} == {ids["dot"], ids["cosine"]}
    combined = cli_json(store, "list", "--where", "selector.name=dot", "--where", "read.top_k=3")
    assert [r["id"] for r in combined] == [ids["dot"]]


def test_list_status_experiment_and_limit(store):
    ids = store["ids"]
    assert [r["id"] for r in cli_json(store, "list", "--status", "failed")] == [ids["broken"]]
    assert len(cli_json(store, "list", "--experiment", "tiny_runs")) == 3
    assert cli_json(store, "list", "--experiment", "other") == []
    assert [r["id"] for r in cli_json(store, "list", "-n", "2")] == [ids["broken"], ids["cosine"]]


def test_list_table_and_csv(store):
    ids = store["ids"]
    table = cli(store, "list")
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0].split()[:5] == ["id", "experiment", "status", "start", "(UTC)"]
    assert ["EM", "F1", "Recall@3"] == lines[0].split()[-3:]
    assert lines[1].split()[0] == str(ids["broken"])
    cosine_line = next(line for line in lines if line.split()[0] == str(ids["cosine"]))
    assert "COMPLETED" in cosine_line and "30.00" in cosine_line and "88.00" in cosine_line

    result = cli(store, "list", "--csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.output)))
    assert [int(r["id"]) for r in rows] == [ids["broken"], ids["cosine"], ids["dot"]]
    assert rows[1]["config.selector.name"] == "cosine" and float(rows[1]["result.EM"]) == 30.0


def test_list_usage_errors_exit_2(store):
    for bad in ("selector.name", "=cosine", "selector..name=x"):
        result = cli(store, "list", "--where", bad)
        assert result.exit_code == 2, (bad, result.output)
        assert "KEY=VALUE" in result.output
    assert cli(store, "list", "--json", "--csv").exit_code == 2
    assert cli(store, "list", "--status", "sleeping").exit_code == 2


# --------------------------------------------------------------------------- pqa runs show


def test_show_json(store):
    ids = store["ids"]
    shown = cli_json(store, "show", str(ids["cosine"]))
    assert shown["id"] == ids["cosine"]
    assert shown["status"] == "COMPLETED"
    assert shown["config"]["selector.name"] == "cosine"
    assert shown["config"]["read.top_k"] == 3
    assert "seed" in shown["config"]
    assert shown["result"] == {"EM": 30.0, "F1": 35.0, "Recall@3": 88.0}
    assert shown["info"] == {"note": "selector cosine"}  # MongoObserver's metric links are dropped
    assert shown["metrics"]["train.loss"] == {"value": 0.25, "step": 3, "points": 4}
    assert shown["metrics"]["eval.EM"]["value"] == 30.0
    assert shown["artifacts"] == ["predictions.jsonl"]


def test_show_text_and_failed_run(store):
    ids = store["ids"]
    result = cli(store, "show", str(ids["cosine"]))
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.startswith(f"run {ids['cosine']}  tiny_runs  COMPLETED")
    for expected in ("selector.name  cosine", "EM        30.00", "note  selector cosine",
                     "train.loss  0.25 @ 3  (4)", "predictions.jsonl"):
        assert expected in out, expected
    failed = cli(store, "show", str(ids["broken"]))
    assert failed.exit_code == 0
    assert "failure: RuntimeError: selector exploded" in failed.output


def test_unknown_run_id_is_one_line_exit_1(store):
    result = cli(store, "show", "4242")
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: no run with id 4242 in database '{store['db_name']}'"
    compared = cli(store, "compare", str(store["ids"]["dot"]), "4242")
    assert compared.exit_code == 1 and "no run with id 4242" in compared.output
    assert cli(store, "show", "not-a-number").exit_code == 2


# --------------------------------------------------------------------------- pqa runs compare


def test_compare_json_side_by_side(store):
    ids = store["ids"]
    out = cli_json(store, "compare", str(ids["dot"]), str(ids["cosine"]))
    assert out["runs"] == [ids["dot"], ids["cosine"]]
    assert out["config"]["selector.name"] == ["dot", "cosine"]
    assert "read.top_k" not in out["config"]  # equal in both runs
    assert out["result"] == {"EM": [12.5, 30.0], "F1": [17.5, 35.0], "Recall@3": [88.0, 88.0]}
    f1 = out["paired"]["F1"]  # their predictions, paired by question id: dot - cosine
    assert f1["n"] == 50 and f1["difference"] == pytest.approx(-0.36) and f1["significant"] and f1["p_value"] < 0.01
    assert f1["low"] < -0.36 < f1["high"] < 0


def test_compare_text_csv_and_usage(store):
    ids = store["ids"]
    result = cli(store, "compare", str(ids["cosine"]), str(ids["dot"]))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["key", str(ids["cosine"]), str(ids["dot"])]
    assert ["config.selector.name", "cosine", "dot"] in [line.split() for line in lines]
    assert ["result.EM", "30.00", "12.50"] in [line.split() for line in lines]
    assert f"paired on the same questions (run {ids['cosine']} - run {ids['dot']}):" in lines
    assert any(line.strip().startswith("F1: 60.0 vs 24.0, difference +36.0 [") and "significant" in line
               for line in lines)
    rows = list(csv.reader(io.StringIO(cli(store, "compare", str(ids["dot"]), str(ids["cosine"]), "--csv").output)))
    assert rows[0] == ["key", str(ids["dot"]), str(ids["cosine"])]
    assert ["config.selector.name", "dot", "cosine"] in rows
    assert cli(store, "compare", str(ids["dot"])).exit_code == 2
    assert cli(store, "compare", str(ids["dot"]), str(ids["dot"])).exit_code == 2


# --------------------------------------------------------------------------- errors


def test_unreachable_database_is_one_redacted_line():
    port = _free_port()  # nothing listens there
    url = f"mongodb://alice:s3cr3t-pw@127.0.0.1:{port}/?serverSelectionTimeoutMS=300"
    result = CliRunner().invoke(runs, ["list", "--mongo-url", url])
    assert result.exit_code == 1
    assert "s3cr3t-pw" not in result.output and "alice" not in result.output
    assert result.output.count("\n") == 1
    assert result.output.startswith(f"Error: cannot reach MongoDB at mongodb://***:***@127.0.0.1:{port}/")
    with pytest.raises(runs_lib.DatabaseUnavailable):
        runs_lib.runs_dataframe(mongo_url=url)


def test_registered_in_pqa_cli(store):
    main = pytest.importorskip("pqa_experiments.cli.main")
    assert main.cli.commands.get("runs") is runs
    result = CliRunner().invoke(main.cli, ["runs", "show", "4242", "--mongo-url", store["url"],
                                           "--db-name", store["db_name"]])
    assert result.exit_code == 1
    assert "no run with id 4242" in result.output


# --------------------------------------------------------------------------- the Python API


def test_runs_dataframe(store):
    ids = store["ids"]
    frame = runs_lib.runs_dataframe(mongo_url=store["url"], db_name=store["db_name"])
    assert list(frame.columns[:7]) == runs_lib.FIXED_COLUMNS
    assert {"config.selector.name", "config.read.top_k", "config.seed",
            "result.EM", "result.F1", "result.Recall@3"} <= set(frame.columns)
    assert list(frame["id"]) == [ids["broken"], ids["cosine"], ids["dot"]]
    assert (frame["duration_s"] >= 0).all()
    assert str(frame["start_time"].dtype).startswith("datetime64")

    cosine = runs_lib.runs_dataframe(db=store["db"], filters={"selector.name": "cosine"})
    assert list(cosine["id"]) == [ids["cosine"]]
    assert cosine.loc[0, "result.EM"] == 30.0
    typed = runs_lib.runs_dataframe(db=store["db"], filters={"read.top_k": "3"}, status="completed")
    assert sorted(typed["id"]) == [ids["dot"], ids["cosine"]]
    empty = runs_lib.runs_dataframe(db=store["db"], experiment="nope")
    assert empty.empty and list(empty.columns) == runs_lib.FIXED_COLUMNS


def test_get_run_metric_series_and_compare(store):
    ids, db = store["ids"], store["db"]
    run = runs_lib.get_run(db, ids["dot"])
    assert run["config"]["selector"] == {"name": "dot"}
    assert "captured_out" not in run
    with pytest.raises(runs_lib.RunNotFound):
        runs_lib.get_run(db, 4242)

    series = runs_lib.metric_series(db, ids["dot"])
    assert series["train.loss"] == ([0, 1, 2, 3], [1.0, 0.5, 1 / 3, 0.25])
    assert series["eval.EM"] == ([3], [12.5])
    assert runs_lib.metric_series(db, ids["broken"]) == {}

    frame = runs_lib.compare_runs(db, [ids["dot"], ids["cosine"]])
    assert list(frame.columns) == [ids["dot"], ids["cosine"]]
    assert list(frame.loc["config.selector.name"]) == ["dot", "cosine"]
    assert list(frame.loc["result.EM"]) == [12.5, 30.0]
    config_rows = [k for k in frame.index if k.startswith("config.")]
    assert set(config_rows) <= {"config.selector.name", "config.seed"}
    assert frame.index.tolist().index("result.EM") > frame.index.tolist().index("config.selector.name")


def test_continuation_documents_are_merged_in_chunk_order(store):
    """pqa's observer splits long series into ``chunk`` 0, 1, ... documents; inserted here out of order."""
    ids, db = store["ids"], store["db"]
    chunks = [(1, [3, 4], [0.3, 0.4]), (0, [0, 1, 2], [0.0, 0.1, 0.2])]
    db.metrics.insert_many([{"run_id": ids["dot"], "name": "long.series", "chunk": chunk, "n": len(steps),
                             "steps": steps, "values": values, "timestamps": []}
                            for chunk, steps, values in chunks])
    try:
        assert runs_lib.metric_series(db, ids["dot"])["long.series"] == ([0, 1, 2, 3, 4], [0.0, 0.1, 0.2, 0.3, 0.4])
        shown = cli_json(store, "show", str(ids["dot"]))
        assert shown["metrics"]["long.series"] == {"value": 0.4, "step": 4, "points": 5}
    finally:
        db.metrics.delete_many({"run_id": ids["dot"], "name": "long.series"})


def test_coerce_and_parse_where():
    assert runs_lib.coerce_value("5") == 5
    assert runs_lib.coerce_value("0.5") == 0.5
    assert runs_lib.coerce_value("true") is True and runs_lib.coerce_value("False") is False
    assert runs_lib.coerce_value("cosine") == "cosine"
    assert runs_lib.coerce_value("[1, 2]") == [1, 2]
    assert runs_lib.parse_where(["a.b=1", "a.b=x=y", "c="]) == {"a.b": ["1", "x=y"], "c": [""]}
    assert runs_lib.build_query({"read.top_k": "5"}, status="completed", experiment="e") == {
        "config.read.top_k": {"$in": [5, "5"]}, "status": "COMPLETED", "experiment.name": "e"}
    assert runs_lib.build_query({"selector.name": "cosine"}) == {"config.selector.name": "cosine"}


def test_compare_shows_components_whose_code_differs(store):
    """One selector name, another plugin's code: compare shows the components' identities that differ
    (issue 18). Two runs stored here last, so the listings above do not see them."""
    db = store["db"]
    base = max(store["ids"].values()) + 100
    for offset, (package, source) in enumerate((("pqa-a", "a" * 64), ("pqa-b", "b" * 64))):
        db.runs.insert_one({"_id": base + offset, "status": "COMPLETED", "experiment": {"name": "tiny_runs"},
                            "config": {"selector": {"name": "scaledcos"}}, "result": {"EM": 1.0},
                            "info": {"components": {"selector": {"name": "scaledcos", "plugin": package.replace("-", "_"),
                                                                 "package": package, "version": "0.1",
                                                                 "source_sha256": source}}}})
    try:
        out = cli_json(store, "compare", str(base), str(base + 1))
        assert out["config"] == {}  # the same config...
        assert out["components"]["selector.package"] == ["pqa-a", "pqa-b"]  # ...but other code
        assert out["components"]["selector.source_sha256"] == ["a" * 64, "b" * 64]
        assert "selector.version" not in out["components"]
        text = cli(store, "compare", str(base), str(base + 1)).output
        assert "components.selector.package" in text
    finally:
        db.runs.delete_many({"_id": {"$in": [base, base + 1]}})


def test_compare_refuses_to_pair_other_questions_under_the_same_ids(embedded_db):
    """Two runs evaluated on files with the same ids but other questions and answers (issue 19): the
    paired test is refused with a count, not reported on "the same questions"."""
    from sacred import Experiment
    from sacred.observers import MongoObserver

    db_name = f"pqa_test_pairs_{uuid.uuid4().hex[:8]}"
    ex = Experiment("pairs", save_git_info=False)

    @ex.config
    def config():
        topic = "a"  # noqa: F841

    @ex.main
    def main(topic, _run):
        import tempfile

        path = tempfile.mkdtemp() + "/predictions.jsonl"
        with open(path, "w") as f:
            for i in range(8):  # run "b" asked other questions under ids q0..q7 (q0, q1 the same)
                same = topic == "a" or i < 2
                f.write(json.dumps({"id": f"q{i}", "question": f"question {i}" if same else f"other {i}",
                                    "answers": [f"answer {i}"], "em": float(i % 2), "f1": float(i % 2),
                                    "substring": float(i % 2)}) + "\n")
        _run.add_artifact(path, name="predictions.jsonl")
        return {"EM": 50.0}

    observer = MongoObserver(url=embedded_db, db_name=db_name)
    ex.observers.append(observer)
    options = {"--capture": "no", "--loglevel": "ERROR"}
    ids = [ex.run(config_updates={"topic": t}, options=options)._id for t in ("a", "b")]
    observer.runs.database.client.close()
    store = {"url": embedded_db, "db_name": db_name}
    result = cli(store, "compare", str(ids[0]), str(ids[1]))
    assert result.exit_code == 0 and "paired on the same questions" not in result.output, result.output
    assert "no paired test: " in result.output and "were not evaluated on the same questions: 6 of 8 question ids " \
        "have another question text or other gold answers (e.g. ['q2', 'q3'])" in result.output, result.output
    assert list(cli_json(store, "compare", str(ids[0]), str(ids[1]))["paired"]) == ["unavailable"]


def test_list_shows_a_score_with_its_interval_and_a_pretraining_runs_held_out_scores():
    """One cell per score, its 95% interval beside it; a pretraining run's eval_F1 is its F1 column."""
    from pqa_experiments.cli.runs import _listed_scores

    run = {"F1": 8.333, "F1_ci95_low": 1.39, "F1_ci95_high": 16.67, "questions": 36}
    assert _listed_scores(run) == {"F1": "8.33 [1.39, 16.67]", "questions": 36}
    pretraining = {"eval_F1": 12.99, "eval_F1_ci95_low": 9.53, "eval_F1_ci95_high": 16.79, "epoch_loss": 3.49}
    assert _listed_scores(pretraining) == {"F1": "12.99 [9.53, 16.79]", "epoch_loss": 3.49}
    both = {"F1": 20.0, "eval_F1": 10.0}  # a run's own F1 wins; its eval_ score keeps its name
    assert _listed_scores(both) == {"F1": 20.0, "eval_F1": 10.0}
    assert _listed_scores({"F1": 1.0, "note": "x", "done": True}) == {"F1": 1.0}  # only numbers are columns
