"""Next-token cross-entropy from final hidden states, without materializing the whole fp32 logits tensor.

At B=8, S=2048 and a 50k vocabulary the logits are 3.3 GB in fp32, with as much again for their gradient.

``fused_linear_cross_entropy`` (the training loss) fuses the output head with the loss and does the backward
work during the forward. Per chunk of ``chunk_tokens`` tokens it computes the chunk's logits ``h_c @ W^T`` in the
compute dtype (bf16 under autocast), turns them IN PLACE into d(loss)/d(logits) with one Triton kernel
(``llmfoundry/kernels/cross_entropy.py``: loss and softmax gradient in one read-read-write pass, fp32 math),
and multiplies that straight back through the head: ``grad_h[c] = G_c @ W`` and ``grad_W += G_c^T @ h_c``
(fp32 accumulator). The gradients are saved for backward, which only scales them by the incoming gradient.
So the head matmul is never recomputed, and no fp32 logits exist. Memory: one chunk's logits (``chunk_tokens x
V`` in the compute dtype) at a time, plus ``grad_h`` (hidden-sized), the fp32 ``V x d`` accumulator (returned in
the weight's dtype) and, for a low-precision compute dtype where the matmul cannot accumulate into fp32 itself
(CPU, torch < 2.9), one ``V x d`` product per chunk before it is added.
It is a torch custom op, so ``torch.compile`` keeps it as one opaque node instead of tracing into it.

"""
from __future__ import annotations

from typing import Optional

import torch

from llmfoundry.kernels.cross_entropy import cross_entropy_loss, cross_entropy_loss_and_grad_

IGNORE_INDEX = -100

__all__ = ["IGNORE_INDEX", "fused_linear_cross_entropy"]


# ---------------------------------------------------------------------------------- fused head + loss
def _shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """(B*S,) targets aligned with the UNshifted hidden rows: row (b, i) predicts labels[b, i+1]; the last
    position of each sequence has no target (ignored, so its gradient rows come out zero)."""
    pad = labels.new_full((labels.size(0), 1), IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1).reshape(-1)


_MIXED_ADDMM: dict = {}  # device -> whether torch.addmm accumulates low-precision products into fp32 in place


def _mixed_addmm(device: torch.device) -> bool:
    """Whether ``torch.addmm(c, a, b, out_dtype=torch.float32, out=c)`` works on ``device`` for bf16 ``a``, ``b`` and
    fp32 ``c`` (torch >= 2.9 on CUDA: cuBLAS adds the product into the fp32 accumulator in the same pass). Tried
    once per device on a 2 x 2 product."""
    if device not in _MIXED_ADDMM:
        ok = False
        if device.type == "cuda":
            try:
                c = torch.zeros(2, 2, device=device)
                a = torch.ones(2, 2, device=device, dtype=torch.bfloat16)
                for _ in range(2):
                    torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
                ok = bool((c == 4).all())
            except (TypeError, RuntimeError):
                ok = False
        _MIXED_ADDMM[device] = ok
    return _MIXED_ADDMM[device]


