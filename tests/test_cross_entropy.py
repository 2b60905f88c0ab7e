"""Tests of the fused cross-entropy kernel (loss + gradient written into the logits) and of the fused
output-head loss ``fused_linear_cross_entropy`` built on it, against float64 / eager autograd references.

CPU: the torch path directly; the Triton kernel under Triton's interpreter, which must be switched on before
triton is imported, so every interpreter case runs in ONE subprocess (this file run as a script with
``--worker``) whose results the tests read. GPU (``-m gpu``): the kernel on CUDA at the real vocabulary size.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_interpreter_worker
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]


def reference_loss_and_grad(logits, targets, grad_scale, logit_scale=1.0):
    """float64 autograd: per-row CE of ``logit_scale * logits`` and d(sum(loss) * grad_scale / logit_scale)/d
    logits, i.e. ``grad_scale * (softmax - onehot)`` (the kernel's contract)."""
    x = logits.detach().double().requires_grad_()
    loss = F.cross_entropy(x * logit_scale, targets, ignore_index=-100, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum() * (float(grad_scale) / logit_scale), x)
    return loss, grad


def random_case(N, V, dtype, seed, ignored=(2,)):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, V, generator=gen) * 4).to(dtype)
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[list(ignored)] = -100
    return logits, targets


def max_err(x, ref):
    return (x.double() - ref.double()).abs().max().item()


def reference_lm_loss(hidden, weight, labels, logit_scale=None):
    logits = F.linear(hidden, weight) * (logit_scale or 1)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def lm_case(B=3, S=6, d=16, V=37, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, S, d, generator=gen, dtype=dtype).requires_grad_()
    weight = (torch.randn(V, d, generator=gen, dtype=dtype) * 0.5).requires_grad_()
    labels = torch.randint(0, V, (B, S), generator=gen)
    labels[1, 2:5] = -100
    return hidden, weight, labels


# ------------------------------------------------------------------------------------------ torch path (CPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("logit_scale,tensor_scale", [(1.0, False), (0.7, True)])
def test_torch_path_matches_float64(dtype, logit_scale, tensor_scale, monkeypatch):
    from llmfoundry.kernels import cross_entropy as ce
    monkeypatch.setattr(ce, "_TORCH_SLICE_ELEMS", 3 * 300)  # 3 rows per slice: the slicing is exercised
    logits, targets = random_case(10, 300, dtype, seed=1, ignored=(0, 5))
    scale = logit_scale / 8
    ref_loss, ref_grad = reference_loss_and_grad(logits, targets, scale, logit_scale)
    out = logits.clone()
    loss = ce.cross_entropy_loss_and_grad_(out, targets, torch.tensor(scale) if tensor_scale else scale,
                                           logit_scale=logit_scale)
    assert loss.dtype == torch.float32 and out.dtype == dtype
    assert max_err(loss, ref_loss) < 1e-5
    tol = 1e-7 if dtype == torch.float32 else 4e-3 * scale  # bf16: the written gradient is rounded (1 ulp)
    assert max_err(out, ref_grad) < tol
    assert loss[[0, 5]].eq(0).all() and out[[0, 5]].eq(0).all()
    loss_only = logits.clone()
    assert torch.equal(ce.cross_entropy_loss(loss_only, targets, logit_scale=logit_scale), loss)
    assert torch.equal(loss_only, logits)


def test_torch_path_validation():
    from llmfoundry.kernels.cross_entropy import cross_entropy_loss_and_grad_
    logits = torch.zeros(4, 10)
    with pytest.raises(ValueError, match="targets must lie"):
        cross_entropy_loss_and_grad_(logits, torch.tensor([1, -100, 10, 2]), 1.0)
    with pytest.raises(ValueError, match="targets must lie"):
        cross_entropy_loss_and_grad_(logits, torch.tensor([1, -1, 3, 2]), 1.0)
    with pytest.raises(ValueError, match="contiguous last dim"):
        cross_entropy_loss_and_grad_(torch.zeros(10, 4).t(), torch.zeros(4, dtype=torch.long), 1.0)
    with pytest.raises(ValueError, match="shape"):
        cross_entropy_loss_and_grad_(logits, torch.zeros(3, dtype=torch.long), 1.0)


