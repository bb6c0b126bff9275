"""A run's record can be trusted (issue 12), and the seed notebook's config file runs (issue 11, item 1).

Through the ``pqa`` command line as users meet it, against the session's real SecantusDB:

* config files are data, never code: ``with FILE`` reads .yaml/.yml/.json only, in ``run`` and in
  ``print_config``, YAML through a safe loader; the seed's keys are read as pqa's with a warning;
* every config value is in range before anything is written: one ``Error:`` line naming the key
  and what it allows, exit 2, no run record, no folder;
* an environment failure (a read-only output folder, a symlink loop, a file in the way) is one
  line, exit 1, no traceback.

Most cases run in-process through click's runner (the same ``pqa`` group, minus a Python start per
case); one of each kind runs as a subprocess, as a user types it. Checkpoint fingerprints, the end
of a run with the database down and dead runs are in ``test_reliability.py`` (they need real runs).
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pymongo
import pytest
from click.testing import CliRunner

from conftest import refused  # the tests' shared one-line-error check


REPO = Path(__file__).resolve().parents[1]
SEED_CONFIG = REPO / "configs" / "phase1_poc.yaml"


@pytest.fixture
def store(embedded_db):
    name = f"pqa_trust_{uuid.uuid4().hex[:8]}"
    client = pymongo.MongoClient(embedded_db, serverSelectionTimeoutMS=10_000)
    yield {"url": embedded_db.rstrip("/") + "/" + name, "db": client[name]}
    client.close()


@pytest.fixture
def user(tmp_path, store, monkeypatch):
    """``pqa run pipeline --mongo-url <store> ARGS`` in-process (``user.run``) or as a subprocess
    (``user.subprocess``), with its own PQA_HOME and PQA_OUTPUT_DIR; ``user.untouched()`` says that
    nothing was stored and no output folder made."""
    env = {"PQA_HOME": str(tmp_path / "home"), "PQA_OUTPUT_DIR": str(tmp_path / "outputs"), "PQA_PROGRESS": "0"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("PQA_MONGO_URL", raising=False)

    class User:
        def run(self, *args, command="pipeline"):
            from pqa_experiments.cli.main import cli

            return CliRunner().invoke(cli, ["run", command, "--mongo-url", store["url"], *args])

        def subprocess(self, *args, command="pipeline"):
            proc = subprocess.run([sys.executable, "-m", "pqa_experiments.cli.main", "run", command, "--mongo-url",
                                   store["url"], *args], capture_output=True, text=True, cwd=str(REPO),
                                  env={**os.environ, **env, "PYTHONUNBUFFERED": "1"}, timeout=900)
            proc.output, proc.exit_code = proc.stdout + proc.stderr, proc.returncode
            return proc

        def untouched(self) -> bool:
            return store["db"].runs.count_documents({}) == 0 and not (tmp_path / "outputs").exists()

    return User()


# --------------------------------------------------------------------------- 3: config files are data


class _Evil:
    """Unpickling this creates ``marker``: the proof that a config file ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.mark.parametrize("command", [["print_config"], []], ids=["print_config", "run"])
def test_a_pickle_config_file_is_refused_unread(user, tmp_path, command):
    marker = tmp_path / "the-pickle-ran"
    evil = tmp_path / "evil.pickle"
    evil.write_bytes(pickle.dumps({"seed": _Evil(marker)}))
    result = user.subprocess(*command, "with", str(evil))
    refused(result, 2, f"config file {evil}: only .yaml, .yml and .json files are read")
    assert not marker.exists() and user.untouched()