def _add_weight_grad(grad_w: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> None:
    """grad_w (fp32) += g^T @ h."""
    if g.dtype == grad_w.dtype:
        grad_w.addmm_(g.t(), h)
    elif _mixed_addmm(grad_w.device):  # bf16 in, fp32 accumulated by the matmul itself
        torch.addmm(grad_w, g.t(), h, out_dtype=grad_w.dtype, out=grad_w)
    else:  # one low-precision product per chunk, added in fp32
        grad_w.add_(torch.mm(g.t(), h))


def _forward(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, logit_scale: Optional[float],
             chunk_tokens: int, compute_dtype: torch.dtype, need_grad: bool):
    """Loss (fp32 scalar) and, with ``need_grad``, d(loss)/d(hidden) and d(loss)/d(weight) (else empty)."""
    d = hidden.size(-1)
    h = hidden.reshape(-1, d)  # rows in (b, i) order; a view when hidden is contiguous
    targets = _shifted_targets(labels)
    scale = 1.0 if logit_scale is None else float(logit_scale)
    n_valid = (targets != IGNORE_INDEX).sum().clamp(min=1)
    w = weight.to(compute_dtype)  # cast once (a no-op when the dtypes match)
    row_loss = torch.empty(h.size(0), device=hidden.device, dtype=torch.float32)
    grad_h = hidden.new_empty(h.shape) if need_grad else hidden.new_empty(0)  # contiguous, like the fake
    grad_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_grad else None
    grad_scale = (scale / n_valid).to(torch.float32)  # a device tensor the kernel reads: no host sync
    for start in range(0, h.size(0), chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        h_c = h[rows].to(compute_dtype)
        logits = torch.mm(h_c, w.t())
        if not need_grad:
            row_loss[rows] = cross_entropy_loss(logits, targets[rows], IGNORE_INDEX, scale)
            continue
        row_loss[rows] = cross_entropy_loss_and_grad_(logits, targets[rows], grad_scale, IGNORE_INDEX, scale)
        if grad_h.dtype == compute_dtype:
            torch.mm(logits, w, out=grad_h[rows])
        else:
            grad_h[rows] = torch.mm(logits, w)
        _add_weight_grad(grad_w, logits, h_c)
        del logits
    loss = row_loss.sum() / n_valid
    if not need_grad:
        return loss, grad_h, weight.new_empty(0)
    return loss, grad_h.view(hidden.shape), grad_w.to(weight.dtype)


@torch.library.custom_op("llmfoundry::fused_linear_cross_entropy", mutates_args=())
def _fused_op(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, logit_scale: Optional[float],
              chunk_tokens: int, compute_dtype: torch.dtype,
              need_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.autocast(hidden.device.type, enabled=False):  # dtypes are chosen explicitly above
        return _forward(hidden, weight, labels, logit_scale, chunk_tokens, compute_dtype, need_grad)


@_fused_op.register_fake
def _fused_fake(hidden, weight, labels, logit_scale, chunk_tokens, compute_dtype, need_grad):
    loss = hidden.new_empty((), dtype=torch.float32)
    if not need_grad:
        return loss, hidden.new_empty(0), weight.new_empty(0)
    return loss, hidden.new_empty(hidden.shape), weight.new_empty(weight.shape)


def _fused_setup_context(ctx, inputs, output):
    _, grad_h, grad_w = output
    ctx.mark_non_differentiable(grad_h, grad_w)
    ctx.save_for_backward(grad_h, grad_w)


def _fused_backward(ctx, d_loss, _d_grad_h, _d_grad_w):
    grad_h, grad_w = ctx.saved_tensors
    d_h = grad_h * d_loss.to(grad_h.dtype) if ctx.needs_input_grad[0] else None
    d_w = grad_w * d_loss.to(grad_w.dtype) if ctx.needs_input_grad[1] else None
    return d_h, d_w, None, None, None, None, None


_fused_op.register_autograd(_fused_backward, setup_context=_fused_setup_context)


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for hidden's device, else hidden's dtype."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.LongTensor,
                               logit_scale: Optional[float] = None, chunk_tokens: int = 8192) -> torch.Tensor:
    """Mean over non-ignored targets of the next-token cross-entropy of ``logit_scale * hidden @ weight^T``.

    hidden: (B, S, d); weight: (V, d) (output head / tied embedding); labels: (B, S), ``-100`` = ignored.
    Equal to ``F.cross_entropy((F.linear(hidden, weight) * (logit_scale or 1))[:, :-1].flatten(0, 1).float(),
    labels[:, 1:].flatten(), ignore_index=-100)``, and 0 (with zero gradients) when every target is ignored.
    Matmuls run in the autocast dtype when autocast is on for hidden's device, else in hidden's dtype; the loss
    math is fp32. Gradients are computed in the forward (only when grad mode is on and an input requires grad)
    and come back in the dtypes of ``hidden`` and ``weight``. Differentiable once (no double backward).
    """
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2] or weight.dim() != 2 or \
            weight.size(1) != hidden.size(2):
        raise ValueError(f"expected hidden (B, S, d), weight (V, d), labels (B, S); got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(labels.shape)}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    scale = None if logit_scale is None else float(logit_scale)
    loss, _, _ = _fused_op(hidden, weight, labels, scale, int(chunk_tokens), _compute_dtype(hidden), need_grad)
    return loss
