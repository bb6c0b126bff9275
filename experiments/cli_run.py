"""``pqa run PHASE [Sacred args]``: validate everything first, then one tracked Sacred run.

Bad config keys, plugin names, plugin kwargs, data files and the checkpoints ``init_from`` and
``resume`` would load are caught before the run is created, so they leave nothing in the database.
A folder another live run writes is refused (its lock), and an unreachable database is reported,
before any training starts.
"""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import List, Optional, Tuple

import click

from pqa_core.errors import CheckpointError, PqaError, UsageError

log = logging.getLogger(__name__)
PHASES = ("write", "read", "eval", "pipeline", "control")
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
    from pqa_core.builder import check_d_z
    from pqa_core.checkpoints import check_loadable
    from pqa_core.config import PQAConfig
    from pqa_core.contract import check_config_components
    from pqa_core.data import load_corpus, load_qa
    from pqa_core.pipeline import checkpoints_to_load, resolve_data_path

    from .sacred_experiments import NAMED_CONFIGS

    for name in named_configs:
        if name not in NAMED_CONFIGS:
            raise UsageError(f"unknown named config {name!r}; available: {', '.join(sorted(NAMED_CONFIGS))}")
    from sacred.utils import ConfigAddedError

    try:
        with quiet_sacred():
            run = ex._create_run(config_updates=updates, named_configs=named_configs, options={"--unobserved": True})
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
    except KeyError as exc:
        raise UsageError(f"bad config: {exc}") from None
    config = PQAConfig.from_dict(dict(run.config))
    check_d_z(config)
    check_config_components(config)  # names, parameters, then each component's contract on a stand-in model
    corpus = load_corpus(resolve_data_path(config.data.corpus))
    load_qa(resolve_data_path(config.data.qa), corpus)
    load_qa(resolve_data_path(config.data.eval_qa), corpus)
    checkpoints = checkpoints_to_load(config)
    if checkpoints:  # init_from's and resume's: torn, corrupt, other model or size
        from pqa_core.data import split_passages
        from pqa_core.llm import load_tokenizer

        rows = split_passages(corpus, load_tokenizer(config.model.llm), config.data.max_doc_tokens).documents
        row_ids = [[d.doc_id, d.part] for d in rows]
        for index, checkpoint in enumerate(checkpoints):
            grow = bool(config.init_from) and index == 0  # init_from's may start a larger corpus
            check_loadable(checkpoint, config.to_dict(), len(rows), row_ids=row_ids, grow=grow)
    return config


def output_folder_of(config):
    """The lock of the folder this run will write, when that is known before it starts (resume,
    output_dir): held from here on, a second process is refused before anything is stored."""
    from pqa_core.run_lock import output_folder_lock

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
    from . import db
    from .observers import make_mongo_observer

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

        from . import db

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
    from pqa_core.stats import format_interval

    parts = []
    for key, value in result.items():
        if key.endswith(("_ci95_low", "_ci95_high")):
            continue
        parts.append(format_interval(result, key) if isinstance(value, float) else f"{key}={value}")
    return ", ".join(parts)


def run_failure(ex, exc: Exception) -> PqaError:
    """An unexpected exception inside a run as one line; the traceback stays in the stored run."""
    run_id = getattr(ex.current_run, "_id", None)
    text = str(exc).strip()
    reason = f"{type(exc).__name__}: {text.splitlines()[0][:500]}" if text else type(exc).__name__
    run = f"run {run_id}" if run_id is not None else "the run"
    return PqaError(f"{run} FAILED: {reason} (the traceback is stored with the run; pqa --debug run ... prints it)")


def tracked_run(ex, updates, named_configs, resumed_from: Optional[int]):
    """``ex.run`` with its failures as one line; losses of the observer are raised at the end."""
    try:
        return ex.run(config_updates=updates, named_configs=named_configs,
                      info={"resumed_from_run": resumed_from} if resumed_from is not None else None)
    except KeyboardInterrupt:
        raise click.Abort()
    except PqaError:
        raise
    except Exception as exc:  # a component raising mid-run: Sacred stored it FAILED with the traceback
        ctx = click.get_current_context(silent=True)
        if ctx is not None and (ctx.find_root().obj or {}).get("debug"):
            raise
        raise run_failure(ex, exc) from None
    finally:
        for observer in ex.observers:
            if hasattr(observer, "raise_for_losses"):
                observer.raise_for_losses()


def interrupt_on_sigterm() -> None:
    """``kill`` (SIGTERM) ends the run like Ctrl-C, so Sacred stores it as INTERRUPTED, not RUNNING forever."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("phase", type=click.Choice(PHASES))
@click.argument("sacred_args", nargs=-1, type=click.UNPROCESSED)
@click.option("--mongo-url", envvar=None, help="MongoDB URL (else $PQA_MONGO_URL, the config file, or the embedded server).")
@click.option("--no-db", is_flag=True, help="Do not record the run anywhere.")
@click.option("-F", "--file-storage", type=click.Path(file_okay=False), help="Record to a Sacred file-storage folder instead of MongoDB.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def run(phase, sacred_args, mongo_url, no_db, file_storage, as_json):
    """Run a Sacred experiment: write, read, eval, pipeline or control (a baseline).

    \b
    Examples:
      pqa run pipeline
      pqa run pipeline with smoke
      pqa run pipeline with selector.name=dot read.top_k=5 model.llm=tiny
      pqa run read with init_from=outputs/pqa_write/<run> read.epochs=5
      pqa run pipeline with smoke resume=7   # continue run 7 (a new run) from its last checkpoint
      pqa run pipeline print_config with selector_mlp
      pqa run control with control.name=bm25 read.top_k=3
    """
    from .sacred_experiments import make_experiment

    command, items = split_sacred_args(list(sacred_args))
    updates, named_configs = parse_updates(items)
    ex = make_experiment(phase)
    if command:
        shown = ex.run(command, config_updates=updates, named_configs=named_configs, options={"--unobserved": True})
        if command == "print_config":  # then its plugin names and parameters, checked as a run checks them
            from pqa_core.config import PQAConfig
            from pqa_core.contract import check_component_settings

            check_component_settings(PQAConfig.from_dict(dict(shown.config)))
        return
    resumed_from = resolve_resume(updates, mongo_url, no_db, file_storage)
    config = preflight(ex, updates, named_configs)
    with output_folder_of(config):
        interrupt_on_sigterm()
        where = attach_observer(ex, mongo_url, no_db, file_storage)
        if where:
            click.echo(f"recording to {where}", err=True)
        finished = tracked_run(ex, updates, named_configs, resumed_from)
    result = finished.result or {}
    if as_json:
        click.echo(json.dumps({"run_id": finished._id, "result": result}))
    else:
        click.echo(f"run {finished._id} {finished.status}: {describe_result(result)}")
        if where and where.startswith("MongoDB"):
            click.echo("browse it: pqa board    query it: pqa runs show " + str(finished._id))