@pytest.mark.parametrize("name, text, message", [
    ("tagged.yaml", "seed: !!python/object/apply:os.makedirs ['{marker}']\n", "not valid YAML"),
    ("script.py", "import os\n", "only .yaml, .yml and .json files are read"),
    ("config.toml", "seed = 1\n", "only .yaml, .yml and .json files are read"),
    ("missing.yaml", None, "no such file"),
    ("broken.json", '{"seed": 1,', "line 1: not valid JSON"),
    ("list.yaml", "- 1\n- 2\n", "must hold a mapping of config keys, not a list"),
    ("unknown.yaml", "read_phase:\n  top_k: 3\n  topk: 4\n",
     "unknown config key 'read.topk'; did you mean 'read.top_k'? known keys under read: "),
    ("range.json", '{"read": {"epochs": 0}}', "config key 'read.epochs' = 0: must be an integer >= 1"),
    ("nan.json", '{"read": {"lr_lora": NaN}}', "config key 'read.lr_lora' = nan: must be a finite number > 0"),
])
@pytest.mark.parametrize("command", [["print_config"], []], ids=["print_config", "run"])
def test_a_bad_config_file_is_one_line_naming_it(user, tmp_path, name, text, message, command):
    marker = tmp_path / "the-yaml-ran"
    path = tmp_path / name
    if text is not None:
        path.write_text(text.replace("{marker}", str(marker)))
    line = refused(user.run(*command, "with", str(path)), 2, f"config file {path}", message)
    assert not marker.exists() and user.untouched(), line
    if name == "unknown.yaml":
        assert "(the file writes 'read_phase' for 'read')" in line


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_seed_config_file_is_applied_like_a_named_config_in_print_config(user, tmp_path, suffix):
    """The seed's file: its values over the defaults, key=value over the file, seed keys renamed with a warning."""
    import yaml

    path = tmp_path / f"phase1_poc{suffix}"
    values = yaml.safe_load(SEED_CONFIG.read_text())
    path.write_text(SEED_CONFIG.read_text() if suffix == ".yaml" else json.dumps(values))
    result = user.run("print_config", "with", "smoke", str(path), "read.epochs=1")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line for line in lines if line.startswith("warning:")] == [
        f"warning: config file {path}: key 'read_phase' is read as 'read' (pqa's name for it)",
        f"warning: config file {path}: key 'model.llm_name' is read as 'model.llm' (pqa's name for it)"]
    text = "\n".join(lines)
    assert "llm = 'smollm2-135m'" in text  # the file's model.llm_name beats the smoke named config's tiny
    assert "lr_lora = 5e-05" in text and "retrieval_weight = 0.1" in text and "epochs = 1" in text
    assert user.untouched()


def test_the_seed_config_runs_with_model_llm_tiny(user, store):
    """Issue 11's done-when: ``pqa run pipeline with configs/phase1_poc.yaml model.llm=tiny`` runs (fewer
    epochs here); the stored run has the file's read settings and names the file it read."""
    result = user.subprocess("--json", "with", "configs/phase1_poc.yaml", "model.llm=tiny", "threads=1",
                             "write.epochs=1", "read.epochs=1", "model.num_memory_tokens=2")
    assert result.returncode == 0, result.output[-3000:]
    run = store["db"].runs.find_one({"_id": json.loads(result.stdout.strip().splitlines()[-1])["run_id"]})
    assert run["status"] == "COMPLETED"
    assert run["config"]["model"]["llm"] == "tiny"
    assert {k: run["config"]["read"][k] for k in ("batch_size", "lr_z", "lr_lora", "top_k", "retrieval_weight")} \
        == {"batch_size": 8, "lr_z": 1e-4, "lr_lora": 5e-5, "top_k": 3, "retrieval_weight": 0.1}
    assert run["info"]["config_files"] == [{"path": str(SEED_CONFIG), "sha256": _sha256(SEED_CONFIG)}]


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- 4: every value in range


@pytest.mark.parametrize("override, message", [
    ("read.lr_lora=1e999", "config key 'read.lr_lora' = inf: must be a finite number > 0"),
    ("write.lr_projection=0", "config key 'write.lr_projection' = 0.0: must be a finite number > 0"),
    ("read.top_k=0", "config key 'read.top_k' = 0: must be an integer >= 1"),
    ("read.top_k=-1", "config key 'read.top_k' = -1: must be an integer >= 1"),
    ("read.top_k=1000000000", "config key 'read.top_k' = 1000000000: must be an integer in [1, 36] "
                              "(the number of documents in sample:corpus.jsonl)"),
    ("eval.top_k=37", "config key 'eval.top_k' = 37: must be an integer in [1, 36]"),
    ("read.top_k=True", "config key 'read.top_k' = True: must be an integer >= 1, not a boolean"),
    ("read.epochs=-1", "config key 'read.epochs' = -1: must be an integer >= 1"),
    ("write.epochs=2.5", "config key 'write.epochs' must be an integer >= 0, got 2.5"),
    ("read.batch_size=0", "config key 'read.batch_size' = 0: must be an integer >= 1"),
    ("eval.batch_size=0", "config key 'eval.batch_size' = 0: must be an integer >= 1"),
    ("data.max_doc_tokens=0", "config key 'data.max_doc_tokens' = 0: must be an integer >= 1"),
    ("model.num_memory_tokens=0", "config key 'model.num_memory_tokens' = 0: must be an integer >= 1"),
    ("model.num_memory_tokens=100000000", "config key 'model.num_memory_tokens' = 100000000: must be an integer "
                                          "in [1, 306] (3 soft prompts of m tokens (top_k), the question and the "
                                          "answer must fit tiny's 1024-token context)"),
    ("model.lora.dropout=1.0", "config key 'model.lora.dropout' = 1.0: must be a finite number in [0, 1)"),
    ("read.retrieval_weight=-0.1", "config key 'read.retrieval_weight' = -0.1: must be a finite number >= 0"),
    ("model.device='cuda:7'", "config key 'model.device' = 'cuda:7': this machine has "),
    ("model.device='gpu'", "config key 'model.device' = 'gpu': must be auto, cpu, cuda, cuda:N or mps"),
    ("data.prompt='Answer:'", "config key 'data.prompt' = 'Answer:': must contain {question}"),
    ("phases=['bogus']", "config key 'phases': unknown phase 'bogus'; phases: pretrain, write, read, eval, control_read, control"),
    ("model.doc_init='zeros'", "config key 'model.doc_init' = 'zeros': must be one of minilm, random"),
    ("read.key_updates='typo'", "config key 'read.key_updates' = 'typo': must be one of all, batch, none"),
    ("seed=-1", "config key 'seed' = -1: must be an integer in [0, 4294967295]"),
])
def test_a_value_out_of_range_is_one_line_before_anything_is_written(user, tmp_path, override, message):
    out = tmp_path / "chosen"
    refused(user.run("with", "smoke", override, f"output_dir={out}"), 2, message)
    assert user.untouched() and not out.exists()


