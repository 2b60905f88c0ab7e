"""Tests of the exact-GELU Triton kernels (``llmfoundry/kernels/gelu.py``) against a float64 reference built from
erfc (accurate in the negative tail, where torch's own float64 ``0.5 x (1 + erf)`` cancels to 0).

CPU: the kernels under Triton's interpreter, in ONE subprocess (this file run with ``--worker``; the interpreter
must be switched on before triton is imported), and the CPU path (torch's GELU) through the model. GPU
(``-m gpu``): the kernels on CUDA, bf16 outputs against torch's, and the custom op under torch.compile.
"""
from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import run_interpreter_worker


def reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 gelu(x), gelu'(x) = Phi(x) + x phi(x), and |Phi(x)| + |x phi(x)| (the scale of gelu''s rounding:
    the two terms cancel where gelu' crosses 0, near x = -0.75, so a relative error means nothing there)."""
    xd = x.double().cpu()
    cdf = 0.5 * torch.special.erfc(-xd / math.sqrt(2))
    xpdf = xd * torch.exp(-xd * xd / 2) / math.sqrt(2 * math.pi)
    return xd * cdf, cdf + xpdf, cdf.abs() + xpdf.abs()


def relative_errors(x: torch.Tensor, y: torch.Tensor, dx: torch.Tensor) -> dict:
    """Max relative errors of gelu (y) and gelu' (dx, from dy = 1; relative to its terms' scale), over inputs with
    |x| <= 6 ("fwd", "bwd") and over the far tails where the values are tiny (reference > 1e-30: "*_tail")."""
    ref_y, ref_d, scale_d = reference(x)
    near = x.abs().cpu() <= 6
    out = {}
    for name, got, ref, scale in (("fwd", y, ref_y, ref_y.abs()), ("bwd", dx, ref_d, scale_d)):
        rel = (got.double().cpu() - ref).abs() / scale
        out[name] = rel[near & (scale > 0)].max().item()
        out[name + "_tail"] = rel[~near & (scale > 1e-30)].max().item()
    return out


def assert_accurate(res: dict) -> None:
    """fp32 rounding near the middle; in the tails (|x| > 6, values < 1e-8) the fp32 rounding of x^2 / 2 in the
    exponent (up to 72) costs a few 1e-6 more."""
    assert res["fwd"] < 5e-6 and res["bwd"] < 5e-6, res
    assert res["fwd_tail"] < 5e-5 and res["bwd_tail"] < 5e-5, res


def sample_inputs():
    """Inputs over the whole range: the tails (|x| up to 12), around 0, and random ones."""
    gen = torch.Generator().manual_seed(0)
    return torch.cat([torch.linspace(-12, 12, 20001), torch.randn(5000, generator=gen) * 3,
                      torch.tensor([0.0, -0.0, 1e-8, -1e-8, 40.0, -40.0])])


def _worker():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from llmfoundry.kernels import gelu as mod
    assert mod._use_kernel(torch.zeros(1)), "the interpreter path is not taken"
    torch.set_num_threads(1)
    x = sample_inputs().requires_grad_()
    y = mod.gelu(x)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    res = relative_errors(x.detach(), y.detach(), dx)
    big = mod.gelu(torch.tensor([40.0, -40.0]))
    res["extremes"] = big.tolist()
    odd = torch.randn(3, 333)  # not a multiple of the block: the masked tail
    res["odd_shape"] = (mod.gelu(odd) - F.gelu(odd)).abs().max().item()
    res["empty"] = list(mod.gelu(torch.empty(0, 4)).shape)
    print(json.dumps(res))


@pytest.fixture(scope="module")
def interpreter_results():
    return run_interpreter_worker(__file__, timeout=300)


def test_interpreter_kernels_match_float64(interpreter_results):
    res = interpreter_results
    assert_accurate(res)
    assert res["extremes"] == [40.0, -0.0] or res["extremes"] == [40.0, 0.0], res
    assert res["odd_shape"] < 1e-6 and res["empty"] == [0, 4], res


def test_cpu_model_uses_torch_gelu():
    """On CPU the model's MLP is torch's exact GELU (no custom op in the path)."""
    from llmfoundry.models.mpt.model import _gelu
    x = torch.randn(4, 8)
    assert torch.equal(_gelu(x), F.gelu(x))


# ---------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_kernels_match_float64_and_torch_bf16():
    from llmfoundry.kernels.gelu import _gelu_bwd_op, gelu
    x = sample_inputs().cuda()
    assert_accurate(relative_errors(x, gelu(x), _gelu_bwd_op(torch.ones_like(x), x)))
    xb = (torch.randn(1 << 20, device="cuda") * 3).bfloat16()
    ours = gelu(xb)
    exact = reference(xb)[0].to(torch.bfloat16).cuda()  # correctly rounded from float64
    assert (ours != exact).float().mean().item() < 1e-3  # one bf16 ulp at rounding midpoints
    assert ((ours.float() - exact.float()).abs() <= exact.float().abs() * 2 ** -7).all()
    # torch's bf16 GELU rounds 0.5 x (1 + erf) computed in fp32, which cancels for negative x (it returns 0 below
    # about -5.5), so it is compared where that cancellation is small
    dyb = torch.randn_like(xb)
    fair = xb >= -2
    differ_fwd = (ours != F.gelu(xb))[fair].float().mean().item()
    differ_bwd = (_gelu_bwd_op(dyb, xb) != torch.ops.aten.gelu_backward(dyb, xb))[fair].float().mean().item()
    assert differ_fwd < 1e-3 and differ_bwd < 1e-3, (differ_fwd, differ_bwd)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_mlp_compiled_matches_torch_gelu():
    """The MLP with our op, compiled, against the same MLP with torch's GELU in fp32 (values and gradients)."""
    from llmfoundry.kernels.gelu import gelu
    torch.manual_seed(0)
    up = torch.randn(256, 64, device="cuda", requires_grad=True)
    down = torch.randn(64, 256, device="cuda", requires_grad=True)
    h = torch.randn(32, 64, device="cuda", requires_grad=True)
    grads = []
    for act in (gelu, F.gelu):
        fn = torch.compile(lambda t, a=act: F.linear(a(F.linear(t, up)), down))
        out = fn(h)
        grads.append((out.detach(), *torch.autograd.grad(out.square().sum(), (h, up, down))))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
