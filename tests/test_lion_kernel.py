"""Tests of the fused LION kernel (llmfoundry/kernels/lion.py): bit for bit the foreach path of train/lion.py.

CPU: the kernel runs under Triton's interpreter. TRITON_INTERPRET must be set before triton is imported, so every
interpreter case runs in ONE subprocess (this file run as a script with ``--worker``) whose results the tests read.
Triton 3.3's interpreter departs from the GPU in two operations the kernel uses: it evaluates ``tl.fma`` as a rounded
multiply then an add (the GPU: ``fma.rn.f32``, one rounding, as torch's lerp on CPU and CUDA), and it casts fp32 to
bf16 by truncation (the GPU: round to nearest even, as torch). The worker replaces those two interpreter operations
with exact ones (``_exact_interpreter``), so that the interpreted kernel computes what the GPU computes; one case
checks that without the exact fma the momentum does differ (the comparison has teeth). And torch on CPU rounds the
``alpha`` of a bf16/fp16 ``add_``, and the scalar of an in-place ``_foreach_mul_``, to bf16/fp16, where CUDA's
foreach ops (``std::plus<float>`` / ``std::multiplies<float>`` with a float scalar) and the kernel keep ``-lr`` and
the decay in fp32: for bf16/fp16 parameters the worker's foreach reference does those two ops in fp32
(``_cuda_semantics_foreach``). GPU (``-m gpu``): the same equalities on CUDA against the real foreach
path, with no correction at all, and the fused step's speed against the foreach step's.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_interpreter_worker

REPO = Path(__file__).resolve().parents[1]
SIZES = [0, 1, 7, 2048, 2049, 5003]  # the kernel's block is 2048 elements
# name: (p dtype, m dtype, g dtype, decay, beta1, beta2); betas of 0.3/0.45 take lerp's large-weight branch
CASES = {
    "fp32": ("float32", "float32", "float32", 1.0, 0.9, 0.99),
    "fp32_decay": ("float32", "float32", "float32", 1.0 - 1e-3 * 0.1 / 3e-3, 0.9, 0.99),
    "fp32_bf16_grad": ("float32", "float32", "bfloat16", 0.999, 0.9, 0.95),
    "fp32_large_weights": ("float32", "float32", "float32", 0.97, 0.3, 0.45),
    "bf16": ("bfloat16", "bfloat16", "bfloat16", 1.0, 0.9, 0.99),
    "bf16_decay_fp32_grad": ("bfloat16", "bfloat16", "float32", 0.999, 0.9, 0.99),
    "bf16_large_weights": ("bfloat16", "bfloat16", "bfloat16", 0.97, 0.3, 0.45),
    "fp16": ("float16", "float16", "float16", 0.999, 0.9, 0.99),
}
LR = 1e-3


def make_tensors(spec, sizes, seed, device="cpu"):
    """Params, grads, moms with the awkward values in them: zeros of both signs, g == m (update 0 where both are
    0, so sign(0) = 0), and magnitudes far apart."""
    p_dt, m_dt, g_dt = (getattr(torch, d) for d in spec[:3])
    gen = torch.Generator().manual_seed(seed)
    ps, gs, ms = [], [], []
    for n in sizes:
        p, g, m = (torch.randn(n, generator=gen) for _ in range(3))
        g = g * torch.exp(torch.randn(n, generator=gen) * 4)
        m = m * 0.1
        k = n // 8
        g[:k], m[:k] = 0.0, 0.0                      # interpolation exactly 0
        g[k:2 * k] = m[k:2 * k]                      # interpolation = m
        p[2 * k:3 * k], m[2 * k:3 * k], g[2 * k:3 * k] = -0.0, -0.0, 0.0
        ps.append(p.to(device, p_dt))
        gs.append(g.to(device, g_dt))
        ms.append(m.to(device, m_dt))
    return ps, gs, ms


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def mismatches(a, b):
    """Elements of ``a`` not bitwise equal to ``b`` (so -0.0 vs 0.0 counts), per tensor."""
    return [int((_bits(x) != _bits(y)).sum()) for x, y in zip(a, b)]


def run_case(spec, sizes, seed, device="cpu"):
    from llmfoundry.kernels.lion import lion_update_fused_
    from llmfoundry.train.lion import lion_update_foreach_
    decay, beta1, beta2 = spec[3:]
    fused = make_tensors(spec, sizes, seed, device)
    ref = make_tensors(spec, sizes, seed, device)
    kw = dict(lr=LR, decay=decay, beta1=beta1, beta2=beta2)
    for step in range(2):  # the second step starts from a momentum that is no longer zero-patterned
        lion_update_fused_(*fused, **kw)
        lion_update_foreach_(*ref, **kw)
    return {"p": mismatches(fused[0], ref[0]), "m": mismatches(fused[2], ref[2]),
            "changed": sum(int((_bits(a) != _bits(b)).sum())
                           for a, b in zip(fused[0], make_tensors(spec, sizes, seed, device)[0]))}


# ------------------------------------------------------------------------------------ interpreter worker
def _exact_interpreter():
    """Make Triton's interpreter compute ``tl.fma`` and fp32 -> bf16 casts as the GPU does (see the docstring)."""
    import numpy as np
    from triton.runtime import interpreter as interp

    def fma32(x, y, z):
        # x*y is exact in float64; s + e == x*y + z exactly (TwoSum); rounding s to odd when inexact makes the one
        # rounding to float32 below the correctly rounded fma (53 >= 24 + 2 bits)
        x, y, z = (np.asarray(v, np.float64) for v in (x, y, z))
        with np.errstate(all="ignore"):  # inf/nan in masked-off lanes
            prod = x * y
            s = prod + z
            bv = s - prod
            e = (prod - (s - bv)) + (z - bv)
            inexact_even = (e != 0) & ((s.view(np.int64) & 1) == 0) & np.isfinite(s)
            s = np.where(inexact_even, np.nextafter(s, np.where(e > 0, np.inf, -np.inf)), s)
            return s.astype(np.float32)

    builder = interp.InterpreterBuilder
    orig_fma, orig_cast = builder.create_fma, builder.cast_impl

    def create_fma(self, x, y, z):
        if z.dtype.scalar == interp.tl.float32:
            return interp.TensorHandle(fma32(x.data, y.data, z.data), z.dtype.scalar)
        return orig_fma(self, x, y, z)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == interp.tl.float32 and dst_type.scalar == interp.tl.bfloat16:
            data = torch.from_numpy(np.ascontiguousarray(src.data, np.float32)).to(torch.bfloat16)
            return interp.TensorHandle(data.view(torch.int16).numpy().view(np.uint16), dst_type.scalar)
        return orig_cast(self, src, dst_type)

    builder.create_fma, builder.cast_impl = create_fma, cast_impl
    return lambda: setattr(builder, "create_fma", orig_fma)  # undoes the exact fma


