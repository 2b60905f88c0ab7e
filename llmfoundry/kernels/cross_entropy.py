"""Cross-entropy loss and its gradient in one pass over the logits, written back into the logits (Triton).

For each row ``i`` of ``logits`` (N, V) with target ``y_i`` and ``z = logit_scale * x_i``:

    loss_i = logsumexp(z) - z[y_i]                                   (fp32; 0 when y_i == ignore_index)
    x_i   <- grad_scale * (softmax(z) - onehot(y_i))                  (in place; zeros when ignored)

With ``grad_scale = logit_scale / n_valid`` the overwritten row is exactly d(mean loss)/d(x_i), so a caller can
compute a chunk of logits, turn it into its own gradient here, and immediately multiply it back through the
output head (see ``llmfoundry/models/mpt/loss.py: fused_linear_cross_entropy``). No fp32 copy of the logits and
no separate softmax/backward pass is ever made: the kernel reads each row twice and writes it once, in the
logits' own dtype (bf16/fp16/fp32), accumulating in fp32.

The kernel runs one program per row and loops over the vocabulary in blocks. Pass 1 keeps an online max ``m``
and sum ``s`` of ``exp2(t - m)`` in base 2 (``t = z * log2(e)``; when ``m`` grows the sum is rescaled by
``exp2(m_old - m_new)``), so ``lse2 = m + log2(s)``; pass 2 writes ``exp2(t - lse2)`` minus the one-hot, scaled.
Ignored rows only write zeros (no reads of the row).

Paths: CUDA tensors use the kernel; CPU tensors (or no triton) use an fp32 torch implementation of the same
math, a bounded slice of rows at a time; with ``TRITON_INTERPRET=1`` (set before triton is imported) CPU tensors
run the kernel under Triton's interpreter (tests).

Targets outside [0, V) other than ``ignore_index``: the torch path and every CPU call raise ``ValueError``;
on CUDA that check would need a host sync, so the kernel instead gives such rows a NaN loss (and a gradient
without the one-hot term) rather than reading out of bounds.
"""
from __future__ import annotations

import os
from typing import Union

import torch

try:
    import triton
    import triton.language as tl
    _HAS_TRITON = True
except ImportError:  # CPU-only installs: the torch path below does the same math
    _HAS_TRITON = False

