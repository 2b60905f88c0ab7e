"""Fused LION step (Triton): one pass over each parameter, reading ``p``, ``g``, ``m`` once and writing ``p``, ``m``
once, where the multi-tensor ``torch._foreach_*`` step of :mod:`llmfoundry.train.lion` makes about eleven passes.

Per element, in fp32 whatever the storage dtypes (``p``/``m``/``g`` each fp32, bf16 or fp16):

    p <- p * decay                            (only when decay != 1)
    p <- p - lr * sign(lerp(m, g, 1 - beta1))   sign(0) = sign(NaN) = +0, as torch.sign
    m <- lerp(m, g, 1 - beta2)

and the result is bit for bit the CUDA foreach path's, so the kernel is a pure speed change. That takes mimicking
ATen:

* ``lerp(a, b, w)`` is ``a + w * (b - a)`` for ``|w| < 0.5``, else ``b - (b - a) * (1 - w)``, with ``w`` (and
  ``1 - w``) rounded to fp32, and compiled to ONE fused multiply-add (nvcc contracts it on CUDA: the sm_90 SASS of
  ``_foreach_lerp`` is ``FADD`` + ``FFMA``; the CPU kernel calls ``fmadd``). Here: ``fma(b - a, c, a)`` with
  ``c = w``, or ``fma(b - a, c, b)`` with ``c = w - 1``, ``c`` rounded to fp32 on the host.
* The scalars ``decay`` and ``-lr`` are rounded to fp32 (CUDA's foreach ops take them as ``float`` for every
  floating dtype but fp64; torch on CPU rounds them to bf16/fp16 for bf16/fp16 tensors, so there a bf16 step
  can differ from this kernel's by an ulp).
* The grad is first cast to the momentum's dtype (the foreach path's ``g.to(m.dtype)``), and the interpolated
  update, the decayed ``p`` and the new ``p``/``m`` are rounded to their tensors' dtypes where the foreach path
  stores them (no-ops in fp32; for bf16 the same double rounding of ``p`` as the foreach path).
* ``p + (-lr) * s`` with ``s`` in {-1, 0, 1}: the product is exact, so fused or not it rounds once.

Launched with ``enable_fp_fusion=False`` so the compiler contracts nothing beyond the explicit ``tl.fma`` calls (the
PTX is ``fma.rn``/``mul.rn``/``sub.rn`` only, with 128-bit loads and stores when sizes and pointers are 16-aligned).

One launch per tensor (no host sync, no allocation). The kernel takes fp32/bf16/fp16 contiguous tensors of one shape
per parameter (``takes``); the caller (``llmfoundry.train.lion``) sends the others (fp64, non-contiguous ones) through
the foreach path, and ``lion_update_fused_`` refuses them. Under ``TRITON_INTERPRET=1`` the kernel
runs on CPU tensors (tests); Triton 3.3's interpreter evaluates ``tl.fma`` unfused and truncates fp32 -> bf16, so
there it matches the foreach path only to an ulp unless those two are corrected (tests/test_lion_kernel.py does).
"""
from __future__ import annotations

import contextlib
import os
import struct

import torch
import triton
import triton.language as tl

__all__ = ["lion_update_fused_", "supports", "takes"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_BLOCK = 2048      # elements per program: 16 fp32 per thread at 4 warps (4 x 128-bit loads per tensor)
_NUM_WARPS = 4
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _lion_kernel(p_ptr, g_ptr, m_ptr, n, neg_lr, decay, c1, c2,
                 HAS_DECAY: tl.constexpr, SMALL1: tl.constexpr, SMALL2: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p_ty = p_ptr.dtype.element_ty
    m_ty = m_ptr.dtype.element_ty
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask).to(m_ty).to(tl.float32)
    d = g - m
    # update = lerp(m, g, 1 - beta1), stored by the foreach path in m's dtype
    if SMALL1:
        u = tl.fma(d, c1, m)
    else:
        u = tl.fma(d, c1, g)
    u = u.to(m_ty).to(tl.float32)
    s = (u > 0).to(tl.float32) - (u < 0).to(tl.float32)
    if HAS_DECAY:
        p = (p * decay).to(p_ty).to(tl.float32)
    p = tl.fma(s, neg_lr, p)
    if SMALL2:
        m = tl.fma(d, c2, m)
    else:
        m = tl.fma(d, c2, g)
    tl.store(p_ptr + offs, p.to(p_ty), mask=mask)
    tl.store(m_ptr + offs, m.to(m_ty), mask=mask)


def _f32(x: float) -> float:
    """``x`` rounded to fp32 (to nearest even), as ATen rounds a Python scalar to a float tensor's opmath type."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _lerp_coefficient(weight: float) -> tuple[float, bool]:
    """(c, small): ATen's ``lerp(a, b, w)`` is ``fma(b - a, c, a)`` when small, else ``fma(b - a, c, b)``."""
    w = _f32(weight)
    if abs(w) < 0.5:
        return w, True
    return _f32(w - 1.0), False  # = -(1 - w) computed in fp32: w - 1.0 is exact in double, rounded once here


def supports(device: torch.device) -> bool:
    """Whether the kernel can run on tensors of ``device`` (CUDA, or anything under Triton's interpreter)."""
    return device.type == "cuda" or _INTERPRET


def takes(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor) -> bool:
    """Whether the kernel updates this parameter, gradient and momentum (plain tensors, not subclasses whose storage
    lies elsewhere; fp32/bf16/fp16, contiguous, one shape)."""
    return (all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in (p, g, m))
            and p.dtype in _DTYPES and g.dtype in _DTYPES and m.dtype in _DTYPES and p.shape == g.shape == m.shape
            and p.is_contiguous() and g.is_contiguous() and m.is_contiguous())


def lion_update_fused_(params: list[torch.Tensor], grads: list[torch.Tensor], moms: list[torch.Tensor], *,
                       lr: float, decay: float, beta1: float, beta2: float) -> None:
    """The LION step of ``llmfoundry.train.lion.lion_update_`` (same arguments; on CUDA the same result bit for bit)
    on plain tensors of one device that the kernel ``takes``, updating ``params`` and ``moms`` in place. ``grads``
    may have another dtype than ``params`` (cast to the momentum's inside the kernel, no temporary). One kernel
    launch per non-empty tensor. Raises ``ValueError`` (before any update) for tensors the kernel does not take."""
    if not params:
        return
    for i, (p, g, m) in enumerate(zip(params, grads, moms)):
        if not takes(p, g, m):
            raise ValueError(f"the fused LION kernel does not take tensor {i} (p {p.dtype} {tuple(p.shape)}, "
                             f"g {g.dtype} {tuple(g.shape)}, m {m.dtype} {tuple(m.shape)}, contiguous "
                             f"{p.is_contiguous()}/{g.is_contiguous()}/{m.is_contiguous()}): update it with "
                             "llmfoundry.train.lion.lion_update_foreach_")
    c1, small1 = _lerp_coefficient(1.0 - beta1)
    c2, small2 = _lerp_coefficient(1.0 - beta2)
    neg_lr, decay32, has_decay = _f32(-lr), _f32(decay), decay != 1.0
    device = params[0].device
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        for p, g, m in zip(params, grads, moms):
            n = p.numel()
            if n == 0:
                continue
            _lion_kernel[(triton.cdiv(n, _BLOCK),)](
                p, g, m, n, neg_lr, decay32, c1, c2, HAS_DECAY=has_decay, SMALL1=small1, SMALL2=small2,
                BLOCK=_BLOCK, num_warps=_NUM_WARPS, enable_fp_fusion=False)