def _cuda_semantics_foreach():
    """``lion_update_`` as CUDA computes it: for bf16/fp16 parameters, ``p * decay`` and ``p + (-lr) * sign`` with
    the scalars in fp32."""
    from llmfoundry.train import lion as train_lion
    orig = train_lion.lion_update_

    def lion_update_(params, grads, moms, *, lr, decay, beta1, beta2):
        if params[0].dtype not in (torch.bfloat16, torch.float16):
            return orig(params, grads, moms, lr=lr, decay=decay, beta1=beta1, beta2=beta2)
        if decay != 1.0:
            for p in params:
                p.copy_(p.float().mul_(decay))
        update = torch._foreach_lerp(moms, grads, 1.0 - beta1)
        torch._foreach_sign_(update)
        for p, u in zip(params, update):
            p.copy_(p.float().add_(u.float(), alpha=-lr))
        torch._foreach_lerp_(moms, grads, 1.0 - beta2)

    train_lion.lion_update_ = lion_update_


def _count_launches(kernels):
    """Launches of the kernel are appended to the returned list until ``restore()``."""
    calls = []
    kernel = kernels._lion_kernel

    class Counted:
        def __getitem__(self, grid):
            calls.append(grid)
            return kernel[grid]

    kernels._lion_kernel = Counted()
    return calls, lambda: setattr(kernels, "_lion_kernel", kernel)


def _fallback_case():
    """fp64 and non-contiguous tensors among kernel-friendly ones: the kernel refuses them (updating nothing), and
    ``lion_update_device_`` sends them through the foreach path."""
    from llmfoundry.kernels import lion as kernels
    from llmfoundry.train.lion import lion_update_device_, lion_update_foreach_
    calls, restore = _count_launches(kernels)

    def make():
        gen = torch.Generator().manual_seed(3)
        ps = [torch.randn(5, 6, generator=gen).t(), torch.randn(9, generator=gen).double(),
              torch.randn(300, generator=gen)]
        gs = [torch.randn(6, 5, generator=gen), torch.randn(9, generator=gen).double(), torch.randn(300, generator=gen)]
        ms = [torch.randn(6, 5, generator=gen), torch.randn(9, generator=gen).double(), torch.randn(300, generator=gen)]
        return ps, gs, ms

    fused, ref = make(), make()
    kw = dict(lr=LR, decay=0.99, beta1=0.9, beta2=0.99)
    try:
        kernels.lion_update_fused_(*fused, **kw)
        refused = False
    except ValueError:
        refused = True
    untouched = not any(mismatches(fused[0], make()[0]))
    lion_update_device_(torch.device("cpu"), *fused, **kw)
    lion_update_foreach_(*ref, **kw)
    restore()
    return {"p": mismatches(fused[0], ref[0]), "m": mismatches(fused[2], ref[2]), "launches": len(calls),
            "refused": refused, "untouched": untouched}