# ------------------------------------------------------------------------------------- interpreter (CPU)
# name: (N, V, dtype, logit_scale, tensor grad_scale, row stride padding)
KERNEL_CASES = {
    "fp32": (7, 300, "float32", 1.0, False, 0),
    "bf16": (7, 300, "bfloat16", 1.0, False, 0),
    "fp16_scaled_tensor_scale": (5, 300, "float16", 0.5, True, 0),
    "fp32_strided_rows": (6, 129, "float32", 2.0, True, 11),
    "fp32_v_below_block": (4, 37, "float32", 1.0, False, 0),
}


def _kernel_case(spec):
    from llmfoundry.kernels.cross_entropy import cross_entropy_loss, cross_entropy_loss_and_grad_
    N, V, dtype, logit_scale, tensor_scale, pad = spec
    dtype = getattr(torch, dtype)
    logits, targets = random_case(N, V, dtype, seed=N * V, ignored=(2,))
    scale = logit_scale / 3
    ref_loss, ref_grad = reference_loss_and_grad(logits, targets, scale, logit_scale)
    buf = torch.full((N, V + pad), 7.0, dtype=dtype)  # rows of stride V + pad; the padding must stay untouched
    out = buf[:, :V]
    out.copy_(logits)
    loss_only = cross_entropy_loss(out, targets, logit_scale=logit_scale)
    unchanged = torch.equal(out, logits)
    loss = cross_entropy_loss_and_grad_(out, targets, torch.tensor(scale) if tensor_scale else scale,
                                        logit_scale=logit_scale)
    return {"loss": max_err(loss, ref_loss), "grad": max_err(out, ref_grad) / scale,
            "loss_only": max_err(loss_only, loss), "loss_only_unchanged": unchanged,
            "ignored_zero": bool(loss[2] == 0 and out[2].eq(0).all()),
            "padding_untouched": bool(buf[:, V:].eq(7.0).all()), "grad_dtype": str(out.dtype)}


def _kernel_bad_target_case():
    """A target outside [0, V) on the kernel path (the CPU-side check skipped, as on CUDA): NaN loss for that
    row only, no out-of-bounds read."""
    from llmfoundry.kernels.cross_entropy import _kernel_launch
    logits, targets = random_case(3, 40, torch.float32, seed=3, ignored=())
    targets[1] = 40
    loss = _kernel_launch(logits.clone(), targets, 1.0, -100, 1.0, True)
    return {"nan_rows": loss.isnan().nonzero().flatten().tolist()}


def _fused_case():
    """fused_linear_cross_entropy end to end through the interpreted kernel (chunks of 4 rows)."""
    from llmfoundry.models.mpt.loss import fused_linear_cross_entropy
    hidden, weight, labels = lm_case(B=2, S=5, d=8, V=70)
    ref = reference_lm_loss(hidden, weight, labels, 0.5)
    ref_g = torch.autograd.grad(ref, (hidden, weight))
    loss = fused_linear_cross_entropy(hidden, weight, labels, 0.5, chunk_tokens=4)
    g = torch.autograd.grad(loss, (hidden, weight))
    return {"loss": abs(loss.item() - ref.item()), "grads": max(max_err(a, b) for a, b in zip(g, ref_g))}


def _worker():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from llmfoundry.kernels import cross_entropy as ce
    assert ce._use_kernel(torch.zeros(1)), "the interpreter path is not taken"
    torch.set_num_threads(1)
    results = {name: _kernel_case(spec) for name, spec in KERNEL_CASES.items()}
    results["bad_target"] = _kernel_bad_target_case()
    results["fused"] = _fused_case()
    print(json.dumps(results))


@pytest.fixture(scope="module")
def interpreter_results():
    return run_interpreter_worker(__file__, timeout=600)


