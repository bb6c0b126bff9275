"""The bridge between a Sacred run and ``pqa_core``: a RunLogger that writes to ``_run``,
data files as resources, the run's output folder and the checkpoint locations in ``info``."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Dict

from pqa_core.storage.atomic import sha256_file
from pqa_core.config import TRAINED_PHASES, PQAConfig
from pqa_core.pipeline import Pipeline, resolve_data_path
from pqa_core.components.plugins import components_of_run
from pqa_core.training import distributed
from pqa_core.training.loop import RunLogger

from pqa_experiments.tracking import sacred_fixes

log = logging.getLogger(__name__)



class SacredLogger(RunLogger):
    """Step-wise scalars, artifacts and info, recorded on the Sacred run."""

    def __init__(self, run):
        self.run = run

    def log_scalar(self, name: str, value: float, step: int) -> None:
        self.run.log_scalar(name, float(value), step)

    def add_artifact(self, path: str, name=None) -> None:
        content_type = "application/jsonl" if str(path).endswith(".jsonl") else None
        self.run.add_artifact(str(path), name=name, content_type=content_type)

    def set_info(self, key: str, value: Any) -> None:
        self.run.info[key] = value


def run_output_dir(experiment_name: str, run_id) -> str:
    """``$PQA_OUTPUT_DIR`` (default ./outputs) / experiment / time-runid."""
    root = Path(os.environ.get("PQA_OUTPUT_DIR", "outputs"))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return str(root / experiment_name / f"{stamp}-{run_id if run_id is not None else os.getpid()}")


def run_pipeline_in_sacred(config: Dict[str, Any], run) -> Dict[str, float]:
    pqa_config = PQAConfig.from_dict(config)
    if not pqa_config.output_dir and not pqa_config.resume:
        pqa_config.output_dir = run_output_dir(run.experiment_info["name"], run._id)
    logger = SacredLogger(run)
    data_hashes = {}
    for key in ("corpus", "qa", "eval_qa"):
        path = resolve_data_path(getattr(pqa_config.data, key))
        run.add_resource(str(path))
        data_hashes[key] = {"path": str(path.resolve()), "sha256": sha256_file(path, remember=True)}
    run.info["data"] = data_hashes
    run.info["components"] = components_of_run(pqa_config)  # which plugin, package and version supplied each
    output_dir = Path(pqa_config.resume or pqa_config.output_dir)
    run.info["output_dir"] = str(output_dir.resolve())
    # Store it now, not at the first heartbeat (10 s in): a run killed before that can still be
    # resumed by its id (``resume=<run id>`` reads info.output_dir).
    sacred_fixes.store_info_now(run)
    try:
        pipeline = Pipeline(pqa_config, logger)
        result = pipeline.run()  # holds the folder's lock; a run that fails before writing leaves no folders
    except Exception as exc:  # noqa: BLE001 - under torchrun, a broken connection is another process's failure
        failure = distributed.failure_of_others() if distributed.world_from_env() > 1 else None
        if failure and not isinstance(exc, distributed.WorkerFailed):
            raise distributed.WorkerFailed(failure) from None
        raise
    run.info["timings_s"] = {k: round(v, 2) for k, v in pipeline.timings.items()}
    run.info["checkpoints"] = {p: str((pipeline.checkpoint_root(p) / "final").resolve())
                               for p in TRAINED_PHASES if (pipeline.checkpoint_root(p) / "final").exists()}
    for observer in run.observers:  # from here on a Ctrl-C cannot make the run INTERRUPTED
        if hasattr(observer, "main_finished"):
            observer.main_finished(result)
    return result

