"""What the write and read trainers share: seeding, deterministic batch order, the epoch loop
with checkpoint/resume, and the logger interface the loop reports to.

The loop knows nothing of Sacred: a ``RunLogger`` receives scalars, artifacts and info, and
Sacred, a test or a notebook each supply their own.
"""
from __future__ import annotations

import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pqa_core.errors import NonFiniteError
from pqa_core.training import distributed
from pqa_core.storage.checkpoints import load_checkpoint, resume_checkpoint, save_checkpoint, step_dir
from pqa_core.storage.tensor_files import check_mapped
from pqa_core.modeling.device import pin_batches
from pqa_core.training.optim import clip_grad_norm

log = logging.getLogger(__name__)


class RunLogger:
    """Where training reports. The default writes scalars to the Python log at debug level."""

    def log_scalar(self, name: str, value: float, step: int) -> None:
        log.debug("%s step %d: %.5f", name, step, value)

    def add_artifact(self, path: str, name: Optional[str] = None) -> None:
        log.info("artifact %s", path)

    def set_info(self, key: str, value: Any) -> None:
        log.debug("info %s = %r", key, value)


class RecordingLogger(RunLogger):
    """Keeps everything in memory (tests, notebooks)."""

    def __init__(self):
        self.scalars: Dict[str, List[tuple]] = {}
        self.artifacts: List[str] = []
        self.info: Dict[str, Any] = {}

    def log_scalar(self, name, value, step):
        self.scalars.setdefault(name, []).append((step, float(value)))

    def add_artifact(self, path, name=None):
        self.artifacts.append(str(path))

    def set_info(self, key, value):
        self.info[key] = value


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def epoch_loader(dataset, batch_size: int, seed: int, epoch: int, shuffle: bool = True,
                 pin_memory: bool = False) -> DataLoader:
    """Batch order depends only on (seed, epoch), so a resumed run sees the same batches. ``pin_memory``:
    batches collated into pinned memory (a GPU model copies them without blocking)."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      collate_fn=dataset.collate, num_workers=0, pin_memory=pin_memory)


def to_device(batch: Dict[str, Any], device) -> Dict[str, Any]:
    """Tensors moved to ``device``; from pinned memory without blocking."""
    return {k: v.to(device, non_blocking=v.is_pinned()) if torch.is_tensor(v) else v for k, v in batch.items()}


def show_progress() -> bool:
    """Progress bars, unless ``PQA_PROGRESS=0``; with several processes, on the main one only."""
    return os.environ.get("PQA_PROGRESS", "1") != "0" and os.environ.get("RANK", "0") == "0"


class EpochLoop:
    """Runs ``step_fn`` over epochs of batches with periodic atomic checkpoints and exact resume.

    ``step_fn(batch) -> dict of floats`` performs one optimisation step. ``epoch_end_fn(epoch, step)
    -> dict`` may evaluate. Checkpoints live under ``checkpoint_root/step-NNNNNNN``; the one
    at the end of the loop is also copied to ``checkpoint_root/final``.
    """

    def __init__(self, model, optimizer, *, phase: str, checkpoint_root, config_dict: Dict[str, Any],
                 logger: RunLogger, checkpoint_every: int):
        self.model = model
        self.optimizer = optimizer
        self.phase = phase
        self.root = Path(checkpoint_root)
        self.config_dict = config_dict
        self.logger = logger
        self.checkpoint_every = checkpoint_every
        self.steps_done = 0  # global steps done (a resumed run's included)
        self._seconds_before: Optional[float] = 0.0  # training time of the runs this one resumed
        self._started: Optional[float] = None
        self._ended: Optional[float] = None  # the loop's end: what the final checkpoint records

    def seconds(self) -> Optional[float]:
        """Wall seconds this phase's loop has run, summed over the processes that resumed it in turn: an
        artifact's honest training time. None when it resumed a checkpoint that did not record its own."""
        if self._seconds_before is None:
            return None
        if self._started is None:
            return self._seconds_before
        return self._seconds_before + ((self._ended or time.perf_counter()) - self._started)

    @property
    def final_dir(self) -> Path:
        return self.root / "final"

    def resume_point(self, batches_per_epoch: int) -> tuple:
        """(epoch, step_in_epoch, global_step, the epoch's metric sums so far, steps summed) to start
        from, loading the checkpoint a resume goes on from (``checkpoints.resume_checkpoint``: a finished
        phase asked for more epochs goes on from its final) if any; the sums keep a resumed epoch's
        averages exact."""
        latest = resume_checkpoint(self.root, batches_per_epoch)
        if latest is None:
            return 0, 0, 0, {}, 0
        state = load_checkpoint(latest, self.model, self.optimizer, config=self.config_dict)
        log.info("%s phase: resuming from %s (step %d)", self.phase, latest, state["step"])
        self._seconds_before = state.get("seconds")  # None: a checkpoint older than this record
        self.logger.set_info(f"{self.phase}_resumed_from", str(latest))
        partial = state.get("metrics") or {}
        return (state["epoch"], state["step_in_epoch"], state["step"], dict(partial.get("epoch_sums") or {}),
                int(partial.get("epoch_steps") or 0))

    def save(self, path, step, epoch, step_in_epoch, metrics=None) -> Optional[Path]:
        """Only the main process writes checkpoints (every process holds the same state)."""
        if not distributed.current().is_main:
            return None
        check_mapped()
        return save_checkpoint(path, self.model, self.optimizer, step=step, epoch=epoch,
                               step_in_epoch=step_in_epoch, config=self.config_dict, phase=self.phase,
                               metrics=metrics, seconds=self.seconds())

    def run(self, dataset, *, epochs: int, batch_size: int, seed: int, step_fn: Callable[[dict], dict],
            epoch_end_fn: Optional[Callable[[int, int], dict]] = None, max_steps: int = 0) -> Dict[str, float]:
        """``max_steps`` > 0 ends the loop after that many steps in all (within an epoch, which then counts)."""
        batches_per_epoch = (len(dataset) + batch_size - 1) // batch_size
        epoch, skip, step, resumed_sums, resumed_count = self.resume_point(batches_per_epoch)
        self._started = time.perf_counter()
        self.steps_done = step
        total = epochs * batches_per_epoch if not max_steps else min(max_steps, epochs * batches_per_epoch)
        last: Dict[str, float] = {}
        bar = tqdm(total=total, initial=step, desc=f"{self.phase} phase",
                   disable=not show_progress(), dynamic_ncols=True, leave=False)
        stopped = bool(max_steps) and step >= max_steps
        # resumed where a step budget stopped, before the final checkpoint was written: that epoch's end
        # (its averages, its evaluation) is all that is left of it
        while epoch < epochs and (not stopped or skip):
            sums: Dict[str, float] = resumed_sums
            count = resumed_count
            resumed_sums, resumed_count = {}, 0
            pin = pin_batches(self.model.doc_vectors.device)
            for i, batch in enumerate(epoch_loader(dataset, batch_size, seed, epoch, pin_memory=pin)):
                if i < skip:
                    continue
                if stopped:
                    break
                check_mapped()  # a mapped table cut short would be a SIGBUS in this step
                try:
                    metrics = step_fn(batch)
                except NonFiniteError as exc:  # no step checkpoint, no final checkpoint: the run is FAILED
                    raise NonFiniteError(f"{self.phase} phase, step {step + 1} (epoch {epoch + 1}): {exc}; "
                                         "the run stops and writes no final checkpoint") from None
                step += 1
                self.steps_done = step
                count += 1
                for name, value in metrics.items():
                    self.logger.log_scalar(f"{self.phase}.{name}", value, step)
                    sums[name] = sums.get(name, 0.0) + value
                bar.update(1)
                bar.set_postfix({k: f"{v:.3f}" for k, v in metrics.items() if "loss" in k})
                stopped = bool(max_steps) and step >= max_steps
                # a step budget's stop is a step checkpoint too: a larger budget resumes from it
                if stopped or (self.checkpoint_every and step % self.checkpoint_every == 0):
                    self.save(step_dir(self.root, step), step, epoch, i + 1,
                              metrics={"epoch_sums": dict(sums), "epoch_steps": count})
                if stopped:
                    break
            skip = 0
            epoch += 1
            last = {f"epoch_{k}": v / max(count, 1) for k, v in sums.items()}
            if epoch_end_fn is not None and distributed.current().is_main:  # evaluation: the main process's
                last.update(epoch_end_fn(epoch, step))
            for name, value in last.items():
                self.logger.log_scalar(f"{self.phase}.{name}", value, step)
            log.info("%s epoch %d/%d: %s", self.phase, epoch, epochs,
                     ", ".join(f"{k}={v:.4f}" for k, v in last.items()))
        bar.close()
        self._ended = time.perf_counter()
        self.save(self.final_dir, step, epoch, 0, metrics=last)
        return last


def apply_gradients(loss: torch.Tensor, optimizer, params, grad_clip: float) -> None:
    """The end of every training step: backward, the gradients averaged over the processes when several
    train (``pqa_core.training.distributed``), clipped, one optimizer step. A non-finite loss or gradient
    norm raises :class:`NonFiniteError` before the step, so no NaN reaches the weights (the norm is the
    averaged one: every process stops at the same step)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    distributed.current().sync_gradients(params)
    norm = clip_grad_norm(params, grad_clip)
    value = float(loss.detach())
    if not (math.isfinite(value) and math.isfinite(norm)):
        raise NonFiniteError(f"the loss is {value:g}, the gradient norm {norm:g} (non-finite)")
    optimizer.step()


def param_groups(named_groups: Iterable[tuple]) -> List[Dict[str, Any]]:
    """``[(name, params, lr[, extra options]), ...]`` -> optimizer param groups, dropping empty and
    frozen ones."""
    groups = []
    for name, params, lr, *extra in named_groups:
        params = [p for p in params if p.requires_grad]
        if params:
            groups.append({"params": params, "lr": lr, "name": name, **(extra[0] if extra else {})})
    return groups
