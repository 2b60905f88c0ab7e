"""Tests of the blocks' residual bookkeeping: each block adds its MLP output to the residual stream through the
next norm (``add_norm``), so that a compiled model fuses every residual add with the norm after it."""
from __future__ import annotations

import torch

TINY = dict(d_model=64, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=32, vocab_size=128, no_bias=True,
            attn_config={"attn_impl": "torch", "alibi": True}, norm_type="low_precision_layernorm")


def test_blocks_compute_the_pre_norm_formula_bit_for_bit():
    """The blocks hand each MLP output to the next norm as (x, branch) instead of adding it at the block's end;
    the hidden states equal the plain formula x + attn(norm_1(x)), then + ffn(norm_2(x)), bit for bit."""
    from llmfoundry.models.mpt import MPTForCausalLM
    from llmfoundry.models.mpt.attention import build_attn_context
    torch.manual_seed(0)
    m = MPTForCausalLM(TINY).eval()
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


def test_add_norm_returns_the_sum_and_its_norm():
    from llmfoundry.models.mpt.norm import LayerNorm, RMSNorm, add_norm
    x, a = torch.randn(3, 16), torch.randn(3, 16)
    for norm in (LayerNorm(16, bias=False, low_precision=True), RMSNorm(16)):
        r, y = add_norm(norm, x)
        assert r is x and torch.equal(y, norm(x))  # no branch: the stream itself, no copy
        r, y = add_norm(norm, x, a)
        assert torch.equal(r, x + a) and torch.equal(y, norm(x + a))
