"""The run engine: one tracked run from a phase and Sacred's ``with`` items, for ``pqa run``, ``pqa demo``
and sweeps alike (``execute``), and what it checks first (``accept``, ``preflight``).

Before the run is created (so nothing is stored and no folder is made): config files (YAML or
JSON data only), every config key, type and range, plugin names and parameters, data files, what the
data and the LLM bound (``top_k``, memory tokens, the device), the output folder (writable; no
other run's checkpoints in it), and the checkpoints ``init_from`` and ``resume`` would load
(intact, of this model, and for ``resume`` made under this run's fingerprint). A folder another
live run writes is refused (its lock), and an unreachable database is reported, before any
training starts.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import click

from pqa_core.config import EXPERIMENT_PHASES
from pqa_core.errors import CheckpointError, EnvironmentFailure, PqaError, UsageError

from pqa_experiments.tracking import sacred_fixes

log = logging.getLogger(__name__)
PHASES = tuple(EXPERIMENT_PHASES)
WARNED_ENV = "PQA_CONFIG_WARNINGS_SHOWN"  # set by `pqa run --nproc N` for its processes: warnings said once
MAX_CONFIG_BYTES = 1_000_000  # the resolved config as JSON: it is stored in the run document (16 MiB at most)
SACRED_COMMANDS = ("print_config", "print_named_configs", "print_dependencies")


def split_sacred_args(args: List[str]) -> Tuple[Optional[str], List[str]]:
    """``[print_config] [with k=v name ...]`` -> (Sacred command or None, the ``with`` items)."""
    args = list(args)
    command = None
    if args and args[0] in SACRED_COMMANDS:
        command = args.pop(0)
    if not args:
        return command, []
    if args[0] != "with":
        raise UsageError(f"expected 'with key=value ...' or a named config after the phase, got {args[0]!r}")
    return command, args[1:]


def parse_updates(items: List[str]):
    """Sacred's own parsing: ``k=v`` (values as Python literals) and bare named configs."""
    from sacred.arg_parser import get_config_updates

    for item in items:
        if "=" in item and not item.split("=", 1)[0]:
            raise UsageError(f"bad override {item!r}: expected key=value")
    return get_config_updates(items)


def sacred_inputs(ex, items: List[str]) -> Tuple[dict, List[str], List[Dict[str, str]]]:
    """(config updates, named configs, config files read) for ``ex.run``, every one checked before Sacred
    sees it: ``key=value`` types and ranges, named configs known, config files YAML or JSON data only
    (``config_files``), each registered on ``ex`` as a named config of its values."""
    from pqa_core.config import PQAConfig

    from pqa_experiments.tracking import config_files
    from pqa_experiments.tracking.experiments import NAMED_CONFIGS

    updates, names = parse_updates(items)
    # the command line's own keys and values, before Sacred reads them (resume may be a run id: resolve_resume)
    PQAConfig.from_dict({key: value for key, value in updates.items() if key != "resume"})
    named, files = [], []
    for name in names:
        if name in NAMED_CONFIGS:
            named.append(name)
        elif config_files.looks_like_file(name):
            values, warnings = config_files.load(name)
            for line in warnings if not os.environ.get(WARNED_ENV) else ():  # the launcher said them once
                click.echo(line, err=True)
            label = f"file_{len(files)}_" + re.sub(r"\W", "_", Path(name).name)  # no dot: Sacred reads a.b as a path
            ex.add_named_config(label, values)
            named.append(label)
            files.append({"path": str(Path(name).resolve()), "sha256": config_files.digest(name)})
        else:
            raise UsageError(f"unknown named config {name!r}; available: {', '.join(sorted(NAMED_CONFIGS))} "
                             "(or a .yaml, .yml or .json config file)")
    return updates, named, files


