"""MPT attention: fused-QKV projection, ALiBi, grouped-query heads, a KV cache, and four kernels.

attn_impl 'torch'  F.scaled_dot_product_attention with an additive ALiBi/causal/sequence-id/padding bias
                   (``is_causal`` fast path when there is no bias).
attn_impl 'flex'   torch.nn.attention.flex_attention: ALiBi as a score_mod, causal/sequence-id/padding as a
                   block mask (compiled on CUDA, eager elsewhere).
attn_impl 'flash'  flash_attn's flash_attn_func / flash_attn_varlen_func (sequence_id) with alibi_slopes.
attn_impl 'triton' llmfoundry.kernels.flash_alibi.flash_alibi_attention.

'flex' and 'triton' hand the decode steps after a KV cache (past_len > 0) to 'torch'.

Masks and biases are built once per forward (``build_attn_context``) and shared by every layer. Rules shared by
all kernels: query i (absolute position past_len + i) sees key j iff j <= past_len + i, the key is not padding
(``attention_mask``) and, with sequence ids, both carry the same id; every query may always see itself, so no
row is fully masked (outputs at padded positions are garbage, never NaN). 'flash' and 'triton' take no padding
mask: a forward with padding falls back to 'torch'.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from llmfoundry.models.mpt.config import MPTConfig
from llmfoundry.models.mpt.norm import build_norm


def alibi_slopes(n_heads: int, alibi_bias_max: float = 8.0, device=None) -> torch.Tensor:
    """MPT's ALiBi slopes, fp32 ``(n_heads,)``.

    With n = 2**ceil(log2(n_heads)): m_i = 2**(-alibi_bias_max * i / n) for i = 1..n; when n != n_heads the
    odd-indexed then even-indexed slopes are interleaved and truncated to n_heads (as MPT does).
    """
    n = 2 ** math.ceil(math.log2(n_heads))
    m = torch.arange(1, n + 1, dtype=torch.float32, device=device) * (alibi_bias_max / n)
    slopes = 1.0 / torch.pow(2.0, m)
    if n != n_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:n_heads]
    return slopes


class KVCache:
    """Per-layer keys and values, each ``(B, kv_n_heads, seq, head_dim)``; updated in place by the forward."""

    def __init__(self, n_layers: int):
        self.keys: list[Optional[torch.Tensor]] = [None] * n_layers
        self.values: list[Optional[torch.Tensor]] = [None] * n_layers

    @classmethod
    def from_legacy(cls, past) -> "KVCache":
        """From a list of ``(k, v)`` tuples (or a KVCache, returned as is)."""
        if isinstance(past, KVCache):
            return past
        cache = cls(len(past))
        for i, (k, v) in enumerate(past):
            cache.keys[i], cache.values[i] = k, v
        return cache

    @property
    def seq_len(self) -> int:
        k = self.keys[0]
        return 0 if k is None else k.shape[2]

    def update(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[i] is not None:
            k = torch.cat([self.keys[i], k], dim=2)
            v = torch.cat([self.values[i], v], dim=2)
        self.keys[i], self.values[i] = k, v
        return k, v

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[i], self.values[i]


@dataclass
class AttnContext:
    """Everything a layer needs besides q/k/v, built once per forward by ``build_attn_context``."""
    impl: str
    q_len: int
    k_len: int
    slopes: Optional[torch.Tensor] = None        # (H,) fp32 ALiBi slopes
    is_causal: bool = False                      # 'torch': SDPA is_causal fast path
    mask: Optional[torch.Tensor] = None          # 'torch': bool (B|1, 1, Sq, Sk) or float bias (B|1, H, Sq, Sk)
    block_mask: Any = None                       # 'flex'
    score_mod: Any = None                        # 'flex'
    sequence_id: Optional[torch.Tensor] = None   # 'triton'
    cu_seqlens: Optional[torch.Tensor] = None    # 'flash' varlen (packed documents)
    max_seqlen: int = 0
    _cast: dict = field(default_factory=dict)

    def mask_for(self, dtype: torch.dtype) -> Optional[torch.Tensor]:
        m = self.mask
        if m is None or m.dtype == torch.bool or m.dtype == dtype:
            return m
        if dtype not in self._cast:
            self._cast[dtype] = m.to(dtype)
        return self._cast[dtype]


def build_attn_context(cfg: MPTConfig, batch: int, q_len: int, past_len: int, device: torch.device,
                       dtype: torch.dtype, attention_mask: Optional[torch.Tensor] = None,
                       sequence_id: Optional[torch.Tensor] = None) -> AttnContext:
    """Masks/biases for one forward. ``attention_mask`` is ``(B, past_len + q_len)`` (1 = real token, 0 =
    padding); ``sequence_id`` ``(B, q_len)`` only without a cache; ``dtype`` is the compute dtype of q/k."""
    a = cfg.attn_config
    k_len = past_len + q_len
    key_valid = None
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (batch, k_len):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected (batch, "
                             f"past + new tokens) = ({batch}, {k_len})")
        if not bool(attention_mask.all()):
            key_valid = attention_mask.to(device=device, dtype=torch.bool)
    slopes = alibi_slopes(cfg.n_heads, a.alibi_bias_max, device) if a.alibi else None
    impl = a.attn_impl
    if impl in ("flash", "triton") and key_valid is not None:
        impl = "torch"  # these kernels take no padding mask
    if impl in ("flex", "triton") and past_len > 0:
        # decode steps: every new key length would recompile flex's kernel, and SDPA's kernels beat ours at a
        # few queries (BENCHMARKS.md, generation); training and the prompt's forward keep the chosen kernel
        impl = "torch"
    ctx = AttnContext(impl=impl, q_len=q_len, k_len=k_len, slopes=slopes)
    if impl == "torch":
        _prepare_torch(ctx, past_len, device, dtype, key_valid, sequence_id)
    elif impl == "flex":
        _prepare_flex(ctx, batch, past_len, device, key_valid, sequence_id)
    elif impl == "flash" and sequence_id is not None:
        _prepare_varlen(ctx, sequence_id)
    elif impl == "triton":
        ctx.sequence_id = sequence_id
    return ctx


def _prepare_torch(ctx, past_len, device, dtype, key_valid, sequence_id):
    q_pos = torch.arange(past_len, ctx.k_len, device=device)
    k_pos = torch.arange(ctx.k_len, device=device)
    if ctx.slopes is None and key_valid is None and sequence_id is None:
        if ctx.q_len == ctx.k_len:
            ctx.is_causal = ctx.q_len > 1
        elif ctx.q_len > 1:  # several new tokens after a cache: bottom-right-aligned causal mask
            ctx.mask = (k_pos[None, :] <= q_pos[:, None])[None, None]
        return
    allowed = (k_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, Sq, Sk)
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :]
    if sequence_id is not None:
        allowed = allowed & (sequence_id[:, None, :, None] == sequence_id[:, None, None, :])
    allowed = allowed | (k_pos[None, :] == q_pos[:, None])[None, None]
    if ctx.slopes is None:
        ctx.mask = allowed
        return
    rel = (k_pos[None, :] - q_pos[:, None]).to(torch.float32)
    bias = (ctx.slopes[:, None, None] * rel)[None]  # (1, H, Sq, Sk)
    ctx.mask = bias.masked_fill(~allowed, float("-inf")).to(dtype)


def _prepare_flex(ctx, batch, past_len, device, key_valid, sequence_id):
    from torch.nn.attention.flex_attention import create_block_mask

    off = torch.tensor(past_len, device=device, dtype=torch.int32)
    slopes = ctx.slopes
    if slopes is not None:
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + slopes[h] * (kv_idx - q_idx - off).to(score.dtype)
        ctx.score_mod = score_mod

    if key_valid is None and sequence_id is None:
        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + off
    else:
        kv_ok = key_valid if key_valid is not None else torch.ones(batch, ctx.k_len, dtype=torch.bool,
                                                                    device=device)
        # sequence ids come without a cache (q_len == k_len), so they index keys and queries alike
        sid = sequence_id if sequence_id is not None else torch.zeros(batch, ctx.k_len, dtype=torch.long,
                                                                      device=device)

        def mask_mod(b, h, q_idx, kv_idx):
            qp = q_idx + off
            seen = (kv_idx <= qp) & kv_ok[b, kv_idx] & (sid[b, qp] == sid[b, kv_idx])
            return seen | (kv_idx == qp)
    per_batch = key_valid is not None or sequence_id is not None
    kwargs = {"device": device}
    if device.type == "cuda":
        kwargs["_compile"] = True
    try:
        ctx.block_mask = create_block_mask(mask_mod, batch if per_batch else None, None, ctx.q_len, ctx.k_len,
                                           **kwargs)
    except TypeError:  # a torch without the private _compile flag
        kwargs.pop("_compile", None)
        ctx.block_mask = create_block_mask(mask_mod, batch if per_batch else None, None, ctx.q_len, ctx.k_len,
                                           **kwargs)


def _prepare_varlen(ctx, sequence_id):
    b, s = sequence_id.shape
    starts = torch.ones_like(sequence_id, dtype=torch.bool)
    starts[:, 1:] = sequence_id[:, 1:] != sequence_id[:, :-1]
    idx = starts.flatten().nonzero().squeeze(1)
    cu = torch.cat([idx, idx.new_tensor([b * s])]).to(torch.int32)
    ctx.cu_seqlens = cu
    ctx.max_seqlen = int((cu[1:] - cu[:-1]).max())


# ----------------------------------------------------------------------------------------------------- kernels

def _torch_attend(q, k, v, ctx: AttnContext, dropout_p: float, scale: float) -> torch.Tensor:
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask_for(q.dtype), dropout_p=dropout_p,
                                          is_causal=ctx.is_causal, scale=scale)


_COMPILED_FLEX = None


def _flex_fn(device: torch.device):
    from torch.nn.attention.flex_attention import flex_attention
    global _COMPILED_FLEX
    if device.type != "cuda":
        return flex_attention  # eager (reference) implementation; fine for CPU tests
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


def _flex_attend(q, k, v, ctx: AttnContext, dropout_p: float, scale: float) -> torch.Tensor:
    return _flex_fn(q.device)(q, k, v, score_mod=ctx.score_mod, block_mask=ctx.block_mask, scale=scale,
                              enable_gqa=k.shape[1] != q.shape[1])


def _import_flash():
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    except ImportError as e:
        raise ImportError("attn_config.attn_impl 'flash' needs the flash-attn package: "
                          "pip install 'mpt-forge[flash]', or model.attn_config.attn_impl=triton (the same exact "
                          "attention, ALiBi or not, with this project's Triton kernel: no extra package)") from e
    return flash_attn_func, flash_attn_varlen_func


def _flash_attend(q, k, v, ctx: AttnContext, dropout_p: float, scale: float) -> torch.Tensor:
    flash_attn_func, flash_attn_varlen_func = _import_flash()
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"attn_impl 'flash' runs in fp16/bf16, got {q.dtype}: train with amp_bf16 precision or "
                        "use attn_impl 'torch'")
    b, h, s, d = q.shape
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, S, H, D)
    if ctx.cu_seqlens is not None:
        out = flash_attn_varlen_func(qt.reshape(b * s, h, d), kt.reshape(b * s, -1, d), vt.reshape(b * s, -1, d),
                                     ctx.cu_seqlens, ctx.cu_seqlens, ctx.max_seqlen, ctx.max_seqlen,
                                     dropout_p=dropout_p, softmax_scale=scale, causal=True,
                                     alibi_slopes=ctx.slopes)
        out = out.view(b, s, h, d)
    else:
        out = flash_attn_func(qt, kt, vt, dropout_p=dropout_p, softmax_scale=scale, causal=True,
                              alibi_slopes=ctx.slopes)
    return out.transpose(1, 2)


def _import_triton_kernel():
    try:
        from llmfoundry.kernels import flash_alibi
    except ImportError as e:
        raise ImportError("attn_config.attn_impl 'triton' needs llmfoundry.kernels.flash_alibi (and the triton "
                          f"package, with a CUDA GPU): {e}; use attn_impl 'torch' or 'flex' instead") from e
    return flash_alibi


def _triton_attend(q, k, v, ctx: AttnContext, dropout_p: float, scale: float) -> torch.Tensor:
    return _import_triton_kernel().flash_alibi_attention(q, k, v, ctx.slopes, causal=True, softmax_scale=scale,
                                                         sequence_id=ctx.sequence_id)


KERNELS = {"torch": _torch_attend, "flex": _flex_attend, "flash": _flash_attend, "triton": _triton_attend}


class MPTAttention(nn.Module):
    """Fused-QKV attention. ``Wqkv`` outputs d_model + 2 * kv_n_heads * head_dim features (q, k, v)."""

    def __init__(self, cfg: MPTConfig):
        super().__init__()
        a = cfg.attn_config
        d, self.n_heads, self.kv_n_heads, self.head_dim = cfg.d_model, cfg.n_heads, cfg.kv_n_heads, cfg.head_dim
        kv = self.kv_n_heads * self.head_dim
        self.split = (d, kv, kv)
        self.clip_qkv = a.clip_qkv
        self.softmax_scale = a.softmax_scale if a.softmax_scale is not None else 1 / math.sqrt(self.head_dim)
        self.attn_pdrop = a.attn_pdrop
        self.Wqkv = nn.Linear(d, d + 2 * kv, bias=not cfg.no_bias)
        self.Wqkv._fused = self.split  # init each of q, k, v as its own matrix
        if a.qk_ln:
            self.q_ln = build_norm(cfg.norm_type, d, cfg.norm_eps, bias=not cfg.no_bias)
            self.k_ln = build_norm(cfg.norm_type, kv, cfg.norm_eps, bias=not cfg.no_bias)
        self.out_proj = nn.Linear(d, d, bias=not cfg.no_bias)
        self.out_proj._is_residual = True

    def forward(self, x: torch.Tensor, ctx: AttnContext, cache: Optional[KVCache] = None,
                layer_idx: int = 0) -> torch.Tensor:
        b, s, _ = x.shape
        qkv = self.Wqkv(x)
        if self.clip_qkv:
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        if ctx.impl == "triton" and cache is None and not hasattr(self, "q_ln"):
            # training's path: the kernel reads q, k, v from qkv and writes their gradients into one buffer
            out = _import_triton_kernel().flash_alibi_attention_qkv(
                qkv, self.n_heads, self.kv_n_heads, ctx.slopes, softmax_scale=self.softmax_scale,
                sequence_id=ctx.sequence_id)
            return self.out_proj(out)
        q, k, v = qkv.split(self.split, dim=-1)
        if hasattr(self, "q_ln"):
            q, k = self.q_ln(q).to(v.dtype), self.k_ln(k).to(v.dtype)
        q = q.view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, s, self.kv_n_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, s, self.kv_n_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)
        p = self.attn_pdrop if self.training else 0.0
        out = KERNELS[ctx.impl](q, k, v, ctx, p, self.softmax_scale)
        return self.out_proj(out.transpose(1, 2).reshape(b, s, -1))
