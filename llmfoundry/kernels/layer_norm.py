"""Residual add + LayerNorm in one pass each way (Triton).

MPT's pre-norm blocks add a branch (an attention or MLP output) to the residual stream and normalize the sum
right away: ``r = x + branch``, ``y = LayerNorm(r)``. Per row of ``d`` features, in fp32 math:

    r    = x + branch                     stored in r's dtype (torch's promotion of x's and branch's)
    u    = r rounded to the norm's dtype  (bf16 for ``low_precision_layernorm`` under bf16 autocast, else fp32)
    mean = sum(u) / d,   rstd = 1 / sqrt(sum((u - mean)^2) / d + eps)
    y    = (u - mean) * rstd * w (+ b)    stored in the norm's dtype; w and b rounded to it first

which is what ``x + branch`` followed by ``F.layer_norm`` computes (the stats in fp32, the result rounded once).
The forward reads x and branch once and writes r and y once, where the unfused ops read r again. The backward
of both, with ``xhat = (u - mean) * rstd`` and ``g = w * dy``:

    du = rstd * (g - xhat * mean(g * xhat) - mean(g)) + dr     (dr: the gradient r gets from the residual path)
    dx = dbranch = du,    dw = sum over rows of dy * xhat,    db = sum over rows of dy

reads u, dy and dr once and writes du once. Its programs each take a contiguous run of rows and keep their own
fp32 sums of ``dy * xhat``; one small torch reduction over the programs gives dw. No atomics: for a given launch
config, the same bits every call.

Why: on an H200, MPT-1B at micro-batch 16 x 2048 spent ~19 ms of a ~485 ms micro-batch in Inductor's LayerNorm
and residual-add kernels (``bench/profile_step.py``), about twice what their bytes take at the memory rate
(``bench/bench_norm.py`` times both).

Paths: CUDA tensors use the kernels; ``TRITON_INTERPRET=1`` (set before triton is imported) runs them on CPU
tensors (tests). The callers (``llmfoundry.models.mpt.norm``) fall back to torch ops elsewhere, and under
``LLMFOUNDRY_LAYERNORM=torch``. Both directions are torch custom ops, so ``torch.compile`` keeps them as opaque
calls.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
    _HAS_TRITON = True
except ImportError:
    _HAS_TRITON = False

__all__ = ["add_layer_norm", "supports"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_D = 16384  # one row per program tile, held in registers
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

if _HAS_TRITON:
    @triton.jit
    def _add_norm_fwd_kernel(X, A, R, Y, W, B, Mean, Rstd, n_rows, N, eps,
                    HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        row_ok = rows < n_rows
        col_ok = cols < N
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        u = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            u = (u + tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)).to(R.dtype.element_ty)
            tl.store(R + offs, u, mask=mask)
        u = u.to(Y.dtype.element_ty).to(tl.float32)  # the norm's input dtype
        mean = tl.sum(u, 1) / N
        xc = tl.where(mask, u - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / N + eps)
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(Y.dtype.element_ty).to(tl.float32)
        y = xc * rstd[:, None] * w[None, :]
        if HAS_BIAS:
            y += tl.load(B + cols, mask=col_ok, other=0.0).to(Y.dtype.element_ty).to(tl.float32)[None, :]
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
        tl.store(Mean + rows, mean, mask=row_ok)
        tl.store(Rstd + rows, rstd, mask=row_ok)

    @triton.jit
    def _add_norm_bwd_kernel(DY, DR, U, W, Mean, Rstd, DU, DW, DB, n_rows, N, tiles_per_program,
                    HAS_DR: tl.constexpr, HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                    STAGES: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        col_ok = cols < N
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(DY.dtype.element_ty).to(tl.float32)
        dw = tl.zeros([ROWS, BLOCK], tl.float32)
        db = tl.zeros([ROWS, BLOCK], tl.float32)
        for i in tl.range(0, tiles_per_program, num_stages=STAGES):  # loads of the next tiles in flight
            rows = (pid * tiles_per_program + i) * ROWS + tl.arange(0, ROWS)
            row_ok = rows < n_rows
            mask = row_ok[:, None] & col_ok[None, :]
            offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
            u = tl.load(U + offs, mask=mask, other=0.0).to(DY.dtype.element_ty).to(tl.float32)
            dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
            rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
            xhat = tl.where(mask, (u - mean[:, None]) * rstd[:, None], 0.0)
            g = dy * w[None, :]
            c1 = tl.sum(xhat * g, 1) / N
            c2 = tl.sum(g, 1) / N
            du = (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
            if HAS_DR:
                du += tl.load(DR + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(DU + offs, du.to(DU.dtype.element_ty), mask=mask)
            dw += dy * xhat
            if HAS_BIAS:
                db += dy
        tl.store(DW + pid * N + cols, tl.sum(dw, 0), mask=col_ok)
        if HAS_BIAS:
            tl.store(DB + pid * N + cols, tl.sum(db, 0), mask=col_ok)


def supports(x: torch.Tensor, branch: Optional[torch.Tensor], weight: torch.Tensor) -> bool:
    """Whether the kernels take these tensors (CUDA or the interpreter, float dtypes, d <= MAX_D, no
    broadcasting between x and branch)."""
    d = x.shape[-1] if x.dim() else 0
    return (_HAS_TRITON and (x.is_cuda or _INTERPRET) and x.dtype in _DTYPES and 0 < d <= MAX_D
            and weight.dim() == 1 and weight.numel() == d and weight.dtype in _DTYPES
            and (branch is None or (branch.shape == x.shape and branch.dtype in _DTYPES
                                    and branch.device == x.device)))


TUNING = {"fwd": None, "bwd": None, "programs_per_sm": 2}  # overrides for bench/bench_norm.py --sweep
_SMEM_BUDGET = 160 * 1024  # bytes of shared memory the backward's pipelined loads may take


def _config(d: int, kind: str, bytes_per_element: int = 6) -> dict:
    """Rows per tile, warps and (backward) pipeline stages by the row's padded width; chosen by
    ``bench/bench_norm.py --sweep`` on an H200 at 32768 x 2048 bf16: forward 1 row x 4 warps (0.132 ms; every
    config within 0.135 but 16 warps), backward 4 rows x 8 warps, 3 stages, 2 programs per SM (0.155 ms; 0.204
    without pipelining). ``bytes_per_element``: what one element of the backward's three streamed inputs takes."""
    block = triton.next_power_of_2(d)
    if _INTERPRET:
        return dict(ROWS=2, BLOCK=block, num_warps=1, **({} if kind == "fwd" else {"STAGES": 1}))
    if kind == "fwd":
        cfg = dict(ROWS=max(1, min(4, 2048 // block)), BLOCK=block, num_warps=4 if block <= 4096 else 8)
    else:
        rows = max(1, min(4, 8192 // block))
        tile_bytes = rows * block * bytes_per_element
        stages = 3 if 3 * tile_bytes <= _SMEM_BUDGET else (2 if 2 * tile_bytes <= _SMEM_BUDGET else 1)
        cfg = dict(ROWS=rows, BLOCK=block, num_warps=8 if block * rows >= 4096 else 4, STAGES=stages)
    if TUNING[kind] is not None:
        cfg.update(TUNING[kind])
    return cfg


def _programs(n_tiles: int, device: torch.device) -> int:
    """Backward programs: a few per SM, each running over a contiguous share of the row tiles."""
    if device.type != "cuda":
        return min(n_tiles, 3)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return min(n_tiles, TUNING["programs_per_sm"] * sms)


@torch.library.custom_op("llmfoundry::add_layer_norm", mutates_args=())
def _fwd_op(x: torch.Tensor, branch: Optional[torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor],
            eps: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    d = x.shape[-1]
    n = x.numel() // d
    x = x.contiguous()
    has_res = branch is not None
    if has_res:
        branch = branch.contiguous()
        r = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, branch.dtype), device=x.device)
    else:
        r = x.new_empty(0)
    y = torch.empty(x.shape, dtype=dtype, device=x.device)
    mean = torch.empty(n, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n, dtype=torch.float32, device=x.device)
    if n:
        cfg = _config(d, "fwd")
        _add_norm_fwd_kernel[(triton.cdiv(n, cfg["ROWS"]),)](
            x, branch if has_res else x, r if has_res else x, y, weight, bias if bias is not None else weight,
            mean, rstd, n, d, eps, HAS_RES=has_res, HAS_BIAS=bias is not None, **cfg)
    return r, y, mean, rstd


@_fwd_op.register_fake
def _fwd_fake(x, branch, weight, bias, eps, dtype):
    n = x.numel() // x.shape[-1]
    r = (x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, branch.dtype)) if branch is not None
         else x.new_empty(0))
    return (r, x.new_empty(x.shape, dtype=dtype), x.new_empty(n, dtype=torch.float32),
            x.new_empty(n, dtype=torch.float32))


@torch.library.custom_op("llmfoundry::add_layer_norm_backward", mutates_args=())
def _bwd_op(dy: torch.Tensor, dr: Optional[torch.Tensor], u: torch.Tensor, weight: torch.Tensor,
            mean: torch.Tensor, rstd: torch.Tensor,
            has_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = u.shape[-1]
    n = u.numel() // d
    dy, u = dy.contiguous(), u.contiguous()
    dr = dr.contiguous() if dr is not None else None
    du = torch.empty(u.shape, dtype=u.dtype, device=u.device)
    cfg = _config(d, "bwd", u.element_size() + dy.element_size() + (dr.element_size() if dr is not None else 0))
    n_tiles = triton.cdiv(n, cfg["ROWS"]) if n else 0
    grid = _programs(n_tiles, u.device) if n_tiles else 0
    dw_part = torch.zeros((max(grid, 1), d), dtype=torch.float32, device=u.device)
    db_part = torch.zeros((max(grid, 1), d), dtype=torch.float32, device=u.device) if has_bias else dw_part
    if grid:
        per = triton.cdiv(n_tiles, grid)
        grid = triton.cdiv(n_tiles, per)
        _add_norm_bwd_kernel[(grid,)](dy, dr if dr is not None else dy, u, weight, mean, rstd, du, dw_part, db_part,
                             n, d, per, HAS_DR=dr is not None, HAS_BIAS=has_bias, **cfg)
    dw = dw_part.sum(0).to(weight.dtype)
    db = db_part.sum(0).to(weight.dtype) if has_bias else weight.new_empty(0)
    return du, dw, db


@_bwd_op.register_fake
def _bwd_fake(dy, dr, u, weight, mean, rstd, has_bias):
    return (u.new_empty(u.shape), weight.new_empty(weight.shape),
            weight.new_empty(weight.shape if has_bias else (0,)))


def _setup_context(ctx, inputs, output):
    x, branch, weight, bias, _eps, dtype = inputs
    r, y, mean, rstd = output
    ctx.has_res, ctx.has_bias = branch is not None, bias is not None
    ctx.x_dtype, ctx.y_dtype = x.dtype, dtype
    ctx.branch_dtype = branch.dtype if branch is not None else None
    ctx.save_for_backward(r if ctx.has_res else x, weight, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)
    if not ctx.has_res:
        ctx.mark_non_differentiable(r)  # an empty placeholder: the caller returns x itself


def _backward(ctx, dr, dy, _dmean, _drstd):
    u, weight, mean, rstd = ctx.saved_tensors
    if dy is None:  # y unused
        dy = torch.zeros(u.shape, dtype=ctx.y_dtype, device=u.device)
    du, dw, db = _bwd_op(dy, dr if ctx.has_res else None, u, weight, mean, rstd, ctx.has_bias)
    return (du.to(ctx.x_dtype), du.to(ctx.branch_dtype) if ctx.has_res else None, dw,
            db if ctx.has_bias else None, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def add_layer_norm(x: torch.Tensor, branch: Optional[torch.Tensor], weight: torch.Tensor,
                   bias: Optional[torch.Tensor], eps: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r, layer_norm(r))`` with ``r = x + branch`` (``r = x`` when branch is None): the norm over the last
    dimension runs on r rounded to ``dtype`` with weight and bias rounded to it, and returns ``dtype`` (see the
    module docstring). With autograd; check ``supports`` first."""
    r, y, _, _ = _fwd_op(x, branch, weight, bias, float(eps), dtype)
    return (r if branch is not None else x), y