@contextlib.contextmanager
def quiet_sacred():
    """Sacred's config warnings (its logger is the root logger) wait for the real run: a refused
    run is one error line, and an accepted one would print them twice."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def preflight(ex, updates, named_configs):
    """Resolve the full config without observers and check everything that can be checked cheaply."""
    from sacred.utils import ConfigAddedError

    from pqa_core.modeling.builder import check_content_init
    from pqa_core.modeling.device import autocast_dtype, resolve_device
    from pqa_core.modeling.doc_table import storage_of
    from pqa_core.storage.checkpoints import check_loadable
    from pqa_core.config import PQAConfig, check_fits
    from pqa_core.components.contract import check_config_components, model_tensor_names
    from pqa_core.modeling.builder import check_lora_targets
    from pqa_core.modeling.llm import load_llm_stand_in
    from pqa_core.data.loading import load_corpus, load_qa
    from pqa_core.modeling.llm import llm_shape
    from pqa_core.pipeline import checkpoints_to_load, resolve_data_path
    from pqa_core.components.plugins import lookup
    from pqa_core.modeling.selection_index import check_index_settings

    try:
        with quiet_sacred():
            run = sacred_fixes.resolve_config(ex, updates, named_configs)
    except ConfigAddedError as exc:
        conflicting = list(getattr(exc, "__conflicting_configs__", ()))
        for key in conflicting:  # let PQAConfig name the key and the known ones
            nested: dict = {}
            node = nested
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = None
            PQAConfig.from_dict(nested)
        raise UsageError(f"unknown config key(s): {', '.join(conflicting)}") from None
    except (KeyError, ValueError, TypeError, AssertionError) as exc:
        raise UsageError(f"bad config: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    check_config_size(run.config)
    config = PQAConfig.from_dict(dict(run.config))
    autocast_dtype(config.model.precision, resolve_device(config.model.device))
    storage_of(config, folder=Path("."))  # model.doc_dtype and model.doc_storage are known values
    corpus = load_corpus(resolve_data_path(config.data.corpus))
    load_qa(resolve_data_path(config.data.qa), corpus)
    eval_questions = load_qa(resolve_data_path(config.data.eval_qa), corpus)
    # before any component is built: m=1e8 would make the contract check allocate terabytes
    shape = llm_shape(config.model.llm)
    if config.model.pretrained:  # another LLM, shape or reader; pretraining data that overlaps the evaluation
        from pqa_core.storage.pretrained import check_for_run

        check_for_run(config, corpus, eval_questions, shape[0] if shape else None)
    from pqa_core.modeling.teacher import check_teacher, teacher_spec

    teacher = teacher_spec(config)
    if teacher:  # a teacher of another LLM or reader, or one trained on the evaluation questions
        check_teacher(teacher, config.model.llm, eval_questions)
    check_fits(config, len(corpus), config.data.corpus, shape)
    check_output_folder(Path(config.resume or config.output_dir or os.environ.get("PQA_OUTPUT_DIR", "outputs")))
    stand_in = load_llm_stand_in(config.model.llm)
    check_lora_targets(config, stand_in[0])
    built = check_config_components(config, stand_in)  # names, parameters, each one's contract on the stand-in
    check_content_init(config, shape[0] if shape else None)
    check_index_settings(config.eval, lookup("selector", config.selector["name"]).factory)
    checkpoints = checkpoints_to_load(config)
    if checkpoints:  # init_from's and resume's: torn, corrupt, other model or size
        from pqa_core.data.loading import split_passages
        from pqa_core.modeling.llm import load_tokenizer

        rows = split_passages(corpus, load_tokenizer(config.model.llm), config.data.max_doc_tokens).documents
        row_ids = [[d.doc_id, d.part] for d in rows]
        for index, checkpoint in enumerate(checkpoints):
            grow = bool(config.init_from) and index == 0  # init_from's may start a larger corpus
            check_loadable(checkpoint, config.to_dict(), len(rows), row_ids=row_ids, grow=grow,
                           tensor_names=model_tensor_names(built))
    return config


def check_reuse(config) -> None:
    """The checkpoints already in the run's folder: continued only by a resume under their fingerprint
    (``force_resume`` says what it lets through). Called holding the folder's lock, so a folder a live
    run writes is refused as in use, not as holding checkpoints."""
    from pqa_core.pipeline import check_output_dir, fingerprint_of

    folder = config.resume or config.output_dir
    for line in check_output_dir(config, fingerprint_of(config), Path(folder)) if folder else []:
        click.echo(f"warning: force_resume=True: {line} (recorded in the run)", err=True)


def check_config_size(config) -> None:
    """The resolved config is bounded before a run document is made to hold it."""
    size = len(json.dumps(config, default=str))
    if size > MAX_CONFIG_BYTES:
        raise UsageError(f"the resolved config is {size} bytes as JSON, over the {MAX_CONFIG_BYTES} bytes (1 MB) a "
                         "run's record holds for it")


def check_output_folder(folder: Path, what: str = "output folder") -> None:
    """The folder a run will write, or the nearest parent that exists, must be a folder this process can
    write: a read-only mount, a symlink loop or a file in the way is one line (exit 1), not a FAILED run.
    ``what`` names it in that line (``file storage`` for ``-F``)."""
    try:
        existing = folder
        while True:
            try:
                mode = os.stat(existing).st_mode
                break
            except FileNotFoundError:
                if existing.parent == existing:
                    raise
                existing = existing.parent
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(folder) else ""
        raise EnvironmentFailure(f"{what} {folder}: {exc.strerror or exc}{where}") from None
    if not stat.S_ISDIR(mode):
        raise EnvironmentFailure(f"{what} {folder}: {existing} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise EnvironmentFailure(f"{what} {folder}: cannot write in {existing}: {exc.strerror or exc}") from None


def output_folder_of(config):
    """The lock of the folder this run will write, when that is known before it starts (resume,
    output_dir): held from here on, a second process is refused before anything is stored."""
    from pqa_core.storage.run_lock import output_folder_lock

    folder = config.resume or config.output_dir
    return output_folder_lock(folder) if folder else contextlib.nullcontext()


def attach_observer(ex, mongo_url: Optional[str], no_db: bool, file_storage: Optional[str]) -> Optional[str]:
    """Add the observer; returns a redacted description of where the run goes."""
    if file_storage:
        from sacred.observers import FileStorageObserver

        ex.observers.append(FileStorageObserver(file_storage))
        return f"file storage {file_storage}"
    if no_db:
        return None
    from pqa_experiments.store import db
    from pqa_experiments.store.observers import make_mongo_observer

    target = db.ensure_database(mongo_url)
    ex.observers.append(make_mongo_observer(target.url, target.db_name))
    return f"MongoDB {target.redacted_url} (database {target.db_name})"


def resolve_resume(updates: dict, mongo_url: Optional[str], no_db: bool, file_storage: Optional[str]) -> Optional[int]:
    """``resume=<run id>`` becomes that run's output folder (its ``info.output_dir``); any ``resume`` must
    hold a checkpoint. Returns the run id resumed from, when given as one. The resumed run is a new run."""
    value = updates.get("resume")
    if value in (None, ""):
        return None
    run_id = None
    if (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and value.strip().isdigit()):
        run_id = int(value)
        updates["resume"] = _output_dir_of_run(run_id, mongo_url, no_db, file_storage)
    elif not isinstance(value, str):
        raise UsageError(f"resume={value!r}: expected a run id or an output folder")
    folder = Path(updates["resume"]).expanduser()
    what = f"resume={run_id} (run {run_id}, output folder {folder})" if run_id is not None else f"resume={folder}"
    if not folder.is_dir():
        raise CheckpointError(f"{what}: no such folder")
    if not any((folder / "checkpoints").glob("*/*/MANIFEST.json")):
        raise CheckpointError(f"{what}: no checkpoint under {folder / 'checkpoints'}; nothing to resume, "
                              "start the run again instead")
    return run_id


def _output_dir_of_run(run_id: int, mongo_url: Optional[str], no_db: bool, file_storage: Optional[str]) -> str:
    """The output folder a stored run recorded in ``info.output_dir``."""
    if file_storage:
        info_file = Path(file_storage) / str(run_id) / "info.json"
        if not info_file.exists():
            raise PqaError(f"resume={run_id}: no run {run_id} in file storage {file_storage}")
        folder = json.loads(info_file.read_text()).get("output_dir")
        where = f"file storage {file_storage}"
    elif no_db:
        raise UsageError(f"resume={run_id}: a run id is looked up in the run store; with --no-db give the "
                         "run's output folder (resume=outputs/<experiment>/<run>)")
    else:
        import pymongo

        from pqa_experiments.store import db

        target = db.ensure_database(mongo_url)
        where = f"{target.redacted_url} (database {target.db_name})"
        with pymongo.MongoClient(target.url, appname="pqa", serverSelectionTimeoutMS=10_000) as client:
            try:
                doc = client[target.db_name]["runs"].find_one({"_id": run_id}, {"info.output_dir": 1})
            except pymongo.errors.PyMongoError as exc:
                raise PqaError(f"resume={run_id}: cannot read the run store {where}: "
                               f"{str(exc).splitlines()[0][:200]}") from None
        if doc is None:
            raise PqaError(f"resume={run_id}: no run {run_id} in {where}")
        folder = (doc.get("info") or {}).get("output_dir")
    if not folder:
        raise PqaError(f"resume={run_id}: run {run_id} in {where} recorded no output folder; "
                       "give the folder instead (resume=outputs/<experiment>/<run>)")
    return folder


def describe_result(result: dict) -> str:
    """``EM=… [low, high], F1=…`` with each metric's 95% interval; other values as they are."""
    from pqa_core.evaluation.stats import format_interval

    parts = []
    for key, value in result.items():
        if key.endswith(("_ci95_low", "_ci95_high")):
            continue
        parts.append(format_interval(result, key) if isinstance(value, float) else f"{key}={value}")
    return ", ".join(parts)


