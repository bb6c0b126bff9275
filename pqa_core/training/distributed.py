"""Training on several processes (``torchrun``; gloo on CPU, nccl on GPU) with the results of one process.

Every process builds the same model and walks the same global batches; each trains on its shard of a
batch (``shard``), and after the backward the gradients are made equal everywhere
(``sync_gradients``), so every process applies the same optimizer step and ``doc_vectors`` stays the
same on all of them. This is what ``DistributedDataParallel`` does for dense parameters (one flat
all-reduce of the gradients, averaged over processes); the doc-vector table's sparse gradient is
exchanged as its touched rows only (their indices and values gathered from every process), never as a
dense ``N x d_z`` tensor, and no DDP wrapper is needed around a model the trainers call through
several methods.

For the average to be the gradient of the whole global batch, a loss that is a mean over units
(tokens, questions) takes the mean with :func:`batch_mean`: inside a training step each process
divides by the units of *all* processes (counted once per step in :meth:`Context.finish_forward`),
exactly as one process holding the whole batch would. A loss that does not is averaged over processes
as DDP averages it. Only the main process (rank 0) records the run, evaluates and writes checkpoints;
checkpoints hold no trace of the process count, so a run resumes on any number of processes.

A process that fails leaves its one error line in the folder ``$PQA_WORKER_ERRORS`` names (``pqa run
--nproc N`` makes it): the main process, stopped by torchrun or by the broken connection, stores the
run FAILED with that line (:class:`WorkerFailed`), and the launcher says it once.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import sys
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist

from pqa_core.errors import PqaError

_current: Optional["Context"] = None
ERRORS_ENV = "PQA_WORKER_ERRORS"


class WorkerFailed(PqaError):
    """Another training process failed or ended: this one stops, and the run is FAILED with its reason."""


def record_failure(message: str) -> None:
    """Leave this process's error line where the others and the launcher read it (``ERRORS_ENV``)."""
    folder = os.environ.get(ERRORS_ENV)
    if not folder or world_from_env() <= 1:
        return
    line = next((part.strip() for part in str(message).splitlines() if part.strip()), "") or "unknown error"
    with contextlib.suppress(OSError):
        with open(os.path.join(folder, f"rank-{os.environ.get('RANK', '0')}.txt"), "w") as f:
            f.write(line[:500])


def failure_of_others() -> Optional[str]:
    """``training process N failed: <its error line>`` for the first other process that left one, or None."""
    folder = os.environ.get(ERRORS_ENV)
    if not folder or not os.path.isdir(folder):
        return None
    mine = f"rank-{os.environ.get('RANK', '0')}.txt"
    for name in sorted(os.listdir(folder)):
        if name.startswith("rank-") and name != mine:
            with contextlib.suppress(OSError), open(os.path.join(folder, name)) as f:
                return f"training process {name[5:-4]} failed: {f.read().strip()}"
    return None


def world_from_env() -> int:
    """The process count ``torchrun`` set (1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def current() -> "Context":
    """The process group this process trains in (a single-process context when there is none)."""
    return _current or SINGLE


def init_from_env(device: Optional[str] = None, timeout_minutes: int = 120) -> "Context":
    """Join the group ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_*``):
    nccl when the device is CUDA, else gloo. Idempotent; a single process gets the single context."""
    global _current
    if _current is not None:
        return _current
    if world_from_env() <= 1:
        return SINGLE
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = device or "auto"
    use_cuda = torch.cuda.is_available() and (device == "auto" or device.startswith("cuda"))
    if use_cuda:
        torch.cuda.set_device(local_rank)  # "cuda" is this process's GPU from here on
    if not dist.is_initialized():  # collectives go to gloo for CPU tensors, nccl for CUDA ones
        dist.init_process_group("cpu:gloo,cuda:nccl" if use_cuda else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    _current = Context(dist.get_rank(), dist.get_world_size(), local_rank,
                       torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"))
    return _current


def shutdown() -> None:
    global _current
    if _current is not None and dist.is_initialized():
        dist.destroy_process_group()
    _current = None


class _Step:
    """The units each :func:`batch_mean` call saw in this process during one step's forward."""

    def __init__(self, weight: float):
        self.weight = weight
        self.calls: List[Tuple[str, float, dict]] = []
        self.seen: Dict[str, int] = {}


