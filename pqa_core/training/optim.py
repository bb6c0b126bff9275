"""AdamW whose ``rowwise`` param groups update only the rows that received a gradient.

``doc_vectors`` is an ``[N, d_z]`` table and a batch touches a few of its rows. A dense AdamW
moves every row at every step (momentum keeps pushing a document that is not in the batch) and
costs O(N) per step. Here a ``rowwise`` group keeps a step count per row: a row's moments,
bias correction and value change only in steps where its gradient is non-zero, so a document's
trajectory depends on its own gradients alone, whatever else the table holds. Sparse gradients
(``F.embedding(..., sparse=True)``) are read as they are, without densifying; dense ones are
reduced to their non-zero rows. Other groups are plain AdamW (the same update as ``torch.optim.AdamW``).
"""
from __future__ import annotations

import math
from typing import Iterable, List

import torch
from torch.optim import Optimizer


class RowwiseAdamW(Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, rowwise: bool = False, state_factory=None):
        # state_factory(table, name) -> zeros like the table, for a rowwise table's moments (a mapped file)
        self.state_factory = state_factory or (lambda table, name: torch.zeros_like(table))
        if not lr > 0 or not math.isfinite(lr):
            raise ValueError(f"learning rate must be finite and > 0, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      rowwise=rowwise))
        for group in self.param_groups:
            group["betas"] = tuple(group["betas"])
            if group["rowwise"] and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("rowwise param groups hold 2-D tables only")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["rowwise"]:
                    self._rowwise_step(p, group)
                else:
                    self._dense_step(p, group)
        return loss

    def _dense_step(self, p: torch.Tensor, group) -> None:
        grad = p.grad.to_dense() if p.grad.is_sparse else p.grad
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float64)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        step = float(state["step"])
        _adamw_update(p, grad, state["exp_avg"], state["exp_avg_sq"], group["lr"], beta1, beta2, group["eps"],
                      group["weight_decay"], 1 - beta1 ** step, 1 - beta2 ** step)

    def _rowwise_step(self, p: torch.Tensor, group) -> None:
        rows, values = touched_rows(p.grad)
        if rows.numel() == 0:
            return
        state = self.state[p]
        if not state:
            state["row_step"] = torch.zeros(p.shape[0], dtype=torch.float64, device=p.device)
            state["exp_avg"] = self.state_factory(p, "exp_avg")
            state["exp_avg_sq"] = self.state_factory(p, "exp_avg_sq")
        beta1, beta2 = group["betas"]
        state["row_step"][rows] += 1
        step = state["row_step"][rows].to(torch.float32)[:, None]
        # the rows' update in float32 whatever the table's dtype; a bfloat16 table (and its moments) takes
        # the result by stochastic rounding, so updates smaller than its precision still move it on average
        exp_avg, exp_avg_sq = state["exp_avg"][rows].float(), state["exp_avg_sq"][rows].float()
        value = p[rows].float()
        _adamw_update(value, values.float(), exp_avg, exp_avg_sq, group["lr"], beta1, beta2, group["eps"],
                      group["weight_decay"], 1 - beta1 ** step, 1 - beta2 ** step)
        rounding = _rounding_generator(state, p) if p.dtype == torch.bfloat16 else None
        p[rows] = _stored(value, p.dtype, rounding)
        state["exp_avg"][rows] = _stored(exp_avg, p.dtype, rounding)
        state["exp_avg_sq"][rows] = _stored(exp_avg_sq, p.dtype, rounding)


def _rounding_generator(state, p: torch.Tensor) -> torch.Generator:
    """A generator seeded by the table's own count of stochastically rounded steps (saved with the
    optimizer state), so a resumed run rounds exactly as an uninterrupted one."""
    if "rounding_step" not in state:
        state["rounding_step"] = torch.zeros((), dtype=torch.int64)
    state["rounding_step"] += 1
    return torch.Generator(device=p.device).manual_seed(1_000_003 * int(state["rounding_step"]) + 17)


def _stored(value: torch.Tensor, dtype: torch.dtype, generator) -> torch.Tensor:
    """``value`` (float32) as ``dtype``: itself, or for bfloat16 rounded up or down at random in proportion
    to its distance to each neighbour (random low 16 bits added, then cut off)."""
    if dtype == torch.float32:
        return value
    if dtype != torch.bfloat16 or generator is None:
        return value.to(dtype)
    noise = torch.randint(0, 1 << 16, value.shape, dtype=torch.int32, device=value.device, generator=generator)
    bits = (value.contiguous().view(torch.int32) + noise) & -65536  # keep the 16 high bits
    return bits.view(torch.float32).to(torch.bfloat16)


def _adamw_update(p, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, bias1, bias2) -> None:
    """One AdamW update in place; ``bias1``/``bias2`` are floats or per-row ``[R, 1]`` tensors."""
    if weight_decay:
        p.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / (bias2 ** 0.5 if torch.is_tensor(bias2) else math.sqrt(bias2))).add_(eps)
    p.sub_(lr * exp_avg / bias1 / denom)


def touched_rows(grad: torch.Tensor):
    """``(rows [R], row gradients [R, d])`` of a table's gradient, rows sorted and distinct."""
    if grad.is_sparse:
        grad = grad.coalesce()
        rows, values = grad.indices()[0], grad.values()
        nonzero = values.ne(0).any(dim=1)
        return rows[nonzero], values[nonzero]
    rows = grad.ne(0).any(dim=1).nonzero().flatten()
    return rows, grad[rows]


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float) -> float:
    """``clip_grad_norm_`` that also takes sparse gradients (it scales their values in place)."""
    params = [p for p in params if p.grad is not None]
    grads: List[torch.Tensor] = [p.grad for p in params]
    if not grads:
        return 0.0
    squares = []
    for g in grads:
        if g.is_sparse:
            g = g.coalesce()
        values = g._values() if g.is_sparse else g
        squares.append(values.detach().float().pow(2).sum())
    total = float(torch.stack(squares).sum().sqrt())
    if max_norm and total > max_norm:
        scale = max_norm / (total + 1e-6)
        for p in params:
            if p.grad.is_sparse:
                p.grad = p.grad.coalesce()
                p.grad._values().mul_(scale)
            else:
                p.grad.mul_(scale)
    return total
