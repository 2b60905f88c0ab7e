"""The exact (erf) GELU, forward and backward, as two elementwise Triton kernels.

    gelu(x)  = x * Phi(x)                      Phi(x) = P(N(0,1) < x) = 0.5 * erfc(-x / sqrt(2))
    gelu'(x) = Phi(x) + x * exp(-x^2 / 2) / sqrt(2 pi)

Why: between MPT's up- and down-projection, GELU moves 2 (forward) and 3 (backward) bytes x elements per layer
(MPT-1B at micro-batch 16 x 2048: 0.5 GB each). On an H200 (``bench/bench_gelu.py``, BENCHMARKS.md) Inductor's
kernels for it take about 0.39 / 0.52 ms a layer (forward / backward; a plain copy of the same bytes 0.26 / 0.37)
and these 0.33 / 0.41 ms. Here ``Phi(-|x|) = 0.5 * erfc(|x| / sqrt 2)`` comes from one formula over the whole range,

    erfc(z) = t * exp(-z^2) * Q(t),    t = 1 / (1 + z / 2),    z >= 0

with ``Q`` a degree-8 polynomial fitted here (least squares on Chebyshev nodes over z in [0, 10], against
double-precision erfc; see ``_erfc_scaled_poly``). The backward needs ``exp(-z^2)`` for gelu' anyway, so each
element costs one exponential and one reciprocal in either pass (fitting ``log Q`` instead took a second
exponential in the backward: 0.500 ms against 0.411 on one H200, BENCHMARKS.md "What changed which number").
Evaluated in fp32, gelu and gelu' stay within 4e-6 (relative) of a float64 reference for |x| <= 6 and within
2e-5 beyond, where the values are below 1e-8 (tests/test_gelu.py); torch's own fp32 GELU, which computes
``0.5 x (1 + erf(x / sqrt 2))``, loses all relative accuracy in the negative tail to that cancellation. In bf16 an
output differs from torch's by one unit in the last place only where the true value lies within that error of a
rounding midpoint (the GPU test bounds the share).

The approximation (``approximate="tanh"``) is a different function and is not what this computes: MPT and
transformers' MPT (which exported models must match) use the exact GELU.

Paths: CUDA tensors use the kernels; CPU tensors use ``torch.nn.functional.gelu`` (the same function); with
``TRITON_INTERPRET=1`` (set before triton is imported) CPU tensors run the kernels under Triton's interpreter.
``gelu`` is a torch custom op with autograd, so ``torch.compile`` calls the kernels as opaque nodes.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    _HAS_TRITON = True
except ImportError:
    _HAS_TRITON = False

__all__ = ["gelu"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_BLOCK = 256 if _INTERPRET else 2048  # elements per program
_NUM_WARPS = 4  # bench_gelu.py --sweep on an H200: 2048 x 4 warps fastest for both passes

if _HAS_TRITON:
    @triton.jit
    def _erfc_scaled_poly(t):
        """Q(t) = erfc(z) * exp(z^2) / t for t = 1 / (1 + z / 2), by Horner. The coefficients were fitted by
        ``numpy.polynomial.Chebyshev.fit(t, Q, 8)`` over 20000 Chebyshev nodes of t in [1/6, 1] (z in [0, 10]),
        then converted to monomials and rounded to fp32; the max relative error of this fp32 evaluation is 2.2e-7
        (checked on 200001 points of that range; Q falls from 1 at z = 0 to 1 / (2 sqrt(pi)) as z grows)."""
        q = -0.058318242 * t + 0.28119192
        q = q * t - 0.48080269
        q = q * t + 0.27147084
        q = q * t - 0.022591425
        q = q * t + 0.20119666
        q = q * t + 0.24342681
        q = q * t + 0.28233784
        return q * t + 0.28208819

    @triton.jit
    def _gelu_kernel(X, Y, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        z = tl.abs(x) * 0.7071067811865476
        t = tl.fdiv(1.0, 1.0 + 0.5 * z, ieee_rounding=False)
        tail = 0.5 * t * tl.exp(-z * z) * _erfc_scaled_poly(t)  # Phi(-|x|)
        cdf = tl.where(x < 0, tail, 1.0 - tail)
        tl.store(Y + offs, (x * cdf).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _gelu_grad_kernel(DY, X, DX, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        z = tl.abs(x) * 0.7071067811865476
        t = tl.fdiv(1.0, 1.0 + 0.5 * z, ieee_rounding=False)
        gauss = tl.exp(-z * z)  # exp(-x^2 / 2)
        tail = 0.5 * t * gauss * _erfc_scaled_poly(t)
        cdf = tl.where(x < 0, tail, 1.0 - tail)
        dx = dy * (cdf + x * gauss * 0.3989422804014327)  # 1 / sqrt(2 pi)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


def _use_kernel(x: torch.Tensor) -> bool:
    return _HAS_TRITON and (x.is_cuda or _INTERPRET) and x.dtype in (torch.float16, torch.bfloat16, torch.float32)


def _launch(kernel, out: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
    n = out.numel()
    if n:
        kernel[(triton.cdiv(n, _BLOCK),)](*inputs, out, n, BLOCK=_BLOCK, num_warps=_NUM_WARPS)
    return out


@torch.library.custom_op("llmfoundry::gelu", mutates_args=())
def _gelu_op(x: torch.Tensor) -> torch.Tensor:
    if not _use_kernel(x):
        return F.gelu(x)
    x = x.contiguous()
    return _launch(_gelu_kernel, torch.empty_like(x), x)


@_gelu_op.register_fake
def _gelu_fake(x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("llmfoundry::gelu_backward", mutates_args=())
def _gelu_bwd_op(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if not _use_kernel(x):
        return torch.ops.aten.gelu_backward(dy, x)
    x, dy = x.contiguous(), dy.contiguous()
    return _launch(_gelu_grad_kernel, torch.empty_like(x), dy, x)


@_gelu_bwd_op.register_fake
def _gelu_bwd_fake(dy, x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, dy):
    (x,) = ctx.saved_tensors
    return _gelu_bwd_op(dy, x)


_gelu_op.register_autograd(_backward, setup_context=_setup_context)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """``F.gelu(x)`` (exact, erf) with autograd; the Triton kernels on CUDA (see the module docstring)."""
    return _gelu_op(x)
