"""The ``pqa`` command line as users run it: a subprocess per command, a real embedded
MongoDB (SecantusDB), and pymongo to check what was stored."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pqa(*args, env_extra=None, timeout=900, check=True):
    env = dict(os.environ, PQA_PROGRESS="0", PYTHONUNBUFFERED="1")
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, "-m", "pqa_experiments.cli.main", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=env.get("PQA_TEST_CWD", str(REPO)))
    if check and proc.returncode != 0:
        raise AssertionError(f"pqa {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def db_url(embedded_db):
    """The embedded server with a database of this test's own (the URL path names it)."""
    name = f"pqa_cli_{uuid.uuid4().hex[:8]}"
    return embedded_db.rstrip("/") + "/" + name, name


@pytest.fixture
def outputs(tmp_path):
    return {"PQA_OUTPUT_DIR": str(tmp_path / "outputs")}


SMOKE = ["with", "smoke"]


def test_demo_pipeline_is_recorded_in_mongodb(db_url, outputs, mongo_client, tmp_path):
    """The README demo (SmolLM2-135M on the sample), shortened to one write epoch and one read epoch on 16 of
    its training questions, scored once (by the eval phase) on 9 of the held-out questions, answers of at most
    8 tokens: what is checked here is the record, not the score (``pqa demo`` scores all of them)."""
    url, name = db_url
    from pqa_core.data.loading import sample_data_path
    for file_name, kept in (("qa_train.jsonl", 16), ("qa_eval.jsonl", 9)):  # 2 read steps of 8; 9 answers scored
        lines = sample_data_path(file_name).read_text().splitlines(keepends=True)
        (tmp_path / file_name).write_text("".join(lines[:kept]))
    # one torch thread: with other processes on a 2-core machine a 2-thread step stalls at every barrier
    proc = pqa("run", "pipeline", "--mongo-url", url, "--json", "with", "write.epochs=1", "read.epochs=1",
               "read.eval_every=0", "write.eval_docs=4", "eval.max_new_tokens=8", "threads=1", f"data.qa={tmp_path / 'qa_train.jsonl'}",
               f"data.eval_qa={tmp_path / 'qa_eval.jsonl'}", env_extra=outputs, timeout=1800)
    reported = json.loads(proc.stdout.strip().splitlines()[-1])
    db = mongo_client[name]
    run = db.runs.find_one({"_id": reported["run_id"]})
    assert run["status"] == "COMPLETED"
    assert run["config"]["model"]["llm"] == "smollm2-135m" and run["config"]["threads"] == 1
    assert run["config"]["selector"] == {"name": "cosine", "temperature": 0.05}
    assert {"EM", "F1", "substring", "Recall@3", "questions", "EM_ci95_low", "EM_ci95_high"} <= set(run["result"])
    assert set(run["result"]) == set(reported["result"])
    metrics = {m["name"]: m for m in db.metrics.find({"run_id": run["_id"]})}
    assert metrics["write.loss"]["steps"] == list(range(1, 6))  # 36 docs / batch 8 = 5 steps x 1 epoch
    assert len(metrics["read.total_loss"]["steps"]) == 2  # 16 questions / batch 8
    assert run["result"]["questions"] == 9
    assert "write.greedy_token_acc" in metrics and "eval.F1" in metrics
    artifacts = {a["name"]: a for a in run["artifacts"]}
    predictions = db["fs.files"].find_one({"_id": artifacts["predictions.jsonl"]["file_id"]})
    assert predictions["length"] > 9 * 50  # a JSON line per answer
    assert {Path(r[0]).name for r in run["resources"]} == {"corpus.jsonl", "qa_train.jsonl", "qa_eval.jsonl"}
    assert Path(run["info"]["checkpoints"]["read"]).joinpath("MANIFEST.json").exists()
    assert run["info"]["data"]["corpus"]["sha256"]
    assert run["experiment"]["name"] == "pqa_pipeline"