__all__ = ["cross_entropy_loss_and_grad_", "cross_entropy_loss"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_LOG2E = 1.4426950408889634
_BLOCK_V = 64 if _INTERPRET else 4096  # small under the interpreter so that block edges are exercised
_TORCH_SLICE_ELEMS = 1 << 22  # torch path: fp32 elements per slice of rows (16 MiB)

Scale = Union[float, torch.Tensor]

if _HAS_TRITON:
    @triton.jit
    def _ce_kernel(X, T, Loss, GradScalePtr, stride_row, V, ignore_index, z_scale2, grad_scale,
                   BLOCK_V: tl.constexpr, WRITE_GRAD: tl.constexpr, SCALE_FROM_PTR: tl.constexpr):
        """One row: loss into Loss[row]; with WRITE_GRAD the row of X is overwritten by its scaled gradient.
        ``z_scale2 = logit_scale * log2(e)``; the grad scale is ``*GradScalePtr`` if SCALE_FROM_PTR."""
        row = tl.program_id(0).to(tl.int64)
        x_row = X + row * stride_row
        cols = tl.arange(0, BLOCK_V)
        tgt = tl.load(T + row).to(tl.int64)
        if tgt == ignore_index:
            tl.store(Loss + row, 0.0)
            if WRITE_GRAD:
                zeros = tl.zeros([BLOCK_V], X.dtype.element_ty)
                for start in range(0, V, BLOCK_V):
                    tl.store(x_row + start + cols, zeros, mask=start + cols < V)
        else:
            in_range = (tgt >= 0) & (tgt < V)
            t_tgt = tl.load(x_row + tgt, mask=in_range, other=float("nan")).to(tl.float32) * z_scale2
            m = tl.zeros([], tl.float32) - float("inf")
            s = tl.zeros([], tl.float32)
            for start in range(0, V, BLOCK_V):
                t = tl.load(x_row + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
                t = t * z_scale2
                m_new = tl.maximum(m, tl.max(t, 0))
                s = s * tl.exp2(m - m_new) + tl.sum(tl.exp2(t - m_new), 0)
                m = m_new
            lse2 = m + tl.log2(s)
            tl.store(Loss + row, (lse2 - t_tgt) * 0.6931471805599453)  # base-2 -> natural log
            if WRITE_GRAD:
                g = grad_scale
                if SCALE_FROM_PTR:
                    g = tl.load(GradScalePtr).to(tl.float32)
                for start in range(0, V, BLOCK_V):
                    idx = start + cols
                    ok = idx < V
                    t = tl.load(x_row + idx, mask=ok, other=0.0).to(tl.float32) * z_scale2
                    p = tl.exp2(t - lse2)
                    p = tl.where(idx == tgt, p - 1.0, p)
                    tl.store(x_row + idx, (p * g).to(X.dtype.element_ty), mask=ok)


def _use_kernel(x: torch.Tensor) -> bool:
    return _HAS_TRITON and (x.is_cuda or _INTERPRET)


def _check(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.stride(-1) != 1:
        raise ValueError(f"logits must be 2-D (N, V) with a contiguous last dim, got shape {tuple(logits.shape)} "
                         f"and strides {logits.stride()}")
    if targets.shape != logits.shape[:1]:
        raise ValueError(f"targets must have shape ({logits.shape[0]},), got {tuple(targets.shape)}")
    if logits.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"logits must be fp16/bf16/fp32, got {logits.dtype}")


def _check_targets_on_host(targets: torch.Tensor, V: int, ignore_index: int) -> None:
    """The range check, only where it costs no device sync (CPU tensors)."""
    if targets.is_cuda:
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bad.any():
        raise ValueError(f"targets must lie in [0, {V}) or equal ignore_index={ignore_index}; got "
                         f"{targets[bad][:5].tolist()}")


def _kernel_launch(logits, targets, grad_scale: Scale, ignore_index, logit_scale, write_grad) -> torch.Tensor:
    N, V = logits.shape
    loss = torch.empty(N, device=logits.device, dtype=torch.float32)
    if N == 0:
        return loss
    from_ptr = isinstance(grad_scale, torch.Tensor)
    scale_ptr = grad_scale.to(device=logits.device, dtype=torch.float32) if from_ptr else loss
    block = min(_BLOCK_V, triton.next_power_of_2(V))
    _ce_kernel[(N,)](logits, targets, loss, scale_ptr, logits.stride(0), V, ignore_index,
                     float(logit_scale) * _LOG2E, 0.0 if from_ptr else float(grad_scale),
                     BLOCK_V=block, WRITE_GRAD=write_grad, SCALE_FROM_PTR=from_ptr,
                     num_warps=8 if block >= 2048 else 4)
    return loss


def _torch_path(logits, targets, grad_scale: Scale, ignore_index, logit_scale, write_grad) -> torch.Tensor:
    """The kernel's math in fp32 torch ops, ``_TORCH_SLICE_ELEMS // V`` rows at a time."""
    N, V = logits.shape
    loss = torch.empty(N, device=logits.device, dtype=torch.float32)
    step = max(1, _TORCH_SLICE_ELEMS // max(V, 1))
    for start in range(0, N, step):
        rows = slice(start, start + step)
        z = logits[rows].to(torch.float32, copy=True)
        if logit_scale != 1.0:
            z.mul_(logit_scale)
        valid = targets[rows] != ignore_index
        tgt = torch.where(valid, targets[rows], 0).unsqueeze(1)
        lse = torch.logsumexp(z, dim=1)
        loss[rows] = torch.where(valid, lse - z.gather(1, tgt).squeeze(1), 0.0)
        if write_grad:
            z.sub_(lse.unsqueeze(1)).exp_()  # softmax
            z.scatter_add_(1, tgt, -valid.to(z.dtype).unsqueeze(1))  # minus the one-hot (valid rows only)
            z.mul_(grad_scale).masked_fill_(~valid.unsqueeze(1), 0.0)
            logits[rows].copy_(z)
    return loss


def _run(logits, targets, grad_scale, ignore_index, logit_scale, write_grad) -> torch.Tensor:
    _check(logits, targets)
    _check_targets_on_host(targets, logits.shape[1], ignore_index)
    if targets.device != logits.device:
        targets = targets.to(logits.device)
    if not targets.is_contiguous():
        targets = targets.contiguous()
    fn = _kernel_launch if _use_kernel(logits) else _torch_path
    return fn(logits, targets, grad_scale, int(ignore_index), float(logit_scale), write_grad)


def cross_entropy_loss_and_grad_(logits: torch.Tensor, targets: torch.Tensor, grad_scale: Scale,
                                 ignore_index: int = -100, logit_scale: float = 1.0) -> torch.Tensor:
    """Per-row cross-entropy (fp32, (N,)) of ``logit_scale * logits``; OVERWRITES ``logits`` with
    ``grad_scale * (softmax(logit_scale * logits) - onehot(targets))`` (zero rows where ignored).

    logits: (N, V) fp16/bf16/fp32 with a contiguous last dim (any row stride); targets: (N,) integer.
    ``grad_scale``: a float, or a one-element tensor (read on the device: no host sync). Ignored rows get
    loss 0. With ``grad_scale = logit_scale / n`` the new logits are d(sum(loss) / n)/d(logits).
    """
    return _run(logits, targets, grad_scale, ignore_index, logit_scale, write_grad=True)


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                       logit_scale: float = 1.0) -> torch.Tensor:
    """Per-row cross-entropy (fp32, (N,)) of ``logit_scale * logits``, leaving ``logits`` untouched."""
    return _run(logits, targets, 1.0, ignore_index, logit_scale, write_grad=False)
