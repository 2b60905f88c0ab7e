"""Attention: ALiBi slopes, masks, GQA, and kernel equality (torch vs flex on CPU; flash/triton/flex on GPU)."""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from llmfoundry.models.mpt.attention import KVCache, MPTAttention, alibi_slopes, build_attn_context
from llmfoundry.models.mpt.config import MPTConfig

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cfg(impl="torch", alibi=True, n_heads=4, kv=None, d_model=32, seq_id=False, **kw) -> MPTConfig:
    return MPTConfig(d_model=d_model, n_heads=n_heads, n_layers=2, max_seq_len=64, vocab_size=50,
                     attn_config=dict(attn_impl=impl, alibi=alibi, kv_n_heads=kv, attn_uses_sequence_id=seq_id),
                     **kw)


@pytest.mark.parametrize("h", [1, 6, 12, 16, 32])
def test_alibi_slopes_match_transformers(h):
    mod = pytest.importorskip("transformers.models.mpt.modeling_mpt")
    build_mpt_alibi_tensor = mod.build_mpt_alibi_tensor
    ref = build_mpt_alibi_tensor(h, 8, alibi_bias_max=8)  # (H, 1, L) = slope * (j - (L - 1))
    ref_slopes = -ref[:, 0, -2]
    torch.testing.assert_close(alibi_slopes(h, 8), ref_slopes.float(), rtol=1e-6, atol=0)


def test_alibi_slopes_rule():
    s = alibi_slopes(16, 8)
    torch.testing.assert_close(s, torch.tensor([2.0 ** (-0.5 * i) for i in range(1, 17)]))
    # 12 heads: n = 16, slopes of odd indices (2, 4, ..., 16) then even (1, 3, ...), truncated to 12
    full = [2.0 ** (-0.5 * i) for i in range(1, 17)]
    torch.testing.assert_close(alibi_slopes(12, 8), torch.tensor((full[1::2] + full[::2])[:12]))