def test_pqa_demo_records_pqa_and_a_trained_closed_book_reader_and_pairs_them(db_url, outputs, mongo_client):
    """``pqa demo`` (here on the tiny model): two stored runs on the same questions, the paired tests, and the
    next commands naming the runs."""
    url, name = db_url
    proc = pqa("demo", "--mongo-url", url, "--json", "with", "smoke", env_extra=outputs)
    shown = json.loads(proc.stdout.strip().splitlines()[-1])
    runs = mongo_client[name].runs
    pqa_run, control = runs.find_one({"_id": shown["pqa"]["run_id"]}), runs.find_one({"_id": shown["closed_book"]["run_id"]})
    assert pqa_run["experiment"]["name"] == "pqa_pipeline" and pqa_run["status"] == "COMPLETED"
    assert control["config"]["control"]["name"] == "closed_book" and control["status"] == "COMPLETED"
    assert control["config"]["phases"] == ["control_read", "control"]  # its own reader, trained
    assert control["config"]["read"] == pqa_run["config"]["read"]  # ... the same way
    paired = shown["paired"]["F1"]
    assert paired["n"] == pqa_run["result"]["questions"] == control["result"]["questions"]
    assert paired["mean_a"] * 100 == pytest.approx(pqa_run["result"]["F1"])
    assert paired["low"] <= paired["difference"] <= paired["high"] and 0 < paired["p_value"] <= 1
    text = pqa("demo", "--no-db", "with", "smoke", env_extra=outputs).stdout
    assert "pqa - closed-book on the same questions" in text and "F1: " in text and "p=" in text


def test_two_runs_differing_by_selector_are_compared_side_by_side(db_url, outputs):
    url, _ = db_url
    ids = []
    for selector in ("cosine", "dot"):
        proc = pqa("run", "pipeline", "--mongo-url", url, "--json", *SMOKE, f"selector.name={selector}",
                   env_extra=outputs)
        ids.append(str(json.loads(proc.stdout.strip().splitlines()[-1])["run_id"]))
    table = json.loads(pqa("runs", "compare", *ids, "--mongo-url", url, "--json").stdout)
    assert table["config"]["selector.name"] == ["cosine", "dot"]
    assert set(table["result"]) >= {"EM", "F1", "substring", "Recall@3"}
    assert all(len(values) == 2 for values in table["result"].values())
    text = pqa("runs", "compare", *ids, "--mongo-url", url).stdout
    assert "selector.name" in text and "cosine" in text and "dot" in text


def test_password_in_url_is_never_stored(embedded_db, outputs, mongo_client):
    name = f"pqa_secret_{uuid.uuid4().hex[:8]}"
    password = "S3cr3t-" + uuid.uuid4().hex
    mongo_client.admin.command("createUser", "pqa_user", pwd=password, roles=["root"])
    try:
        host = embedded_db.split("://", 1)[1].rstrip("/")
        url = f"mongodb://pqa_user:{password}@{host}/{name}?authSource=admin"
        proc = pqa("run", "pipeline", "--mongo-url", url, *SMOKE, env_extra=outputs)
        assert password not in proc.stdout + proc.stderr
        db = mongo_client[name]
        assert db.runs.count_documents({}) == 1
        for collection in db.list_collection_names():
            for document in db[collection].find():
                assert password not in json.dumps(document, default=str), collection
                assert password.encode() not in json.dumps(document, default=str).encode()
        for chunk in db["fs.chunks"].find():
            assert password.encode() not in bytes(chunk["data"])
        # nor in what the run wrote locally: checkpoints (their state.json holds the config), predictions
        written = [p for p in Path(outputs["PQA_OUTPUT_DIR"]).rglob("*") if p.is_file()]
        assert any(p.name == "state.json" for p in written) and any(p.name == "predictions.jsonl" for p in written)
        for path in written:
            assert password.encode() not in path.read_bytes(), path
    finally:
        mongo_client.admin.command("dropUser", "pqa_user")


