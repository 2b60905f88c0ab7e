"""LION (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms") with decoupled weight decay.

The step works on the local shards of FSDP2's DTensor parameters (none of DTensor's per-operation dispatch), per
group of parameters that share a device and dtype, with one fused kernel launch per parameter on CUDA or a
handful of multi-tensor (``torch._foreach_*``) launches per group elsewhere (below). Per step, for every
parameter ``p`` with gradient ``g`` and momentum ``m`` (state ``exp_avg``, as in lion-pytorch, so its checkpoints
load here and back):

    p <- p * (1 - lr_t * weight_decay / lr)                 decoupled decay, scaled by the schedule
    p <- p - lr_t * sign(beta1 * m + (1 - beta1) * g)
    m <- beta2 * m + (1 - beta2) * g

``lr_t`` is the group's current (scheduled) learning rate and ``lr`` the configured peak, so a schedule scales
the decay as it scales the step (composer's "decoupled" convention; lion-pytorch's ``decoupled_weight_decay``).

What runs where (``use_fused_kernel``): on CUDA, when triton is installed and ``LLMFOUNDRY_FUSED_LION`` is not
``"0"``, a fused Triton kernel (``llmfoundry.kernels.lion``) does the whole step in one pass per parameter (reads
``p``, ``g``, ``m`` once, writes ``p``, ``m`` once; the grad is cast inside it; 5 passes over memory), bit for bit
equal to the foreach path. Elsewhere (CPU; no triton; ``LLMFOUNDRY_FUSED_LION=0``), and for the tensors the kernel
does not take (``kernels.takes``: fp64, non-contiguous; ``lion_update_device_`` splits them off), the step is the
foreach pass ``lion_update_foreach_``: ``mul`` (decay), ``lerp``, ``sign``, ``add``, ``lerp``, about eleven passes
over memory, with the grad first cast to the momentum's dtype and temporaries for a bounded number of elements at a
time. Under ``TRITON_INTERPRET=1`` the kernel path is taken for CPU tensors too (tests).
"""
from __future__ import annotations

import importlib.util
import os
from typing import Callable, Iterable, Optional

import torch

# Temporaries of the update (the interpolated sign) are made for at most this many elements at a time.
_CHUNK_ELEMENTS = 1 << 27


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor that holds ``t``'s numbers, for in-place updates that land in ``t``: a DTensor's local shard, and
    inside it the one inner tensor of a wrapper subclass (torchao's FP8 training weights wrap their bf16/fp32
    weight in ``_tensor``: the wrapper has no storage of its own, so a kernel given its pointer reads and writes
    outside any allocation); else ``t`` itself."""
    t = t.to_local() if hasattr(t, "to_local") else t
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        if len(names) == 1:
            inner = getattr(t, names[0])
            if inner.shape == t.shape and inner.dtype == t.dtype:
                return inner
    return t


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


def lion_update_foreach_(params: list[torch.Tensor], grads: list[torch.Tensor], moms: list[torch.Tensor], *,
                         lr: float, decay: float, beta1: float, beta2: float) -> None:
    """``lion_update_`` on tensors of one device and dtype whose grads may have another dtype (cast to the
    momentum's), in chunks of at most ``_CHUNK_ELEMENTS`` elements of temporaries."""
    grads = [g if g.dtype == m.dtype else g.to(m.dtype) for g, m in zip(grads, moms)]
    for part in _chunks([t.numel() for t in params], _CHUNK_ELEMENTS):
        lion_update_(params[part], grads[part], moms[part], lr=lr, decay=decay, beta1=beta1, beta2=beta2)


_KERNELS = []  # [llmfoundry.kernels.lion or None], filled on first use


def _fused_kernels():
    """The fused kernel module, or None without triton (an installed triton's import errors are raised)."""
    if not _KERNELS:
        if importlib.util.find_spec("triton") is None:
            _KERNELS.append(None)
        else:
            from llmfoundry.kernels import lion as kernels
            _KERNELS.append(kernels)
    return _KERNELS[0]


def use_fused_kernel(device: torch.device) -> bool:
    """Whether ``Lion.step`` updates tensors of ``device`` with the fused Triton kernel (see the module docstring)."""
    if os.environ.get("LLMFOUNDRY_FUSED_LION", "1") == "0":
        return False
    kernels = _fused_kernels()
    return kernels is not None and kernels.supports(device)


def lion_update_device_(device: torch.device, params: list[torch.Tensor], grads: list[torch.Tensor],
                        moms: list[torch.Tensor], *, lr: float, decay: float, beta1: float, beta2: float) -> None:
    """The LION step on plain tensors of ``device``: the fused kernel for the tensors it takes when
    ``use_fused_kernel(device)``, ``lion_update_foreach_`` for the rest (at most one call of each)."""
    kw = dict(lr=lr, decay=decay, beta1=beta1, beta2=beta2)
    if not use_fused_kernel(device):
        lion_update_foreach_(params, grads, moms, **kw)
        return
    kernels = _fused_kernels()
    taken = [kernels.takes(p, g, m) for p, g, m in zip(params, grads, moms)]
    if any(taken):
        kernels.lion_update_fused_(*_select((params, grads, moms), taken), **kw)
    if not all(taken):
        lion_update_foreach_(*_select((params, grads, moms), [not t for t in taken]), **kw)


def _select(lists: tuple[list, ...], keep: list[bool]) -> tuple[list, ...]:
    return tuple([x for x, k in zip(xs, keep) if k] for xs in lists)


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
                lp = _local(p)
                ps, gs, ms = buckets.setdefault((lp.device, lp.dtype), ([], [], []))
                ps.append(lp)
                gs.append(_local(p.grad))
                ms.append(_local(state["exp_avg"]))
            for (device, _), (ps, gs, ms) in buckets.items():
                lion_update_device_(device, ps, gs, ms, lr=lr, decay=decay, beta1=beta1, beta2=beta2)
        return loss