def run_failure(ex, exc: Exception) -> PqaError:
    """An unexpected exception inside a run as one line; the traceback stays in the stored run.
    The error's ``run_id`` names the stored run (None when none was created)."""
    run_id = getattr(ex.current_run, "_id", None)
    text = str(exc).strip()
    reason = f"{type(exc).__name__}: {text.splitlines()[0][:500]}" if text else type(exc).__name__
    run = f"run {run_id}" if run_id is not None else "the run"
    error = PqaError(f"{run} FAILED: {reason} (the traceback is stored with the run; pqa --debug run ... prints it)")
    error.run_id = run_id
    return error


def tracked_run(ex, updates, named_configs, info: Optional[dict] = None, debug: bool = False):
    """``ex.run`` with its failures as one line; what the run store did not take is said in that same line."""
    try:
        finished = ex.run(config_updates=updates, named_configs=named_configs, info=info or None)
    except KeyboardInterrupt:
        raise_for_losses(ex)
        raise click.Abort()
    except PqaError as exc:
        raise_for_losses(ex, str(exc))
        raise
    except Exception as exc:  # a component raising mid-run: Sacred stored it FAILED with the traceback
        if debug:
            raise
        failure = run_failure(ex, exc)
        raise_for_losses(ex, str(failure))
        raise failure from None
    raise_for_losses(ex)
    return finished