def test_every_numeric_config_key_has_a_range():
    """A key added without an entry in RANGES would take any number: this names it."""
    from pqa_core.config import COMPONENT_SECTIONS, RANGES, PQAConfig

    def leaves(value, prefix=""):
        for key, item in value.items():
            if isinstance(item, dict) and key not in COMPONENT_SECTIONS:
                yield from leaves(item, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", item

    def number(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    numeric = {key for key, value in leaves(PQAConfig().to_dict())  # a number, or a list of numbers (each ranged)
               if number(value) or (isinstance(value, list) and value and all(map(number, value)))}
    numeric |= {"read.lr_query_encoder", "read.lr_projection", "eval.top_k"}  # Optional numbers, None by default
    assert numeric - set(RANGES) == set(), "give these keys a range in pqa_core/config.py RANGES"
    assert set(RANGES) - numeric == set(), "RANGES names keys the config no longer has"


def test_a_bad_value_as_a_user_types_it(user):
    """The same checks through a real process: a nonsensical value, and Python in a value."""
    refused(user.subprocess("with", "smoke", "read.top_k=True"), 2,
            "config key 'read.top_k' = True: must be an integer >= 1, not a boolean")
    refused(user.subprocess("with", "seed=1; import os"), 2,
            "config key 'seed' must be an integer in [0, 4294967295], got '1; import os'")
    assert user.untouched()


# --------------------------------------------------------------------------- 5: the machine refuses


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder no write reaches: a read-only tmpfs when root (permissions do not stop root), else mode 0555."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_output_folder_on_a_read_only_mount_is_one_line(user, read_only_folder, monkeypatch):
    refused(user.run("with", "smoke", f"output_dir={read_only_folder}/run"), 1,
            f"output folder {read_only_folder}/run: cannot write in {read_only_folder}: ")
    monkeypatch.setenv("PQA_OUTPUT_DIR", str(read_only_folder))  # the default place, too
    refused(user.run("with", "smoke"), 1, f"output folder {read_only_folder}: cannot write in {read_only_folder}")
    assert user.untouched()


def test_output_folder_through_a_symlink_loop_or_a_file_is_one_line(user, tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    refused(user.subprocess("with", "smoke", f"output_dir={tmp_path}/a/run"), 1,
            f"Error: output folder {tmp_path}/a/run: Too many levels of symbolic links")
    (tmp_path / "file").write_text("")
    refused(user.run("with", "smoke", f"output_dir={tmp_path}/file/run"), 1,
            f"Error: output folder {tmp_path}/file/run: Not a directory")
    assert user.untouched()


def test_debug_shows_the_traceback_of_an_environment_failure(user, tmp_path):
    from pqa_experiments.cli.main import cli

    (tmp_path / "file").write_text("")
    result = CliRunner().invoke(cli, ["--debug", "run", "pipeline", "--no-db", "with", "smoke",
                                      f"output_dir={tmp_path}/file/run"])
    assert result.exit_code == 1 and result.exception is not None
    assert "output folder" in str(result.exception)
    shutil.rmtree(tmp_path / "outputs", ignore_errors=True)