class _GlobalMean(torch.autograd.Function):
    """Forward: this process's mean (what it reports). Backward: ``world x weight / global units`` per value,
    so that averaging the processes' gradients gives the gradient of the global batch's mean."""

    @staticmethod
    def forward(ctx, values, holder):
        ctx.holder = holder
        ctx.shape = values.shape
        return values.sum() / max(values.numel(), 1)

    @staticmethod
    def backward(ctx, grad):
        return grad.expand(ctx.shape) * ctx.holder["scale"], None


class Context:
    """One process's place in the group: ``rank``, ``world``, ``local_rank``, ``device``."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, device: Optional[torch.device] = None):
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.device = device
        self._step: Optional[_Step] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    # --- data -------------------------------------------------------------------------------
    def shard(self, batch: Dict[str, Any]) -> Tuple[Dict[str, Any], float]:
        """This process's contiguous slice of a global batch, and its weight: 1, or 0 when the batch
        has fewer examples than processes and this one got none (it then trains on the batch's first
        example with weight 0, so it runs the same collectives and contributes nothing)."""
        if not self.active:
            return batch, 1.0
        size = _batch_size(batch)
        bounds = [size * r // self.world for r in range(self.world + 1)]
        start, stop = bounds[self.rank], bounds[self.rank + 1]
        weight = 1.0
        if stop <= start:
            start, stop, weight = 0, 1, 0.0
        return {k: _slice(v, start, stop, size) for k, v in batch.items()}, weight

    # --- one training step --------------------------------------------------------------------
    @contextlib.contextmanager
    def forward(self, weight: float = 1.0):
        """A training step's forward: inside, :func:`batch_mean` counts units; leaving it sums them over
        the processes (:meth:`finish_forward`), so the backward that follows has its scales."""
        self._step = _Step(weight) if self.active else None
        try:
            yield self
            self.finish_forward()
        finally:
            self._step = None

    def batch_mean(self, values: torch.Tensor, key: str) -> torch.Tensor:
        step = self._step
        if step is None:
            return values.mean() if values.numel() else values.sum() * 0.0
        n = step.seen.get(key, 0)
        step.seen[key] = n + 1
        holder = {"scale": 0.0}
        step.calls.append((f"{key}#{n}", values.numel() * step.weight, holder))
        return _GlobalMean.apply(values * step.weight if step.weight != 1.0 else values, holder)

    def finish_forward(self) -> None:
        """Sum every :func:`batch_mean`'s units over the processes (one collective per step, whatever
        branches each process took) and set each one's gradient scale."""
        step = self._step
        if step is None:
            return
        mine = {key: units for key, units, _ in step.calls}
        gathered: List[Optional[Dict[str, float]]] = [None] * self.world
        dist.all_gather_object(gathered, mine)
        for key, units, holder in step.calls:
            total = sum(g.get(key, 0.0) for g in gathered)
            holder["scale"] = self.world * step.weight / total if total > 0 else 0.0

    def sync_gradients(self, params: Iterable[torch.Tensor]) -> None:
        """Average the gradients over the processes: dense ones in one flat all-reduce, a sparse
        table's as its touched rows (gathered, summed, divided by the process count)."""
        if not self.active:
            return
        params = [p for p in params if p.requires_grad]
        dense = [p for p in params if p.grad is None or not p.grad.is_sparse]
        sparse = [p for p in params if p.grad is not None and p.grad.is_sparse]
        has = torch.tensor([p.grad is not None for p in dense], dtype=torch.float32, device=self._comm_device())
        dist.all_reduce(has)
        dense = [p for p, h in zip(dense, has.tolist()) if h > 0]
        if dense:
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in dense])
            flat = flat.to(self._comm_device())
            dist.all_reduce(flat)
            flat.div_(self.world)
            offset = 0
            for p in dense:
                n = p.numel()
                p.grad = flat[offset:offset + n].view_as(p).to(p.device).clone()
                offset += n
        kinds = torch.tensor([len(sparse)], device=self._comm_device())
        dist.all_reduce(kinds, op=dist.ReduceOp.MAX)
        if int(kinds) != len(sparse):
            raise RuntimeError("processes disagree on which tables have sparse gradients")
        for p in sparse:
            p.grad = self._sum_rows(p.grad.coalesce()) / self.world

    def _sum_rows(self, grad: torch.Tensor) -> torch.Tensor:
        """A sparse row gradient summed over processes: every process's (rows, values), concatenated."""
        device = self._comm_device()
        rows, values = grad.indices()[0].to(device), grad.values().to(device)
        count = torch.tensor([rows.numel()], device=device)
        counts = [torch.zeros_like(count) for _ in range(self.world)]
        dist.all_gather(counts, count)
        most = int(max(int(c) for c in counts))
        padded_rows = torch.zeros(most, dtype=rows.dtype, device=device)
        padded_values = torch.zeros(most, *values.shape[1:], dtype=values.dtype, device=device)
        padded_rows[:rows.numel()] = rows
        padded_values[:rows.numel()] = values
        all_rows = [torch.zeros_like(padded_rows) for _ in range(self.world)]
        all_values = [torch.zeros_like(padded_values) for _ in range(self.world)]
        dist.all_gather(all_rows, padded_rows)
        dist.all_gather(all_values, padded_values)
        rows = torch.cat([r[:int(c)] for r, c in zip(all_rows, counts)])
        values = torch.cat([v[:int(c)] for v, c in zip(all_values, counts)])
        out = torch.sparse_coo_tensor(rows[None].to(grad.device), values.to(grad.device), grad.shape,
                                      check_invariants=False)
        return out.coalesce()

    def _comm_device(self) -> torch.device:
        return self.device if self.device is not None and self.device.type == "cuda" else torch.device("cpu")

    # --- reporting and coordination --------------------------------------------------------------
    def mean_metrics(self, metrics: Dict[str, float], weight: float = 1.0) -> Dict[str, float]:
        """A step's scalar metrics, each averaged over the processes that reported it with examples
        (the same on every process; they may report different keys)."""
        if not self.active:
            return metrics
        gathered: List[Optional[Tuple[Dict[str, float], float]]] = [None] * self.world
        dist.all_gather_object(gathered, ({k: float(v) for k, v in metrics.items()}, float(weight)))
        sums: Dict[str, List[float]] = {}
        for values, w in gathered:
            for key, value in values.items():
                total = sums.setdefault(key, [0.0, 0.0])
                total[0] += value * w
                total[1] += w
        return {k: (v / w if w > 0 else 0.0) for k, (v, w) in sorted(sums.items())}

    def broadcast_object(self, value):
        """Rank 0's ``value`` on every process."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_tensors(self, tensors: Iterable[torch.Tensor]) -> None:
        """Rank 0's values of ``tensors`` (in place) on every process."""
        if not self.active:
            return
        with torch.no_grad():
            for tensor in tensors:
                buffer = tensor.detach().to(self._comm_device())
                dist.broadcast(buffer, src=0)
                if buffer.data_ptr() != tensor.data_ptr():
                    tensor.copy_(buffer)

    def check_same(self, tensor: torch.Tensor, name: str) -> None:
        """Refuse to train when the processes built different ``tensor``s (a seed or data mismatch)."""
        if not self.active:
            return
        t = tensor.detach().double()
        mine = (float(t.sum()), float((t * t).sum()), tuple(tensor.shape))
        gathered: List[Optional[tuple]] = [None] * self.world
        dist.all_gather_object(gathered, mine)
        if any(g != gathered[0] for g in gathered):
            raise RuntimeError(f"the processes built different {name} ({gathered}): same config and data "
                               f"files on every machine?")

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self):
        """The main process runs the block first (it may fill a cache the others then read)."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


SINGLE = Context()


def batch_mean(values: torch.Tensor, key: Optional[str] = None) -> torch.Tensor:
    """The mean of per-unit loss values (per token, per question) over the whole global batch.

    In one process: ``values.mean()`` (0 for no values). Inside a multi-process training step: this
    process's mean in the forward, and in the backward the gradient of the global batch's mean (the
    units of every process counted). ``key`` names the call (default: the caller's file and line).
    """
    context = current()
    if context._step is None:
        return values.mean() if values.numel() else values.sum() * 0.0
    if key is None:
        frame = sys._getframe(1)
        key = f"{frame.f_code.co_filename}:{frame.f_lineno}"
    return context.batch_mean(values, key)


def _batch_size(batch: Dict[str, Any]) -> int:
    for value in batch.values():
        if torch.is_tensor(value) and value.dim() > 0:
            return int(value.shape[0])
        if isinstance(value, (list, tuple)):
            return len(value)
    raise ValueError("a batch with no tensor or list to split")


def _slice(value, start: int, stop: int, size: int):
    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == size:
        return value[start:stop]
    if isinstance(value, (list, tuple)) and len(value) == size:
        return value[start:stop]
    return value