def _make_model_params(seed):
    gen = torch.Generator().manual_seed(seed)
    specs = [((5, 3), torch.float32), ((7,), torch.float32), ((33,), torch.bfloat16), ((4,), torch.float64),
             ((9,), torch.float32), ((2,), torch.float32), ((0,), torch.float32), ((2100,), torch.float32)]
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dt)) for s, dt in specs]


def _optimizer_case():
    """``Lion.step`` (the fused path under the interpreter) = ``Lion.step`` with LLMFOUNDRY_FUSED_LION=0, over steps
    with a changing lr, weight decay, mixed dtypes (fp64 goes to the foreach path), a parameter without
    gradient and an empty one."""
    from llmfoundry.kernels import lion as kernels
    from llmfoundry.train import lion as train_lion
    assert train_lion.use_fused_kernel(torch.device("cpu"))
    used = []
    fused_fn = kernels.lion_update_fused_
    kernels.lion_update_fused_ = lambda *a, **k: (used.append(len(a[0])), fused_fn(*a, **k))
    ours, ref = _make_model_params(0), _make_model_params(0)
    opt = train_lion.Lion(ours, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    ref_opt = train_lion.Lion(ref, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        for i, (a, b) in enumerate(zip(ours, ref)):
            if i == 5:
                continue  # no gradient
            g = torch.randn(a.shape, generator=gen).to(a.dtype)
            a.grad, b.grad = g.clone(), g.clone()
        for o in (opt, ref_opt):
            for group in o.param_groups:
                group["lr"] = 3e-3 * (1.0 - step / 8)
        opt.step()
        os.environ["LLMFOUNDRY_FUSED_LION"] = "0"
        ref_opt.step()
        del os.environ["LLMFOUNDRY_FUSED_LION"]
    kernels.lion_update_fused_ = fused_fn
    return {"p": mismatches([p.detach() for p in ours], [p.detach() for p in ref]),
            "m": mismatches([opt.state[p]["exp_avg"] for p in ours if p.grad is not None],
                            [ref_opt.state[p]["exp_avg"] for p in ref if p.grad is not None]),
            "fused_calls": used, "no_grad_untouched": bool(torch.equal(ours[5], _make_model_params(0)[5]))}


def _dtensor_case():
    """FSDP2 parameters are DTensors: the kernel must write into their local shards (one gloo process)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from llmfoundry.train.lion import Lion
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        p = torch.nn.Parameter(distribute_tensor(torch.zeros(4, 3), mesh, [Shard(0)]))
        p.grad = distribute_tensor(torch.ones(4, 3), mesh, [Shard(0)])
        opt = Lion([p], lr=0.1)
        opt.step()
        m = opt.state[p]["exp_avg"]
        return {"dtensor_state": type(m).__name__, "p_sum": p.to_local().sum().item(),
                "m_sum": m.to_local().sum().item()}
    finally:
        dist.destroy_process_group()


def _worker():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    torch.set_num_threads(1)
    undo_exact_fma = _exact_interpreter()
    _cuda_semantics_foreach()
    results = {name: run_case(spec, SIZES, seed) for seed, (name, spec) in enumerate(CASES.items())}
    results["fallback"] = _fallback_case()
    results["optimizer"] = _optimizer_case()
    results["dtensor"] = _dtensor_case()
    undo_exact_fma()
    results["unfused_fma_interpreter"] = run_case(CASES["fp32"], SIZES, 0)
    print(json.dumps(results))


@pytest.fixture(scope="module")
def interpreter_results():
    return run_interpreter_worker(__file__, timeout=300, unset=("LLMFOUNDRY_FUSED_LION",))


@pytest.mark.parametrize("name", list(CASES))
def test_fused_equals_foreach_bitwise(interpreter_results, name):
    res = interpreter_results[name]
    assert res["p"] == [0] * len(SIZES) and res["m"] == [0] * len(SIZES), res
    assert res["changed"] > 0.2 * sum(SIZES)  # the step did move the parameters (bf16: where lr exceeds half an ulp)


def test_fallback_for_fp64_and_non_contiguous(interpreter_results):
    res = interpreter_results["fallback"]
    assert res["refused"] and res["untouched"], res
    assert res["p"] == [0, 0, 0] and res["m"] == [0, 0, 0] and res["launches"] == 1, res


def test_optimizer_step_fused_equals_foreach(interpreter_results):
    res = interpreter_results["optimizer"]
    assert not any(res["p"]) and not any(res["m"]), res
    # per step one kernel call per (device, dtype) bucket: fp32 (5 with grads), bf16; fp64 goes to the foreach path
    assert res["fused_calls"] == [5, 1] * 4 and res["no_grad_untouched"]


def test_dtensor_shards_updated_in_place(interpreter_results):
    res = interpreter_results["dtensor"]
    assert res["dtensor_state"] == "DTensor"
    assert res["p_sum"] == pytest.approx(-0.1 * 12) and res["m_sum"] == pytest.approx(0.01 * 12)


def test_comparison_detects_one_ulp(interpreter_results):
    """With the interpreter's unfused fma the momentum differs by an ulp here and there: bitwise means bitwise."""
    assert sum(interpreter_results["unfused_fma_interpreter"]["m"]) > 0


def test_kernel_path_choice(monkeypatch):
    pytest.importorskip("triton")
    from llmfoundry.kernels import lion as kernels
    from llmfoundry.train.lion import use_fused_kernel
    monkeypatch.delenv("LLMFOUNDRY_FUSED_LION", raising=False)
    assert use_fused_kernel(torch.device("cuda")) and use_fused_kernel(torch.device("cpu")) == kernels._INTERPRET
    monkeypatch.setenv("LLMFOUNDRY_FUSED_LION", "0")
    assert not use_fused_kernel(torch.device("cuda"))


def test_lerp_coefficients():
    """ATen rounds the weight to fp32 and picks its branch on the rounded weight; 1 - w is formed in fp32."""
    import numpy as np
    pytest.importorskip("triton")
    from llmfoundry.kernels.lion import _lerp_coefficient
    for w in [0.1, 0.01, 0.05, 0.4999999999, 0.5, 0.55, 0.7, 0.7000000001, 0.99, 1.0, 0.0]:
        c, small = _lerp_coefficient(w)
        w32 = np.float32(w)
        assert small == (abs(w32) < 0.5)
        assert c == (float(w32) if small else -float(np.float32(1) - w32))


class _Wrapped(torch.Tensor):
    """A wrapper tensor subclass with one inner tensor and no storage of its own, the form of torchao's FP8
    training weights (``WeightWithDynamicFloat8CastTensor``): ops on it run on ``_tensor``."""

    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype, device=inner.device)

    def __init__(self, inner):
        self._tensor = inner

    def __tensor_flatten__(self):
        return ["_tensor"], None

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_map
        unwrap = lambda x: x._tensor if isinstance(x, _Wrapped) else x  # noqa: E731
        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))