def reference_attention(q, k, v, slopes, allowed, scale):
    """Plain softmax attention; allowed (B|1, 1, Sq, Sk) bool."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-1, -2) * scale
    sq, sk = q.shape[2], k.shape[2]
    qp = torch.arange(sk - sq, sk)[:, None]
    kp = torch.arange(sk)[None, :]
    if slopes is not None:
        s = s + slopes[None, :, None, None] * (kp - qp)
    s = s.masked_fill(~allowed, float("-inf"))
    return s.softmax(-1) @ v


def qkv(b=2, h=4, hkv=4, sq=12, sk=12, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, sq, d, generator=g), torch.randn(b, hkv, sk, d, generator=g),
            torch.randn(b, hkv, sk, d, generator=g))


def run_kernel(c, q, k, v, attention_mask=None, sequence_id=None):
    from llmfoundry.models.mpt.attention import KERNELS
    b, _, sq, d = q.shape
    ctx = build_attn_context(c, b, sq, k.shape[2] - sq, q.device, q.dtype, attention_mask, sequence_id)
    return KERNELS[ctx.impl](q, k, v, ctx, 0.0, 1 / math.sqrt(d))


CASES = [  # (alibi, kv heads, sq, sk, padding, sequence ids)
    (True, 4, 12, 12, False, False), (False, 4, 12, 12, False, False), (True, 2, 12, 12, False, False),
    (True, 1, 3, 12, False, False), (False, 2, 3, 12, False, False), (True, 4, 1, 12, False, False),
    (True, 4, 12, 12, True, False), (True, 2, 1, 12, True, False), (True, 4, 12, 12, False, True),
    (False, 2, 12, 12, False, True),
]


@pytest.mark.parametrize("alibi,hkv,sq,sk,pad,sid", CASES)
@pytest.mark.parametrize("impl", ["torch", "flex"])
def test_kernels_match_reference(impl, alibi, hkv, sq, sk, pad, sid):
    c = cfg(impl, alibi=alibi, kv=hkv, seq_id=sid)
    q, k, v = qkv(hkv=hkv, sq=sq, sk=sk)
    b = q.shape[0]
    qp = torch.arange(sk - sq, sk)[:, None]
    kp = torch.arange(sk)[None, :]
    allowed = (kp <= qp)[None, None].expand(b, 1, sq, sk)
    mask = seq = None
    if pad:
        mask = torch.ones(b, sk, dtype=torch.long)
        mask[1, :4] = 0  # left padding on row 1
        allowed = allowed & mask.bool()[:, None, None, :]
    if sid:
        seq = torch.tensor([[0] * 5 + [1] * 7, [0] * 3 + [1] * 4 + [2] * 5])
        allowed = allowed & (seq[:, None, :, None] == seq[:, None, None, :])
    allowed = allowed | (kp == qp)[None, None]
    ref = reference_attention(q, k, v, alibi_slopes(4) if alibi else None, allowed, 1 / math.sqrt(q.shape[-1]))
    out = run_kernel(c, q, k, v, mask, seq)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_padded_rows_are_finite():
    c = cfg("torch")
    q, k, v = qkv()
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :6] = 0
    assert torch.isfinite(run_kernel(c, q, k, v, mask)).all()


def test_gqa_projection_shape():
    c = cfg(n_heads=8, kv=2, d_model=64)
    attn = MPTAttention(c)
    assert attn.Wqkv.weight.shape == (64 + 2 * 2 * 8, 64)
    x = torch.randn(2, 5, 64)
    ctx = build_attn_context(c, 2, 5, 0, x.device, x.dtype)
    cache = KVCache(1)
    y = attn(x, ctx, cache, 0)
    assert y.shape == x.shape and cache.keys[0].shape == (2, 2, 5, 8)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash_attn is installed")
def test_flash_missing_names_the_install():
    c = cfg("flash")
    q, k, v = (t.bfloat16() for t in qkv())
    with pytest.raises(ImportError, match=r"pip install 'mpt-forge\[flash\]'"):
        run_kernel(c, q, k, v)


def test_flash_and_triton_fall_back_to_torch_with_padding():
    q, k, v = qkv()
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :3] = 0
    for impl in ("flash", "triton"):
        ctx = build_attn_context(cfg(impl), 2, 12, 0, q.device, q.dtype, mask)
        assert ctx.impl == "torch"


# ------------------------------------------------------------------------------------------------ GPU (bf16)

def _gpu_compare(impl, alibi, hkv, sid, sq=256, sk=256):
    torch.manual_seed(0)
    c = cfg(impl, alibi=alibi, kv=hkv, seq_id=sid, n_heads=8, d_model=512)
    q, k, v = (t.cuda().bfloat16() for t in qkv(h=8, hkv=hkv, sq=sq, sk=sk, d=64))
    seq = None
    if sid:
        seq = torch.zeros(2, sq, dtype=torch.long, device="cuda")
        seq[:, 100:] = 1
        seq[1, 200:] = 2
    ref = run_kernel(cfg("torch", alibi=alibi, kv=hkv, seq_id=sid, n_heads=8, d_model=512), q.float(), k.float(),
                     v.float(), sequence_id=seq)
    out = run_kernel(c, q, k, v, sequence_id=seq)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("alibi,hkv,sid", [(True, 8, False), (True, 2, False), (False, 8, False),
                                           (True, 8, True), (True, 2, True)])
def test_flex_gpu_matches_torch(alibi, hkv, sid):
    _gpu_compare("flex", alibi, hkv, sid)


@pytest.mark.gpu
@cuda
@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash_attn not installed")
@pytest.mark.parametrize("alibi,hkv,sid", [(True, 8, False), (True, 2, False), (False, 8, False),
                                           (True, 8, True)])
def test_flash_gpu_matches_torch(alibi, hkv, sid):
    _gpu_compare("flash", alibi, hkv, sid)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("alibi,hkv,sid", [(True, 8, False), (True, 2, False), (True, 8, True)])
def test_triton_gpu_matches_torch(alibi, hkv, sid):
    pytest.importorskip("llmfoundry.kernels.flash_alibi")
    _gpu_compare("triton", alibi, hkv, sid)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("impl", ["flex", "triton"])
def test_gpu_decode_step_matches_torch(impl):
    if impl == "triton":
        pytest.importorskip("llmfoundry.kernels.flash_alibi")
    _gpu_compare(impl, True, 2, False, sq=1, sk=300)