def test_pip_installed_plugin_is_listed_and_usable_by_name(tmp_path, db_url, outputs, mongo_client):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(REPO / "examples" / "pqa-plugin-example")],
                   check=True, capture_output=True, timeout=300)
    env = dict(outputs, PYTHONPATH=os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]))
    listing = json.loads(pqa("plugins", "--json", env_extra=env).stdout)
    plugin = next(p for p in listing if p["name"] == "l2_selector")
    assert plugin["components"] == {"selector": ["l2"]} and plugin["version"] == "0.1.0"
    assert "l2_selector" not in pqa("plugins", env_extra=dict(env, PQA_LOAD_PLUGINS="")).stdout

    url, name = db_url
    proc = pqa("run", "pipeline", "--mongo-url", url, "--json", *SMOKE, "selector.name=l2",
               "selector.temperature=2.0", env_extra=env)
    reported = json.loads(proc.stdout.strip().splitlines()[-1])
    assert reported["result"]["Recall@3"] >= 0
    used = mongo_client[name].runs.find_one({"_id": reported["run_id"]})["info"]["components"]
    source = hashlib.sha256((target / "pqa_l2_selector" / "__init__.py").read_bytes()).hexdigest()
    assert used["selector"] == {"name": "l2", "plugin": "l2_selector", "package": "pqa-l2-selector",
                                "version": "0.1.0", "module": "pqa_l2_selector", "source_sha256": source}
    projection = hashlib.sha256((REPO / "plugins" / "projections.py").read_bytes()).hexdigest()
    assert used["projection"] == {"name": "hybrid", "plugin": "pqa_plugins.projections", "package": "pqa",
                                  "version": "0.1.0", "module": "pqa_plugins.projections", "source_sha256": projection}


@pytest.mark.parametrize("args, message", [
    (["with", "smoke", "selector.name=nope"], "unknown selector 'nope'; available: bilinear, cosine, dot, mlp"),
    (["with", "smoke", "projection.name=nope"], "unknown projection 'nope'; available: direct, hybrid, linear, "
                                                "mlp2x_gelu"),
    (["with", "smoke", "selector.temp=2"], "selector 'cosine' got unexpected parameter 'temp'; did you mean "
                                             "'temperature'? accepted: temperature"),
    (["with", "smoke", "read.topk=2"], "unknown config key 'read.topk'; did you mean 'read.top_k'?"),
    (["with", "no_such_named_config"], "unknown named config 'no_such_named_config'"),
    (["with", "read.top_k='x'"], "config key 'read.top_k' must be an integer >= 1, got 'x'"),
    (["with", "smoke", "selector.temperature=abc"], "selector 'cosine': parameter 'temperature' must be float, "
                                                    "got 'abc' (str)"),
    (["with", "smoke", "model.content_init=words"], "config key 'model.content_init' = 'words': must be one of "
                                                    "auto, writer, keywords, zero"),
    (["with", "smoke", "projection.name=mlp2x_gelu", "model.content_init=keywords"],
     "model.content_init='keywords' needs z to hold num_memory_tokens x d_model"),
    (["with", "smoke", "writer.name=encoder", "projection.name=linear"],
     "writer.name='encoder' writes each document's soft tokens into z, but projection 'linear'"),
    (["with", "smoke", "eval.index=annoy"], "config key 'eval.index' = 'annoy': must be one of exact, "
                                            "faiss_flat, faiss_ivf, faiss_hnsw"),
])
def test_usage_errors_are_one_line_exit_2_and_store_nothing(db_url, outputs, mongo_client, args, message):
    url, name = db_url
    proc = pqa("run", "pipeline", "--mongo-url", url, *args, env_extra=outputs, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert mongo_client[name].runs.count_documents({}) == 0
    assert not Path(outputs["PQA_OUTPUT_DIR"]).exists()


def test_unreachable_database_fails_before_training(outputs, tmp_path):
    from conftest import free_port

    url = f"mongodb://someone:hunter2hunter2@127.0.0.1:{free_port()}/x?serverSelectionTimeoutMS=500"
    proc = pqa("run", "pipeline", "--mongo-url", url, *SMOKE, env_extra=outputs, check=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: cannot reach MongoDB at mongodb://***:***@127.0.0.1:"), lines
    assert "hunter2hunter2" not in proc.stderr + proc.stdout and "Traceback" not in proc.stderr
    assert not Path(outputs["PQA_OUTPUT_DIR"]).exists()


def test_print_config_and_help():
    config = pqa("run", "pipeline", "print_config", "with", "selector_mlp", "--no-db").stdout
    assert "hidden = 256" in config and "name = 'mlp'" in config
    shown = pqa("run", "pipeline", "print_config", "with", "selector.temp=2", "--no-db", check=False)
    assert "temp = 2" in shown.stdout and shown.returncode == 2  # shown, then refused as a run would be
    assert shown.stderr.splitlines()[-1] == "Error: selector 'cosine' got unexpected parameter 'temp'; did you mean 'temperature'? " \
                                           "accepted: temperature"
    for command in ([], ["run"], ["runs"], ["db"], ["board"], ["plugins"]):
        assert "Usage:" in pqa(*command, "--help").stdout