def raise_for_losses(ex, before: str = "") -> None:
    """One PqaError line if an observer could not store everything, after ``before`` (the run's own error)."""
    for observer in ex.observers:
        if getattr(observer, "losses", None):
            try:
                observer.raise_for_losses()
            except PqaError as exc:
                raise PqaError(f"{before}; {exc}" if before else str(exc)) from None


def accept(phase: str, items: List[str], mongo_url: Optional[str] = None, no_db: bool = False,
           file_storage: Optional[str] = None):
    """Everything checked before a run exists: ``(experiment, updates, named configs, PQAConfig, the run
    id resumed from, config files read)``. With several processes, the main one resolves ``resume`` and
    the others take its updates."""
    from pqa_core.training import distributed

    from pqa_experiments.tracking.experiments import make_experiment

    group = distributed.current()
    ex = make_experiment(phase)
    updates, named_configs, files = sacred_inputs(ex, items)
    resumed_from = resolve_resume(updates, mongo_url, no_db, file_storage) if group.is_main else None
    updates = group.broadcast_object(updates)
    config = preflight(ex, updates, named_configs)
    if file_storage and group.is_main:
        check_output_folder(Path(file_storage), "file storage")  # -F on a read-only mount: one line, no run
    return ex, updates, named_configs, config, resumed_from, files


def execute(phase: str, items: List[str], *, mongo_url: Optional[str] = None, no_db: bool = False,
            file_storage: Optional[str] = None, info: Optional[dict] = None, debug: bool = False,
            announce=None, on_start=None):
    """One tracked run of ``phase`` with Sacred's ``with`` items: resolve ``resume``, pre-flight, the
    output folder's lock and its checkpoints, the observer, the run. Returns the finished Sacred run;
    raises PqaError. ``info`` starts the run's info (a sweep's tag); ``on_start()`` is called once the
    run is accepted, ``announce(where)`` hears where it is recorded.

    Under ``torchrun`` (several processes) every process trains its shard; only the main one (rank 0)
    takes the folder's lock, records the run and writes; the others return None."""
    from pqa_core.training import distributed

    group = distributed.init_from_env()
    ex, updates, named_configs, config, resumed_from, files = accept(phase, items, mongo_url, no_db, file_storage)
    if not group.is_main:
        from pqa_core.pipeline import Pipeline

        try:
            Pipeline(config).run()  # the output folder, and every decision, come from the main process
        except Exception as exc:  # the main process stores the run FAILED with this line, the launcher says it
            if debug:
                raise
            line = str(exc) if isinstance(exc, PqaError) else f"{type(exc).__name__}: {exc}"
            distributed.record_failure(line)
            if not os.environ.get(distributed.ERRORS_ENV):  # torchrun started by hand: no launcher to say it
                click.echo(f"Error: training process {group.rank}: {line.splitlines()[0] if line else ''}", err=True)
            raise click.exceptions.Exit(1) from None
        return None
    info = dict(info or {})
    if files:
        info["config_files"] = files
    if resumed_from is not None:
        info["resumed_from_run"] = resumed_from
    with output_folder_of(config):
        check_reuse(config)
        if on_start is not None:
            on_start()
        where = attach_observer(ex, mongo_url, no_db, file_storage)
        if where and announce is not None:
            announce(where)
        try:
            return tracked_run(ex, updates, named_configs, info, debug=debug)
        finally:
            stop_interrupting_on_sigterm()