def test_wrapper_subclass_weights_are_updated_through_their_inner_tensor():
    """FP8 training weights wrap their numbers: the step updates the inner tensor (the fused kernel was handed the
    storage-less wrapper and faulted on the GPU), and the result equals the step on plain tensors."""
    pytest.importorskip("triton")
    from llmfoundry.kernels.lion import takes
    from llmfoundry.train.lion import Lion, _local
    g = torch.Generator().manual_seed(0)
    w, grad = torch.randn(64, 32, generator=g), torch.randn(64, 32, generator=g)
    wrapped = _Wrapped(w.clone())
    assert _local(wrapped) is wrapped._tensor
    assert not takes(wrapped, grad, grad) and takes(w, grad, grad)
    plain_p, wrapped_p = w.clone().requires_grad_(), wrapped.requires_grad_()
    for p in (plain_p, wrapped_p):
        p.grad = grad.clone()
        opt = Lion([p], lr=1e-2, weight_decay=0.1)
        opt.step()
        p.grad = -grad.clone()
        opt.step()
    assert torch.equal(wrapped_p._tensor, plain_p.detach())
    assert not torch.equal(plain_p.detach(), w)


# ---------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(CASES))
def test_gpu_fused_equals_foreach_bitwise(name):
    res = run_case(CASES[name], SIZES + [3_000_017, (1 << 24) + 5], 0, device="cuda")
    assert not any(res["p"]) and not any(res["m"]), res


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