@pytest.mark.parametrize("name", list(KERNEL_CASES))
def test_interpreter_kernel_matches_float64(interpreter_results, name):
    res = interpreter_results[name]
    dtype = KERNEL_CASES[name][2]
    assert res["loss"] < 1e-5, res
    assert res["grad"] < (1e-5 if dtype == "float32" else 1e-2), res  # relative to grad_scale
    assert res["loss_only"] == 0.0 and res["loss_only_unchanged"], res
    assert res["ignored_zero"] and res["padding_untouched"], res
    assert res["grad_dtype"] == f"torch.{dtype}"


def test_interpreter_out_of_range_target_gives_nan(interpreter_results):
    assert interpreter_results["bad_target"]["nan_rows"] == [1]


def test_interpreter_fused_linear_cross_entropy(interpreter_results):
    res = interpreter_results["fused"]
    assert res["loss"] < 1e-5 and res["grads"] < 1e-6, res


# ------------------------------------------------------------------------ fused_linear_cross_entropy (CPU)
@pytest.mark.parametrize("chunk_tokens", [1, 4, 6, 100])  # B*S = 18 rows: smaller (dividing or not), larger
@pytest.mark.parametrize("logit_scale", [None, 0.5])
def test_fused_equals_reference_fp32(chunk_tokens, logit_scale):
    from llmfoundry.models.mpt.loss import fused_linear_cross_entropy
    hidden, weight, labels = lm_case()
    ref = reference_lm_loss(hidden, weight, labels, logit_scale)
    ref_g = torch.autograd.grad(ref, (hidden, weight))
    loss = fused_linear_cross_entropy(hidden, weight, labels, logit_scale, chunk_tokens=chunk_tokens)
    g = torch.autograd.grad(loss * 3.0, (hidden, weight))  # a scaled loss: backward scales the saved grads
    torch.testing.assert_close(loss, ref)
    for a, b in zip(g, ref_g):
        torch.testing.assert_close(a, 3.0 * b)
    assert g[0][:, -1].eq(0).all()  # the last position has no target


def test_fused_all_ignored_is_zero():
    from llmfoundry.models.mpt.loss import fused_linear_cross_entropy
    hidden, weight, labels = lm_case()
    labels.fill_(-100)
    loss = fused_linear_cross_entropy(hidden, weight, labels, chunk_tokens=4)
    g = torch.autograd.grad(loss, (hidden, weight))
    assert loss.item() == 0.0
    assert all(t.eq(0).all() for t in g)


def test_fused_under_bf16_autocast_with_fp32_weight():
    from llmfoundry.models.mpt.loss import fused_linear_cross_entropy
    hidden, weight, labels = lm_case(d=32, V=100)
    ref = reference_lm_loss(hidden, weight, labels, 0.5)
    ref_g = torch.autograd.grad(ref, (hidden, weight))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(hidden, weight, labels, 0.5, chunk_tokens=5)
    g = torch.autograd.grad(loss, (hidden, weight))
    assert loss.dtype == torch.float32 and [t.dtype for t in g] == [torch.float32, torch.float32]
    torch.testing.assert_close(loss, ref, atol=2e-2, rtol=1e-2)
    for a, b in zip(g, ref_g):
        torch.testing.assert_close(a, b, atol=1e-2 * b.abs().max().item(), rtol=3e-2)


def test_fused_bf16_inputs_without_autocast():
    from llmfoundry.models.mpt.loss import fused_linear_cross_entropy
    hidden, weight, labels = lm_case(d=32, V=100)
    ref = reference_lm_loss(hidden, weight, labels)
    ref_g = torch.autograd.grad(ref, (hidden, weight))
    h16, w16 = (t.detach().bfloat16().requires_grad_() for t in (hidden, weight))
    loss = fused_linear_cross_entropy(h16, w16, labels, chunk_tokens=7)
    g = torch.autograd.grad(loss, (h16, w16))
    assert [t.dtype for t in g] == [torch.bfloat16, torch.bfloat16]
    torch.testing.assert_close(loss, ref, atol=2e-2, rtol=1e-2)
    for a, b in zip(g, ref_g):
        torch.testing.assert_close(a.float(), b, atol=1e-2 * b.abs().max().item(), rtol=3e-2)


