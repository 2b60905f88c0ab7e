"""Tests of the residual add + LayerNorm kernels (``llmfoundry/kernels/layer_norm.py``) and of the blocks that add
every branch to the residual stream through the next norm (``LayerNorm.add_forward``).

CPU: the kernels under Triton's interpreter, in ONE subprocess (this file run with ``--worker``), against a float64
reference and against torch's unfused ops, including a tiny MPT trained a step each way; and, without the
interpreter, the blocks' new residual bookkeeping against the plain pre-norm formula (bit for bit). GPU (``-m
gpu``): the kernels on CUDA in bf16 against torch's ops, and a compiled model each way.
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import run_interpreter_worker

TINY = dict(d_model=64, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=32, vocab_size=128, no_bias=True,
            attn_config={"attn_impl": "torch", "alibi": True})


def _case(kernel, n, d, dtype, x_dtype=torch.float32, a_dtype=torch.float32, has_res=True, has_bias=True,
          use_r=True, gen=None):
    """Our (r, y) and gradients against float64 ones computed from the same rounded inputs; max |error| of each."""
    x = torch.randn(n, d, generator=gen).to(x_dtype).requires_grad_()
    a = torch.randn(n, d, generator=gen).to(a_dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(d, generator=gen)).requires_grad_()
    b = (0.1 * torch.randn(d, generator=gen)).requires_grad_() if has_bias else None
    gr, gy = torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen)
    r, y = kernel.add_layer_norm(x, a if has_res else None, w, b, 1e-5, dtype)
    inputs = [x, w] + ([a] if has_res else []) + ([b] if has_bias else [])
    loss = (y.double() * gy.double()).sum() + ((r.double() * gr.double()).sum() if use_r else 0)
    grads = torch.autograd.grad(loss, inputs)
    # reference: r as torch rounds it, the norm in float64 on r rounded to the norm's dtype
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    xd, wd = ref_in[0], ref_in[1]
    ad = ref_in[2] if has_res else None
    bd = ref_in[-1] if has_bias else None
    r_ref = (x.detach() + a.detach()) if has_res else x.detach()
    # the residual add rounds to r's dtype; the norm sees r rounded to its dtype (straight-through gradients)
    u = (xd + ad) if has_res else xd
    u = u + (r_ref.to(dtype).double() - u).detach()
    y_ref = F.layer_norm(u, (d,), wd.detach().to(dtype).double() + (wd - wd.detach()),
                         None if bd is None else bd.detach().to(dtype).double() + (bd - bd.detach()), 1e-5)
    r_full = (xd + ad) if has_res else xd
    loss_ref = (y_ref * gy.double()).sum() + ((r_full * gr.double()).sum() if use_r else 0)
    grads_ref = torch.autograd.grad(loss_ref, ref_in)
    out = {"r": (r.double() - r_ref.double()).abs().max().item() if has_res else 0.0,
           "r_is_x": (r is x) if not has_res else None,
           "y": (y.double() - y_ref).abs().max().item(),
           "y_scale": y_ref.abs().max().item(),
           "dtypes": [str(t.dtype) for t in (r, y, *grads)]}
    for name, g, g_ref in zip(("dx", "dw", "da" if has_res else "db", "db"), grads, grads_ref):
        out[name] = (g.double() - g_ref).abs().max().item() / max(g_ref.abs().max().item(), 1e-30)
    return out


def _model_step(env_value: str, norm_type: str) -> dict:
    """One forward + backward of a tiny MPT under bf16 autocast on CPU: loss and gradients."""
    from llmfoundry.models.mpt import MPTForCausalLM
    os.environ["LLMFOUNDRY_LAYERNORM"] = env_value
    torch.manual_seed(0)
    m = MPTForCausalLM(dict(TINY, norm_type=norm_type))
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(input_ids=ids, labels=ids).loss
    loss.backward()
    return {"loss": loss.item(), **{n: p.grad.clone() for n, p in m.named_parameters()}}


def _worker():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from llmfoundry.kernels import layer_norm as kernel
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    f32, bf16 = torch.float32, torch.bfloat16
    res = {
        # fp32 throughout; d not a power of 2, rows not a multiple of a tile, several tiles per backward program
        "fp32": _case(kernel, 7, 100, f32, gen=gen),
        "fp32_no_res_no_bias": _case(kernel, 5, 64, f32, has_res=False, has_bias=False, gen=gen),
        "fp32_y_only": _case(kernel, 9, 33, f32, has_bias=False, use_r=False, gen=gen),
        # an fp32 residual stream plus a bf16 branch, normalized in bf16 (low_precision_layernorm)
        "mixed_bf16_norm": _case(kernel, 6, 48, bf16, a_dtype=bf16, gen=gen),
        "bf16_all": _case(kernel, 4, 40, bf16, x_dtype=bf16, a_dtype=bf16, has_bias=False, gen=gen),
    }
    res["empty"] = [list(t.shape) for t in kernel.add_layer_norm(torch.zeros(0, 8), torch.zeros(0, 8),
                                                                 torch.ones(8), None, 1e-5, f32)]
    for norm_type in ("layernorm", "low_precision_layernorm"):
        fused, ref = _model_step("triton", norm_type), _model_step("torch", norm_type)
        res[f"model_{norm_type}"] = {
            "loss": [fused["loss"], ref["loss"]],
            "grad_rel": max((fused[k] - ref[k]).abs().max().item() / max(ref[k].abs().max().item(), 1e-30)
                            for k in ref if k != "loss")}
    print(json.dumps(res))


@pytest.fixture(scope="module")
def interpreter_results():
    return run_interpreter_worker(__file__, timeout=600)


def test_interpreter_kernels_match_float64(interpreter_results):
    res = interpreter_results
    for name in ("fp32", "fp32_no_res_no_bias", "fp32_y_only"):
        case = res[name]
        assert case["r"] == 0.0 and case["y"] < 1e-5 * case["y_scale"], (name, case)
        assert max(case[k] for k in ("dx", "dw", "da", "db") if k in case) < 1e-5, (name, case)
    assert res["fp32_no_res_no_bias"]["r_is_x"] is True
    assert res["fp32"]["dtypes"] == ["torch.float32"] * 6


def test_interpreter_low_precision_dtypes_and_rounding(interpreter_results):
    """bf16 norms: y within two bf16 units of the float64 result of the same inputs (Triton 3.3's interpreter
    truncates fp32 -> bf16 where the GPU rounds to nearest, once for the norm's input and once for y), gradients to
    bf16 precision, and the dtypes torch's ops give: r in the promoted dtype, y in the norm's, each input's
    gradient in its own dtype."""
    mixed, allb = interpreter_results["mixed_bf16_norm"], interpreter_results["bf16_all"]
    assert mixed["r"] == 0.0 and allb["r"] <= 2 ** -7 * 8, (mixed, allb)  # |x + a| < 8
    for case in (mixed, allb):
        assert case["y"] <= 2 ** -6 * case["y_scale"], case
        assert max(case[k] for k in ("dx", "dw", "da", "db") if k in case) < 2e-2, case
    assert mixed["dtypes"] == ["torch.float32", "torch.bfloat16", "torch.float32", "torch.float32",
                               "torch.bfloat16", "torch.float32"], mixed
    assert allb["dtypes"] == ["torch.bfloat16", "torch.bfloat16", "torch.bfloat16", "torch.float32",
                              "torch.bfloat16"], allb
    assert interpreter_results["empty"] == [[0, 8], [0, 8]]


def test_interpreter_tiny_model_matches_torch_norm(interpreter_results):
    """A tiny MPT's loss and gradients under bf16 autocast, fused kernels vs LLMFOUNDRY_LAYERNORM=torch."""
    fp32_norm = interpreter_results["model_layernorm"]
    assert abs(fp32_norm["loss"][0] - fp32_norm["loss"][1]) < 1e-4, fp32_norm
    assert fp32_norm["grad_rel"] < 2e-2, fp32_norm
    low = interpreter_results["model_low_precision_layernorm"]
    assert abs(low["loss"][0] - low["loss"][1]) < 2e-2, low
    assert low["grad_rel"] < 0.1, low


def test_blocks_compute_the_pre_norm_formula_bit_for_bit():
    """The blocks hand each MLP output to the next norm (x, branch) instead of adding it at the block's end; on the
    torch path the hidden states equal the plain formula x + attn(norm_1(x)), then + ffn(norm_2(x))."""
    from llmfoundry.models.mpt import MPTForCausalLM
    from llmfoundry.models.mpt.attention import build_attn_context
    torch.manual_seed(0)
    m = MPTForCausalLM(dict(TINY, norm_type="low_precision_layernorm")).eval()
    ids = torch.randint(0, 128, (2, 32))
    t = m.transformer
    with torch.no_grad():
        x = t.wte(ids)
        ctx = build_attn_context(t.config, 2, 32, 0, x.device, x.dtype, None, None)
        for i, blk in enumerate(t.blocks):
            x = x + blk.attn(blk.norm_1(x), ctx, None, i)
            x = x + blk.ffn(blk.norm_2(x))
        expected = t.norm_f(x)
        assert torch.equal(t(ids), expected)


def test_add_forward_without_a_branch_returns_the_stream_itself():
    from llmfoundry.models.mpt.norm import LayerNorm, RMSNorm
    x = torch.randn(3, 16)
    for norm in (LayerNorm(16, bias=False, low_precision=True), RMSNorm(16)):
        r, y = norm.add_forward(x)
        assert r is x and torch.equal(y, norm(x))
        a = torch.randn(3, 16)
        r, y = norm.add_forward(x, a)
        assert torch.equal(r, x + a) and torch.equal(y, norm(x + a))


# ---------------------------------------------------------------------------------------------------- GPU
def _gpu_pair(n, d, has_res, has_bias, x_dtype=torch.bfloat16, dtype=torch.bfloat16):
    from llmfoundry.kernels import layer_norm as kernel
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, d, device="cuda", generator=gen, dtype=x_dtype, requires_grad=True)
    a = torch.randn(n, d, device="cuda", generator=gen, dtype=torch.bfloat16, requires_grad=True)
    w = (1 + 0.1 * torch.randn(d, device="cuda", generator=gen)).to(torch.bfloat16).requires_grad_()
    b = (0.1 * torch.randn(d, device="cuda", generator=gen)).to(torch.bfloat16).requires_grad_() if has_bias else None
    gr, gy = torch.randn_like(x), torch.randn_like(x)
    out = []
    for fused in (True, False):
        if fused:
            r, y = kernel.add_layer_norm(x, a if has_res else None, w, b, 1e-5, dtype)
        else:
            r = x + a if has_res else x
            y = F.layer_norm(r.to(dtype), (d,), w.to(dtype), None if b is None else b.to(dtype), 1e-5)
        inputs = [x, w] + ([a] if has_res else []) + ([b] if has_bias else [])
        grads = torch.autograd.grad((r.float() * gr.float()).sum() + (y.float() * gy.float()).sum(), inputs)
        out.append((r.detach(), y.detach(), *grads))
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n,d,has_res,has_bias,x_dtype", [
    (4096, 2048, True, False, torch.bfloat16), (3001, 1000, True, True, torch.bfloat16),
    (257, 4096, False, False, torch.bfloat16), (2048, 2048, True, False, torch.float32),  # an fp32 stream
    (64, 8192, True, False, torch.bfloat16)])
