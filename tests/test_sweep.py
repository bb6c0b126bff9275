"""``pqa sweep``: a spec expands into the trials it says, a bad spec is one line naming the file and key,
and a sweep on a local Ray instance with 2 workers runs every trial as a tracked run tagged with the
sweep id, reports a failing trial while the others complete, and is shown by ``pqa sweep status`` and
``pqa runs compare --sweep`` (table and parallel-coordinates plot)."""
from __future__ import annotations

import json
import textwrap

import pytest

from pqa_core.errors import UsageError
from pqa_experiments.sweeps.spec import load_spec, parse_spec

from test_cli import db_url, outputs, pqa  # noqa: F401  (fixtures)


def test_grid_times_samples_in_written_order_with_seeded_draws():
    spec = parse_spec({
        "with": ["smoke"],
        "grid": {"selector.name": ["dot", "cosine"], "read.top_k": [1, 3, 5]},
        "random": {"samples": 2, "seed": 7, "params": {"read.lr_z": {"loguniform": [1e-5, 1e-3]},
                                                       "model.num_memory_tokens": {"randint": [1, 2]},
                                                       "write.lr_z": {"choice": [0.1, 0.2]}}},
    })
    trials = spec.trials()
    assert len(trials) == 2 * 3 * 2
    assert [(t.params["selector.name"], t.params["read.top_k"]) for t in trials[:4]] == [
        ("dot", 1), ("dot", 1), ("dot", 3), ("dot", 3)]  # the last key varies fastest, each point `samples` times
    assert all(1e-5 <= t.params["read.lr_z"] <= 1e-3 and t.params["model.num_memory_tokens"] in (1, 2)
               for t in trials)
    assert len({t.params["read.lr_z"] for t in trials}) == len(trials)  # fresh draws per trial
    assert [t.params for t in spec.trials()] == [t.params for t in trials]  # seeded
    assert trials[0].items[:1] == ["smoke"] and "selector.name='dot'" in trials[0].items
    assert spec.swept_keys == ["selector.name", "read.top_k", "read.lr_z", "model.num_memory_tokens", "write.lr_z"]


@pytest.mark.parametrize("text, message", [
    ("grid:\n  read.top_k: [1, 2\n", "sweep.yaml:3: not valid YAML"),
    ("grdi: {}\n", "sweep.yaml: unknown key 'grdi'; known: experiment, with, grid, random, metric"),
    ("grid:\n  read.top_k: 3\n", "sweep.yaml: grid.read.top_k: expected a non-empty list of values, got 3"),
    ("experiment: train\n", "sweep.yaml: experiment: 'train' is not one of pretrain, write, read, eval, pipeline, control"),
    ("random:\n  params:\n    read.lr_z: {loguniform: [0, 1]}\n",
     "sweep.yaml: random.params.read.lr_z: loguniform: expected low > 0, got 0"),
    ("random:\n  params:\n    read.lr_z: {normal: [0, 1]}\n",
     "sweep.yaml: random.params.read.lr_z: unknown distribution 'normal'; known: choice, uniform, loguniform"),
    ("random:\n  samples: 0\n", "sweep.yaml: random.samples: expected an integer >= 1, got 0"),
])
def test_a_bad_spec_is_one_line_naming_the_file_and_key(tmp_path, text, message):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(text)
    with pytest.raises(UsageError) as caught:
        load_spec(spec)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_sweep_on_two_workers_stores_every_trial_and_reports_the_failing_one(tmp_path, db_url, outputs,  # noqa: F811
                                                                                mongo_client):
    pytest.importorskip("ray", reason="Ray not installed (pip install 'pqa[sweep]')")
    url, name = db_url
    spec = tmp_path / "sweep.yaml"
    spec.write_text(textwrap.dedent("""
        experiment: pipeline
        with: [smoke, "phases=['eval']", query_encoder.name=llm_mean, eval.max_new_tokens=2, read.top_k=1]
        grid:
          selector.temperature: [-1.0, 0.05]   # the first trial's selector refuses it at its pre-flight
        metric: Recall@1
    """))
    proc = pqa("sweep", str(spec), "--workers", "2", "--mongo-url", url, "--json", env_extra=outputs, check=False)
    assert proc.returncode == 1, proc.stderr
    done = json.loads(proc.stdout.strip().splitlines()[-1])
    sweep_id = done["sweep_id"]
    assert done["status"] == "FAILED" and done["counts"] == {"COMPLETED": 1, "FAILED": 1}
    failed = done["trials"][0]
    assert failed["status"] == "FAILED" and "parameter 'temperature' = -1.0: must be a finite number > 0" in failed["error"]
    assert failed["run_id"] is None and "refused before it started" in failed["error"]  # checked before Ray starts
    assert "trial 0 FAILED before it started" in proc.stderr and "Traceback" not in proc.stderr

    runs = {doc["info"]["sweep"]["trial"]: doc for doc in mongo_client[name].runs.find({"info.sweep.id": sweep_id})}
    assert sorted(runs) == [1]  # every trial that ran is a stored run tagged with the sweep; the refused one is not
    assert runs[1]["status"] == "COMPLETED" and runs[1]["config"]["selector"]["temperature"] == 0.05
    assert runs[1]["info"]["sweep"]["params"] == {"selector.temperature": 0.05}
    assert runs[1]["result"]["Recall@1"] == done["trials"][1]["result"]["Recall@1"]

    status = json.loads(pqa("sweep", "status", sweep_id, "--mongo-url", url, "--json").stdout)
    assert [t["status"] for t in status["trials"]] == ["FAILED", "COMPLETED"]
    table = pqa("runs", "compare", "--sweep", sweep_id, "--mongo-url", url, "--plot", str(tmp_path / "p.png")).stdout
    header, best, worst = table.strip().splitlines()
    assert header.split()[:5] == ["trial", "run", "status", "selector.temperature", "Recall@1"]
    assert best.split()[:3] == ["1", str(runs[1]["_id"]), "COMPLETED"] and worst.split()[2] == "FAILED"
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