def launch(nproc: int, phase: str, sacred_args, *, mongo_url, no_db, file_storage, as_json, debug) -> int:
    """``pqa run`` again in ``nproc`` processes under torchrun (``torch.distributed.run --standalone``);
    returns its exit status."""
    import os
    import shutil
    import subprocess
    import sys

    from pqa_core.training.distributed import ERRORS_ENV

    command = [sys.executable, "-m", "pqa_experiments.cli.torchrun", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "pqa_experiments.cli.main"] + (["--debug"] if debug else []) + ["run", phase]
    command += (["--no-db"] if no_db else []) + (["-F", file_storage] if file_storage else [])
    command += ["--json"] if as_json else []
    errors = tempfile.mkdtemp(prefix="pqa-workers-")  # a failing process leaves its error line here
    env = dict(os.environ, **{WARNED_ENV: "1", ERRORS_ENV: errors})  # accept() has said the config files' warnings
    if mongo_url:
        env["PQA_MONGO_URL"] = mongo_url  # not on a command line other users can read
    log.info("starting %d processes: torchrun --standalone --nproc-per-node=%d -m pqa_experiments.cli.main run %s ...",
             nproc, nproc, phase)
    try:
        return subprocess.run(command + list(sacred_args), env=env).returncode
    finally:
        shutil.rmtree(errors, ignore_errors=True)


def interrupt_on_sigterm() -> None:
    """``kill`` (SIGTERM) ends the run like Ctrl-C, so Sacred stores it as INTERRUPTED, not RUNNING forever.
    Under torchrun the SIGTERM is torchrun's, stopping the others because a process failed or ended: the
    run is FAILED with that process's error line."""
    import signal

    from pqa_core.training.distributed import WorkerFailed, failure_of_others, world_from_env

    def handler(signum, frame):
        if world_from_env() > 1:
            raise WorkerFailed(failure_of_others() or "torchrun stopped this process (SIGTERM): another training "
                               "process ended")
        raise KeyboardInterrupt(f"signal {signum}")

    handler.pqa_run_handler = True
    signal.signal(signal.SIGTERM, handler)


def stop_interrupting_on_sigterm() -> None:
    """Once the run has ended, a handler that raises would fire inside interpreter shutdown (pymongo's
    atexit, where torchrun's SIGTERM to the other processes lands) and print a traceback under the run's
    one error line. Alone, SIGTERM then ends the process as it ends any other; under torchrun it is
    ignored, so this process still says its error line and exits by itself (torchrun kills it after its
    grace period if not)."""
    import signal
    import threading

    from pqa_core.training.distributed import world_from_env

    if threading.current_thread() is threading.main_thread() and \
            getattr(signal.getsignal(signal.SIGTERM), "pqa_run_handler", False):
        signal.signal(signal.SIGTERM, signal.SIG_IGN if world_from_env() > 1 else signal.SIG_DFL)


def show(phase: str, command: str, items: List[str]) -> None:
    """A Sacred command (``print_config``, ...) on ``phase``'s experiment; ``print_config`` then checks the
    components' names and parameters as a run checks them (the config is shown first)."""
    from pqa_core.components.contract import check_component_settings
    from pqa_core.config import PQAConfig

    from pqa_experiments.tracking.experiments import make_experiment

    ex = make_experiment(phase)
    updates, named_configs, _ = sacred_inputs(ex, items)
    with quiet_sacred():
        shown = ex.run(command, config_updates=updates, named_configs=named_configs, options={"--unobserved": True})
    if command == "print_config":
        check_component_settings(PQAConfig.from_dict(dict(shown.config)))