def test_gpu_kernels_match_torch_bf16(n, d, has_res, has_bias, x_dtype):
    ours, ref = _gpu_pair(n, d, has_res, has_bias, x_dtype)
    assert torch.equal(ours[0], ref[0])  # the residual add rounds the same way
    same = (ours[1] == ref[1]).float().mean().item()
    assert same > 0.98, same  # the rest differ by one bf16 unit where the fp32 results straddle a midpoint
    torch.testing.assert_close(ours[1].float(), ref[1].float(), rtol=2 ** -7, atol=2 ** -7)
    for g, h in zip(ours[2:], ref[2:]):
        torch.testing.assert_close(g.float(), h.float(), rtol=2e-2, atol=2e-2 * h.float().abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_compiled_model_matches_torch_norm(monkeypatch):
    """A small MPT, compiled, one forward + backward under bf16 autocast with each norm path."""
    from llmfoundry.models.mpt import MPTForCausalLM
    cfg = dict(TINY, d_model=256, n_heads=4, max_seq_len=128, vocab_size=512, norm_type="low_precision_layernorm",
               attn_config={"attn_impl": "triton", "alibi": True})
    ids = torch.randint(0, 512, (4, 128), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    results = []
    for value in ("triton", "torch"):
        monkeypatch.setenv("LLMFOUNDRY_LAYERNORM", value)
        torch.manual_seed(0)
        m = MPTForCausalLM(cfg).cuda()
        step = torch.compile(lambda: m(input_ids=ids, labels=ids).loss)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step()
        loss.backward()
        results.append((loss.item(), {n: p.grad.float() for n, p in m.named_parameters()}))
        torch._dynamo.reset()
    (l1, g1), (l2, g2) = results
    assert abs(l1 - l2) < 1e-2, (l1, l2)
    for name in g2:
        torch.testing.assert_close(g1[name], g2[name], rtol=5e-2, atol=5e-2 * g2[name].abs().max().item())


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
