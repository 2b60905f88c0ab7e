"""LION (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms") with decoupled weight decay.

One multi-tensor (``torch._foreach_*``) pass per group of parameters that share a device and dtype, on the local
shards of FSDP2's DTensor parameters: a handful of kernel launches per step instead of eight per parameter,
and none of DTensor's per-operation dispatch. Per step, for every parameter ``p`` with gradient ``g`` and
momentum ``m`` (state ``exp_avg``, as in lion-pytorch, so its checkpoints load here and back):

    p <- p * (1 - lr_t * weight_decay / lr)                 decoupled decay, scaled by the schedule
    p <- p - lr_t * sign(beta1 * m + (1 - beta1) * g)
    m <- beta2 * m + (1 - beta2) * g

``lr_t`` is the group's current (scheduled) learning rate and ``lr`` the configured peak, so a schedule scales
the decay as it scales the step (composer's "decoupled" convention; lion-pytorch's ``decoupled_weight_decay``).
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch

# Temporaries of the update (the interpolated sign) are made for at most this many elements at a time.
_CHUNK_ELEMENTS = 1 << 27


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view: in-place updates land in the DTensor), else the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _chunks(n_items: list[int], limit: int) -> Iterable[slice]:
    start, total = 0, 0
    for i, n in enumerate(n_items):
        if total and total + n > limit:
            yield slice(start, i)
            start, total = i, 0
        total += n
    if start < len(n_items):
        yield slice(start, len(n_items))


def lion_update_(params: list[torch.Tensor], grads: list[torch.Tensor], moms: list[torch.Tensor], *, lr: float,
                 decay: float, beta1: float, beta2: float) -> None:
    """The LION step above on plain tensors of one device and dtype (``decay`` = the factor ``p`` is scaled by)."""
    if decay != 1.0:
        torch._foreach_mul_(params, decay)
    update = torch._foreach_lerp(moms, grads, 1.0 - beta1)
    torch._foreach_sign_(update)
    torch._foreach_add_(params, update, alpha=-lr)
    del update
    torch._foreach_lerp_(moms, grads, 1.0 - beta2)


class Lion(torch.optim.Optimizer):
    """LION over ``params`` (see the module docstring); ``lr`` is the peak the schedule multiplies."""

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0):
        if lr <= 0:
            raise ValueError(f"optimizer.lr must be > 0, got {lr}")
        if not all(0.0 <= b <= 1.0 for b in betas):
            raise ValueError(f"optimizer.betas must lie in [0, 1], got {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, peak_lr=lr))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2) = group["lr"], group["betas"]
            # peak_lr: absent from state dicts of lion-pytorch's optimizer, whose checkpoints load here too
            decay = 1.0 - lr * group["weight_decay"] / group.setdefault("peak_lr", self.defaults["lr"])
            buckets: dict[tuple, tuple[list, list, list]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                lp, lg, lm = _local(p), _local(p.grad), _local(state["exp_avg"])
                if lg.dtype != lm.dtype:
                    lg = lg.to(lm.dtype)
                ps, gs, ms = buckets.setdefault((lp.device, lp.dtype), ([], [], []))
                ps.append(lp)
                gs.append(lg)
                ms.append(lm)
            for ps, gs, ms in buckets.values():
                for part in _chunks([t.numel() for t in ps], _CHUNK_ELEMENTS):
                    lion_update_(ps[part], gs[part], ms[part], lr=lr, decay=decay, beta1=beta1, beta2=beta2)
        return loss