def test_fused_no_grad_and_grad_losses_agree():
    from llmfoundry.models.mpt.loss import fused_linear_cross_entropy
    hidden, weight, labels = lm_case()
    with_grad = fused_linear_cross_entropy(hidden, weight, labels, 0.5, chunk_tokens=4)
    with torch.no_grad():
        no_grad = fused_linear_cross_entropy(hidden, weight, labels, 0.5, chunk_tokens=4)
    assert not no_grad.requires_grad and with_grad.requires_grad
    torch.testing.assert_close(no_grad, with_grad, rtol=0, atol=0)
    torch.testing.assert_close(with_grad, reference_lm_loss(hidden, weight, labels, 0.5))


def test_fused_only_weight_requires_grad():
    from llmfoundry.models.mpt.loss import fused_linear_cross_entropy
    hidden, weight, labels = lm_case()
    hidden = hidden.detach()
    ref_g = torch.autograd.grad(reference_lm_loss(hidden, weight, labels), weight)[0]
    g = torch.autograd.grad(fused_linear_cross_entropy(hidden, weight, labels, chunk_tokens=4), weight)[0]
    torch.testing.assert_close(g, ref_g)


def test_fused_compiles_without_graph_break():
    """A custom op: torch.compile(fullgraph=True) keeps it as one node; loss and grads equal eager."""
    from llmfoundry.models.mpt.loss import fused_linear_cross_entropy
    hidden, weight, labels = lm_case()

    def fn(h, w):
        return fused_linear_cross_entropy(torch.tanh(h) * 2.0, w, labels, 0.5, chunk_tokens=4) * 1.5

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    eager, comp = fn(hidden, weight), compiled(hidden, weight)
    ge, gc = torch.autograd.grad(eager, (hidden, weight)), torch.autograd.grad(comp, (hidden, weight))
    torch.testing.assert_close(comp, eager, rtol=0, atol=0)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch._dynamo.reset()


def test_fused_validation():
    from llmfoundry.models.mpt.loss import fused_linear_cross_entropy
    hidden, weight, labels = lm_case()
    with pytest.raises(ValueError, match="expected hidden"):
        fused_linear_cross_entropy(hidden, weight.t(), labels)
    with pytest.raises(ValueError, match="chunk_tokens"):
        fused_linear_cross_entropy(hidden, weight, labels, chunk_tokens=0)


# ---------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_kernel_matches_float64(dtype):
    from llmfoundry.kernels.cross_entropy import cross_entropy_loss_and_grad_
    logits, targets = random_case(64, 50432, dtype, seed=0, ignored=(3, 40))
    scale = 0.5 / 62
    ref_loss, ref_grad = reference_loss_and_grad(logits, targets, scale, 0.5)
    out = logits.cuda()
    loss = cross_entropy_loss_and_grad_(out, targets.cuda(), torch.tensor(scale, device="cuda"), logit_scale=0.5)
    assert max_err(loss.cpu(), ref_loss) < 1e-4
    assert max_err(out.cpu(), ref_grad) < (1e-6 if dtype == torch.float32 else 1e-2) * scale


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fused_under_autocast_matches_reference():
    from llmfoundry.models.mpt.loss import fused_linear_cross_entropy
    hidden, weight, labels = lm_case(B=2, S=300, d=256, V=50432)
    hidden, weight = ((t.detach() * c).cuda().requires_grad_() for t, c in ((hidden, 0.25), (weight, 1.0)))
    labels = labels.cuda()
    ref = reference_lm_loss(hidden.double(), weight.double(), labels)
    ref_g = torch.autograd.grad(ref, (hidden, weight))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(hidden, weight, labels, chunk_tokens=256)
    g = torch.autograd.grad(loss, (hidden, weight))
    torch.testing.assert_close(loss.double(), ref.double(), atol=2e-2, rtol=1e-2)
    for a, b in zip(g, ref_g):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b.double(), atol=2e-2 * b.abs().max().item(), rtol=5e-2)
    # torch >= 2.9 accumulates the chunks' bf16 head-gradient products straight into the fp32 sum (out_dtype=)
    from llmfoundry.models.mpt.loss import _mixed_addmm
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 9):
        assert _mixed_addmm(hidden.device)


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
