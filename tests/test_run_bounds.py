"""What a run may not do (issue 19), through the ``pqa`` command line as users meet it, against the
session's real SecantusDB:

* a run writes only inside its folder: ``eval.predictions_file`` is a plain file name there, none of
  pqa's own files; checked before the run exists;
* a NaN is a failure: every element of a list-valued key is in range, a non-finite loss or gradient
  stops the run FAILED (the step and the loss named, no final checkpoint), and ``init_from`` /
  ``resume`` refuse a checkpoint holding a non-finite tensor.

Every run uses the tiny random model (``with smoke``, one thread).
"""
from __future__ import annotations

import hashlib
import json
import os
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
SMOKE = ["with", "smoke", "threads=1"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def store(embedded_db):
    name = f"pqa_bounds_{uuid.uuid4().hex[:8]}"
    client = pymongo.MongoClient(embedded_db, serverSelectionTimeoutMS=10_000)
    yield {"url": embedded_db.rstrip("/") + "/" + name, "db": client[name]}
    client.close()


@pytest.fixture
def user(tmp_path, store, monkeypatch):
    """``pqa ARGS`` in-process (``user.cli``) or as a subprocess (``user.subprocess``), with its own
    PQA_HOME and PQA_OUTPUT_DIR; ``user.untouched()`` says that nothing was stored and no folder made."""
    env = {"PQA_HOME": str(tmp_path / "home"), "PQA_OUTPUT_DIR": str(tmp_path / "outputs"), "PQA_PROGRESS": "0"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("PQA_MONGO_URL", raising=False)

    class User:
        url = store["url"]

        def cli(self, *args):
            from pqa_experiments.cli.main import cli

            return CliRunner().invoke(cli, list(args))

        def run(self, *args):
            return self.cli("run", "pipeline", "--mongo-url", store["url"], *args)

        def subprocess(self, *args, extra_env=None):
            proc = subprocess.run([sys.executable, "-m", "pqa_experiments.cli.main", *args], capture_output=True,
                                  text=True, cwd=str(REPO), timeout=900,
                                  env={**os.environ, **env, "PYTHONUNBUFFERED": "1", **(extra_env or {})})
            proc.output, proc.exit_code = proc.stdout + proc.stderr, proc.returncode
            return proc

        def untouched(self) -> bool:
            return store["db"].runs.count_documents({}) == 0 and not (tmp_path / "outputs").exists()

    return User()


# --------------------------------------------------------------------------- files stay in their folder


@pytest.mark.parametrize("name, why", [
    ("", "is empty"),
    ("/tmp/pqa-victim.txt", "has a folder part"),
    ("../../../x", "has a folder part"),
    ("checkpoints/read/final/model.safetensors", "has a folder part"),
    ("checkpoints", "is one of pqa's own files in the run folder"),
    ("result.json", "is one of pqa's own files in the run folder"),
    (".pqa-run.lock", "is a hidden name"),
])
def test_predictions_file_is_a_plain_name_inside_the_run_folder(user, tmp_path, name, why):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    line = refused(user.run(*SMOKE, f"eval.predictions_file={name!r}"), 2,
                   f"config key 'eval.predictions_file' = {name!r} {why}: it must be a plain file name inside "
                   "the run's folder")
    assert user.untouched() and victim.read_text() == "precious", line


# --------------------------------------------------------------------------- a NaN is a failure


@pytest.mark.parametrize("override, message", [
    ("write.betas_z=[2.0,2.0]", "config key 'write.betas_z' = [2.0, 2.0]: element 0 (2.0) must be a finite number "
                                "in [0, 1)"),
    ("write.betas_z=[0.9,-1.0]", "element 1 (-1.0) must be a finite number in [0, 1)"),
    ("write.betas_z=[0.9]", "config key 'write.betas_z' = [0.9]: must be a list of 2 numbers, got 1"),
    ("write.betas_z=[0.9,'x']", "element 1 ('x') must be a finite number in [0, 1)"),
])
def test_every_element_of_a_list_key_is_in_range_before_the_run(user, override, message):
    refused(user.run(*SMOKE, override), 2, message)
    assert user.untouched()


def test_betas_nan_from_a_json_file_is_refused(user, tmp_path):
    path = tmp_path / "nan.json"
    path.write_text('{"write": {"betas_z": [NaN, NaN]}}')
    refused(user.run(*SMOKE, str(path)), 2, f"config file {path}", "element 0 (nan) must be a finite number in [0, 1)")
    assert user.untouched()


def _rewrite_tensor(checkpoint: Path, name: str, change) -> None:
    """``change(tensors)`` applied to ``checkpoint/name`` (a safetensors file), the manifest's hash updated:
    only pqa's own checks of the tensors can find it."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(checkpoint / name))
    change(tensors)
    save_file(tensors, str(checkpoint / name))
    data = (checkpoint / name).read_bytes()
    manifest = json.loads((checkpoint / "MANIFEST.json").read_text())
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (checkpoint / "MANIFEST.json").write_text(json.dumps(manifest))


def test_a_non_finite_loss_stops_the_run_failed_and_a_nan_checkpoint_is_never_loaded(user, store, tmp_path):
    """Learning rates that overflow the LoRA make the read loss NaN: the run is stored FAILED with the
    phase, the step and the loss in one line, and writes no read checkpoint. Its write checkpoint,
    with one NaN put in a tensor (manifest updated), is refused by init_from and resume in one line
    naming the tensor, before a run exists."""
    out = tmp_path / "diverged"
    result = user.subprocess("run", "pipeline", "--mongo-url", store["url"], *SMOKE, "read.lr_lora=1e30",
                             "write.lr_projection=1e30", f"output_dir={out}")
    line = refused(result, 1, "Error: read phase, step ", "the loss is nan", "non-finite",
                   "the run stops and writes no final checkpoint")
    doc = store["db"].runs.find_one({"config.output_dir": str(out)})
    assert doc["status"] == "FAILED" and line[len("Error: "):] in doc["fail_trace"][-1]
    assert "Recall" not in json.dumps(doc.get("result"))
    assert (out / "checkpoints" / "write" / "final").is_dir() and not (out / "checkpoints" / "read").exists()

    poisoned = tmp_path / "poisoned"
    shutil.copytree(out / "checkpoints" / "write" / "final", poisoned)
    _rewrite_tensor(poisoned, "model.safetensors", lambda t: t["doc_vectors"].view(-1).__setitem__(3, float("nan")))
    before = store["db"].runs.count_documents({})
    refused(user.run(*SMOKE, f"init_from={poisoned}", "phases=['read','eval']"), 1,
            f"{poisoned / 'model.safetensors'}: tensor 'doc_vectors' holds non-finite values (NaN or inf)")
    folder = tmp_path / "crashed"
    shutil.copytree(poisoned, folder / "checkpoints" / "write" / "step-0000002")
    refused(user.run(*SMOKE, f"resume={folder}"), 1, "tensor 'doc_vectors' holds non-finite values")
    assert store["db"].runs.count_documents({}) == before

    # a tensor renamed in the header (the manifest's hash updated): another model's, found before the run
    renamed = tmp_path / "renamed"
    shutil.copytree(out / "checkpoints" / "write" / "final", renamed)
    _rewrite_tensor(renamed, "model.safetensors",
                    lambda t: t.__setitem__("query_encoder.bogus", t.pop(sorted(k for k in t if k.startswith(
                        "query_encoder."))[0])))
    refused(user.run(*SMOKE, f"init_from={renamed}", "phases=['read','eval']"), 1,
            f"{renamed / 'model.safetensors'}: tensors of another model (missing ['query_encoder.", "unexpected "
            "['query_encoder.bogus'])")
    assert store["db"].runs.count_documents({}) == before


# --------------------------------------------------------------------------- found before the run exists


def test_lora_target_modules_are_checked_against_the_llm_before_the_run(user):
    refused(user.run(*SMOKE, "model.lora.target_modules=['nope','q_proj']"), 2,
            "config key 'model.lora.target_modules' = ['nope', 'q_proj']: ['nope'] match no module of "
            "model.llm='tiny'; its linear layers: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj")
    refused(user.run(*SMOKE, "model.lora.target_modules=[]"), 2, "[]: is empty: LoRA needs modules of")
    assert user.untouched()


@pytest.mark.parametrize("content", ["nothing", "config"])
def test_model_llm_naming_a_folder_that_is_not_a_model_is_one_line(user, tmp_path, content):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "README.txt").write_text("weights elsewhere")
    if content == "config":
        (folder / "config.json").write_text('{"hidden_size": 8}')
    line = refused(user.run(*SMOKE, f"model.llm='{folder}'"), 2, f"model.llm='{folder}': not a built-in "
                   "(smollm2-135m, tiny), local folder or cached model: ")
    if content == "nothing":
        assert line.endswith("the folder holds no config.json (a model folder holds config.json, its tokenizer and "
                             "weights)"), line
    assert user.untouched()


# --------------------------------------------------------------------------- config files are bounded


def _alias_bomb(levels: int) -> str:
    """A YAML file of a few hundred bytes whose aliases expand to 9**levels strings."""
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels + 1):
        lines.append(f"l{i}: &l{i} [{','.join([f'*l{i - 1}'] * 9)}]")
    return "\n".join(lines) + "\nseed: 1\n"


@pytest.mark.parametrize("name, text, message", [
    ("bomb7.yaml", _alias_bomb(7), "line 2: not valid YAML (alias *l0 (aliases are not read in config files"),
    ("bomb9.yaml", _alias_bomb(9), "line 2: not valid YAML (alias *l0"),
    ("merge.yaml", "base: &b {top_k: 3}\nread:\n  <<: *b\n", "line 3: not valid YAML (alias *b"),
    ("twice.yaml", "seed: 1\nread:\n  top_k: 3\nseed: 2\n", "line 4: not valid YAML (key 'seed' is written twice "
                                                          "in one mapping)"),
    ("nested_twice.yaml", "read:\n  top_k: 3\n  top_k: 4\n", "line 3: not valid YAML (key 'top_k' is written twice"),
    ("twice.json", '{"seed": 1, "read": {"top_k": 3}, "seed": 2}', "not valid JSON (key 'seed' is written twice in "
                                                                   "one object)"),
    ("huge.yaml", None, "over the 1000000 bytes (1 MB) a config file may have"),
])
@pytest.mark.parametrize("command", [["print_config"], []], ids=["print_config", "run"])
def test_a_config_file_is_bounded_and_says_so_in_one_line(user, tmp_path, name, text, message, command):
    path = tmp_path / name
    if text is None:  # 50 MB of comments after one key: refused before it is read
        with open(path, "w") as f:
            f.write("seed: 1\n")
            f.truncate(50 << 20)
    else:
        path.write_text(text)
    refused(user.cli("run", "pipeline", "--mongo-url", user.url, *command, "with", "smoke", str(path)), 2,
            f"config file {path}", message)
    assert user.untouched()


def test_the_resolved_config_is_bounded_before_the_run_document(user, tmp_path):
    """Two files each under the file bound, together over the bound of the config a run document holds."""
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    first.write_text(json.dumps({"data": {"prompt": "{question}" + "x" * 600_000}}))
    second.write_text(json.dumps({"model": {"llm": "y" * 600_000}}))
    refused(user.run(*SMOKE, str(first), str(second)), 2, "the resolved config is ", " bytes as JSON, over the "
            "1000000 bytes (1 MB) a run's record holds for it")
    assert user.untouched()


def test_file_storage_on_a_read_only_mount_is_one_line(user, tmp_path):
    """``-F`` on a folder no write reaches: one line before the run, not two tracebacks claiming a
    traceback was stored with the run. (A read-only tmpfs as root, as ``test_run_trust`` mounts it.)"""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() == 0:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                                 capture_output=True, text=True)
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.strip()}")
    else:
        folder.chmod(0o555)
    try:
        result = user.subprocess("run", "pipeline", "-F", str(folder / "runs"), *SMOKE)
        refused(result, 1, f"Error: file storage {folder / 'runs'}: cannot write in {folder}: ")
        assert "stored with the run" not in result.output and not (tmp_path / "outputs").exists()
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(folder)], check=True)
        else:
            folder.chmod(0o755)


# --------------------------------------------------------------------------- small items (finding 11)


@pytest.mark.parametrize("lines, message", [
    (['{"doc_id": 0, "title": "a", "text": "alpha"}', '{"doc_id": "x", "title": "b", "text": "beta"}'],
     ":2: field 'doc_id': 'x' is a string but the first doc id (0, line 1) is an integer; a corpus's doc ids are all "
     "integers or all strings"),
    (['{"doc_id": 0, "title": "a", "text": "al\\u0001pha"}'.replace("\\u0001", "\x01")],
     ":1: invalid JSON: Invalid control character at column 40"),
])
def test_a_corpus_error_names_the_corpus_file_in_plain_words(user, tmp_path, lines, message):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(lines) + "\n")
    line = refused(user.run(*SMOKE, f"data.corpus={corpus}"), 1, f"Error: {corpus}{message}")
    assert "at at" not in line and user.untouched()


def test_a_config_files_rename_warnings_are_said_once_with_several_processes(user, tmp_path):
    """``pqa run --nproc 2`` checks the input, then starts two processes that read it again: each
    rename warning of the seed's config file is printed once, not once per process."""
    result = user.subprocess("run", "pipeline", "--no-db", "--nproc", "2", "with", "configs/phase1_poc.yaml",
                             "model.llm=tiny", "threads=1", "write.epochs=1", "read.epochs=1",
                             "model.num_memory_tokens=2", f"output_dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.output[-3000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: config file")]
    assert warnings == ["warning: config file configs/phase1_poc.yaml: key 'read_phase' is read as 'read' (pqa's "
                        "name for it)", "warning: config file configs/phase1_poc.yaml: key 'model.llm_name' is read "
                        "as 'model.llm' (pqa's name for it)"], result.stderr[-3000:]


RANK1_PLUGIN = '''
import os
from pqa_core.hookspecs import hookimpl
from pqa_core.interfaces import Selector

class Rank1Selector(Selector):
    """Raises on the second training process only, and only on the run's corpus (36 rows): the contract
    check's small model (4 rows) passes, so the failure comes mid-run."""
    def forward(self, query_vectors, doc_vectors):
        if os.environ.get("RANK") == "1" and doc_vectors.shape[0] > 20:
            raise RuntimeError("boom on rank 1")
        return query_vectors @ doc_vectors.T

@hookimpl
def pqa_register_selectors(register):
    register("rank1boom", Rank1Selector)
'''


def test_a_training_process_that_fails_under_nproc_is_one_line_and_the_run_failed(user, store, tmp_path):
    """torchrun's 40-line report, and the run stored INTERRUPTED, were what a failing second process gave:
    now one line with that process's error, and the run FAILED with it."""
    from conftest import write_distribution

    site = tmp_path / "site"
    site.mkdir()
    write_distribution(site, "pqa-test-rank1", "0.1", {"rank1": "pqa_test_rank1"}, {"pqa_test_rank1": RANK1_PLUGIN})
    result = user.subprocess("run", "pipeline", "--nproc", "2", "--mongo-url", store["url"], *SMOKE,
                             "selector.name=rank1boom", extra_env={
                                 "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])})
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert errors == ["Error: training process 1 failed: RuntimeError: boom on rank 1"], result.stderr[-3000:]
    doc = store["db"].runs.find_one({"config.selector.name": "rank1boom"})
    assert doc["status"] == "FAILED" and "training process 1 failed: RuntimeError: boom on rank 1" in \
        doc["fail_trace"][-1], doc.get("fail_trace")


KILLED_PLUGIN = RANK1_PLUGIN.replace("raise RuntimeError(\"boom on rank 1\")",
                                    "import signal; os.kill(os.getpid(), signal.SIGKILL)").replace("rank1boom", "rank1killed")


def test_a_training_process_killed_under_nproc_fails_the_run_in_one_line(user, store, tmp_path):
    """kill -9 of the second process mid-run (it leaves no error line of its own): the run is FAILED, the
    user reads one Error line and no traceback, and the exit status is 1."""
    from conftest import write_distribution

    assert "SIGKILL" in KILLED_PLUGIN
    site = tmp_path / "site"
    site.mkdir()
    write_distribution(site, "pqa-test-rank1-killed", "0.1", {"rank1killed": "pqa_test_rank1_killed"},
                       {"pqa_test_rank1_killed": KILLED_PLUGIN})
    result = user.subprocess("run", "pipeline", "--nproc", "2", "--mongo-url", store["url"], *SMOKE,
                             "selector.name=rank1killed", extra_env={
                                 "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])})
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and ("training process" in errors[0] or "another training process" in errors[0]), \
        result.stderr[-3000:]
    doc = store["db"].runs.find_one({"config.selector.name": "rank1killed"})
    assert doc["status"] == "FAILED", doc.get("status")


def test_sigterm_interrupts_a_run_and_only_a_run(monkeypatch):
    """During a run SIGTERM raises (the run is stored INTERRUPTED, or FAILED under torchrun); once it has
    ended, a raise would land in interpreter shutdown (pymongo's atexit) as a traceback: CI saw one under
    the one error line of a failed --nproc run. Alone the default comes back; under torchrun it is ignored
    so the process still says its line."""
    import signal

    from pqa_experiments.tracking.engine import interrupt_on_sigterm, stop_interrupting_on_sigterm

    before = signal.getsignal(signal.SIGTERM)
    try:
        for world, after in (("1", signal.SIG_DFL), ("2", signal.SIG_IGN)):
            monkeypatch.setenv("WORLD_SIZE", world)
            interrupt_on_sigterm()
            if world == "1":
                with pytest.raises(KeyboardInterrupt):
                    signal.raise_signal(signal.SIGTERM)
            stop_interrupting_on_sigterm()
            assert signal.getsignal(signal.SIGTERM) is after
        signal.signal(signal.SIGTERM, before)
        stop_interrupting_on_sigterm()  # someone else's handler stays
        assert signal.getsignal(signal.SIGTERM) is before
    finally:
        signal.signal(signal.SIGTERM, before)
