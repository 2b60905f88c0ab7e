"""Flash attention with an in-kernel ALiBi bias (Triton): forward and backward, causal, GQA, packed documents.

Notation, per batch ``b`` and query head ``h`` (kv head ``h // G``, ``G = H // Hkv``). Query row ``i`` of ``Sq``
sits at absolute position ``i + off`` with ``off = Sk - Sq`` (queries aligned to the END of the keys, as in
KV-cache decoding), so

    s_ij = scale * q_i . k_j + slope_h * (j - i - off)
    visible(i, j) = (not causal or j <= i + off) and (seq[i] == seq[j] when sequence_id is given)
    p_ij = softmax over visible j of s_ij,        o_i = sum_j p_ij v_j

The kernels work in base 2: ``t = s * log2(e)``, so ``exp(s - m) == exp2(t - m2)``. The forward streams key
blocks with an online softmax (running row max ``m`` and sum ``l``; when ``m`` grows the old sums are rescaled
by ``exp2(m_old - m_new)``), and saves ``lse2 = m + log2(l)`` per row, so the backward rebuilds ``p`` exactly as
``exp2(t - lse2)`` with no S x S tensor ever stored. With ``dS = dLoss/ds``:

    delta_i = sum_d do_id * o_id   (= sum_j p_ij dp_ij)          [_bwd_preprocess]
    dp_ij = do_i . v_j,   ds_ij = p_ij * (dp_ij - delta_i)
    dv_j = sum_i p_ij do_i,   dk_j = scale * sum_i ds_ij q_i      [_bwd_dkdv: one key block, loops over queries
                                                                   of every query head of its kv group]
    dq_i = scale * sum_j ds_ij k_j                                [_bwd_dq: one query block, loops over keys]

so no atomics are needed and, for a given launch config, the backward gives the same bits every call (adding dq
inside the dk/dv kernel with fp32 atomics was tried and timed 8% slower on an H200, see BENCHMARKS.md). A row that
sees no key gets ``o = 0`` and ``lse2 = +inf`` (hence ``p = 0`` in the backward): zeros, never NaN. Causal kernels
visit only the key blocks at or left of the diagonal, and only the blocks that straddle it (or the sequence end, or
any block when ``sequence_id`` is given) pay for masking. With
``sequence_id``, each block first scans the ids for the span of positions that can share one of its ids and
loops over that span only, so packed documents cost roughly the sum of their own squares.

The ALiBi term is split per block into ``slope*(start_n - i - off)`` (per row, from exact integers) and
``slope*jj`` (per column offset inside the block), so it stays accurate at long sequence lengths. Only the column
part is added to the scores; the row part is folded into the per-row quantity each score meets anyway (the running
max in the forward, the log-sum-exp in the backward), one add per row instead of one per score.

Negligible keys (causal ALiBi without sequence ids): ALiBi makes a key's score fall linearly with its distance,
so for steep heads most of the causal triangle holds probabilities far below anything fp32 can add to a row's
sum. With ``|s_ij - bias_ij| <= scale * |q_i| * max_j |k_j|`` (Cauchy-Schwarz; ``max_j |k_j|`` per batch row and
kv head from a small pre-pass) and the row max ``m_i`` known after the diagonal blocks, every key further than

    reach_i = (scale2 * |q_i| * max|k| - m2_i + T) / slope2,   T = 24 + log2(Sk)   (log2 units)

from query ``i`` has ``p_ij < 2**-T`` of the row's largest ``p``: all the keys a row skips weigh less than 2**-24 of
its sum together (fp32's own rounding of that sum; the output is bf16). The forward starts its key loop at the
first block any row of its block can still reach; the largest reach of each (batch, head) goes to the backward,
whose passes skip the same far-away blocks. The bound holds for any inputs (large norms only shrink the skipped
region), so results match the full computation to fp32 rounding; the work saved depends on the slopes and the
norms (none for shallow heads, less when one key is much longer than the rest). ``LLMFOUNDRY_ALIBI_SKIP=0`` turns
it off.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["flash_alibi_attention", "flash_alibi_attention_qkv"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_LOG2E = 1.4426950408889634
_SCAN = 16 if _INTERPRET else 1024  # ids read per step when looking for a block's document span


# --------------------------------------------------------------------------------------------------- forward
@triton.jit
def _scores(q, k, kn, q_abs, col_bias, q_seq, seq_k_base, stride_sn, Sk, qk_scale2,
            MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SEQ: tl.constexpr):
    """Scaled (log2-domain) scores of a query block against key block ``kn`` plus the ALiBi term's per-column part
    (``slope2 * (j - start_n)``: the callers fold the per-row part into the row's max / log-sum-exp, which saves
    an add per score), and -inf where a key is out of bounds, in the future, or in another document. Shared by the
    forward and the dq pass, which must see exactly the same scores (dq reuses the forward's log-sum-exp)."""
    t = tl.dot(q, tl.trans(k)) * qk_scale2
    if HAS_ALIBI:
        t += col_bias[None, :]
    if MASKED:
        visible = kn[None, :] < Sk
        if CAUSAL:
            visible = visible & (kn[None, :] <= q_abs[:, None])
        if HAS_SEQ:
            k_seq = tl.load(seq_k_base + kn * stride_sn, mask=kn < Sk, other=-2)
            visible = visible & (q_seq[:, None] == k_seq[None, :])
        t = tl.where(visible, t, float("-inf"))
    return t


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, seq_k_base, stride_sn,
               offs_m, q_seq, lo, hi, Sk, off, slope2, qk_scale2,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SEQ: tl.constexpr):
    """Online-softmax accumulation over key blocks [lo, hi); MASKED blocks check bounds/causality/documents."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_bias = slope2 * offs_n.to(tl.float32)
    q_abs = offs_m + off
    for start_n in range(lo, hi, BLOCK_N):
        kn = start_n + offs_n
        k_ptrs = k_base + kn[:, None] * stride_kn + offs_d[None, :]
        v_ptrs = v_base + kn[:, None] * stride_vn + offs_d[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=kn[:, None] < Sk, other=0.0)
        else:
            k = tl.load(k_ptrs)
        t = _scores(q, k, kn, q_abs, col_bias, q_seq, seq_k_base, stride_sn, Sk, qk_scale2,
                    MASKED, CAUSAL, HAS_ALIBI, HAS_SEQ)
        row_bias = slope2 * (start_n - q_abs).to(tl.float32)  # the ALiBi term's per-row part (0 without ALiBi)
        m_new = tl.maximum(m_i, tl.max(t, 1) + row_bias)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked so far: keep exp2 finite
        p = tl.exp2(t - (m_use - row_bias)[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptrs, mask=kn[:, None] < Sk, other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _id_bounds(ids, ok, first):
    """min and max of ids over the valid lanes (``first``: any valid id, used for the other lanes)."""
    ids = tl.where(ok, ids, first)
    return tl.min(ids, 0), tl.max(ids, 0)


@triton.jit
def _id_span(seq_base, stride_sn, lo, hi, id_min, id_max, ALIGN: tl.constexpr, SCAN: tl.constexpr):
    """Shrink [lo, hi) to [first, last] (first rounded down to ALIGN) of the positions whose id lies in
    [id_min, id_max]: no other position can hold an id of the block being processed. For packed documents
    (contiguous ids) this is exactly the documents the block touches; any ids stay correct, as blocks inside
    the span are still masked id by id."""
    first = tl.zeros([], tl.int32) + hi
    last = tl.zeros([], tl.int32) + lo - 1
    for start in range(lo, hi, SCAN):
        pos = start + tl.arange(0, SCAN)
        ids = tl.load(seq_base + pos * stride_sn, mask=pos < hi, other=0)
        hit = (ids >= id_min) & (ids <= id_max) & (pos < hi)
        first = tl.minimum(first, tl.min(tl.where(hit, pos, hi), 0))
        last = tl.maximum(last, tl.max(tl.where(hit, pos, lo - 1), 0))
    return (first // ALIGN) * ALIGN, last + 1


@triton.jit
def _key_ranges(m0, Sk, off, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                HAS_SEQ: tl.constexpr):
    """Key range [0, hi) a query block [m0, m0+BLOCK_M) needs, and the prefix [0, full) needing no mask."""
    if CAUSAL:
        hi = tl.minimum(tl.maximum(m0 + BLOCK_M + off, 0), Sk)
        full = tl.minimum(tl.maximum(m0 + off + 1, 0), Sk)
    else:
        hi = Sk
        full = Sk
    full = (full // BLOCK_N) * BLOCK_N
    if HAS_SEQ:
        full = 0
    return full, hi


@triton.jit
def _kmax_kernel(K, Kmax, stride_kb, stride_kh, stride_kn, Hkv, Sk, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """Kmax[b, hk] = max over keys of |k| (fp32; Kmax starts at zeros)."""
    bhk = tl.program_id(1)
    b = (bhk // Hkv).to(tl.int64)
    hk = (bhk % Hkv).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=offs_n[:, None] < Sk, other=0.0).to(tl.float32)
    tl.atomic_max(Kmax + bhk, tl.sqrt(tl.max(tl.sum(k * k, 1), 0)))


@triton.jit
def _reach(q, m_i, q_abs, row_ok, kmax, slope2, qk_scale2, negligible2):
    """Per query row, the key distance beyond which every score is below 2**-negligible2 of the row max ``m_i``
    (a lower bound of the final max), clamped to the row's position; 0 for rows out of range. NaN or an
    unbounded reach (no visible key yet, zero slope) gives the whole row."""
    qf = q.to(tl.float32)
    reach = (qk_scale2 * tl.sqrt(tl.sum(qf * qf, 1)) * kmax - m_i + negligible2) / slope2
    whole = q_abs.to(tl.float32)
    reach = tl.where(reach < whole, reach, whole)
    return tl.where(row_ok, reach.to(tl.int32) + 1, 0)


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, Slopes, SeqId, Kmax, Win,
                stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om, stride_sb, stride_sn,
                H, G, Sq, Sk, qk_scale2, negligible2, Q_BUCKET, K_BUCKET,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                HAS_ALIBI: tl.constexpr, HAS_SEQ: tl.constexpr, SCAN: tl.constexpr, SKIP: tl.constexpr):
    pid_m = tl.program_id(0)
    if CAUSAL:  # the last query blocks see the most keys: start them first
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = (h // G).to(tl.int64)
    off = Sk - Sq
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Sq

    q = tl.load(Q + b * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(Slopes + h) * 1.4426950408889634
    seq_base = SeqId + b * stride_sb
    q_seq = offs_m
    if HAS_SEQ:
        q_seq = tl.load(seq_base + offs_m * stride_sn, mask=row_ok, other=-1)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    full, hi = _key_ranges(m0, Sk, off, BLOCK_M, BLOCK_N, CAUSAL, HAS_SEQ)
    mid = full  # masked blocks: [mid, hi)
    if HAS_SEQ:
        q_min, q_max = _id_bounds(q_seq, row_ok, tl.load(seq_base + m0 * stride_sn))
        mid, hi = _id_span(seq_base, stride_sn, 0, hi, q_min, q_max, BLOCK_N, SCAN)
    # the masked (diagonal) blocks first: then each row's running max bounds which far keys are negligible
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, seq_base, stride_sn,
                               offs_m, q_seq, mid, hi, Sk, off, slope2, qk_scale2,
                               BLOCK_N, HEAD_DIM, True, CAUSAL, HAS_ALIBI, HAS_SEQ)
    lo = 0
    if SKIP:
        q_abs = offs_m + off
        reach = _reach(q, m_i, q_abs, row_ok, tl.load(Kmax + b * (H // G) + hk), slope2, qk_scale2, negligible2)
        first = tl.min(tl.where(row_ok, q_abs - reach, Sk), 0)  # the first key any row can still reach
        lo = tl.minimum((tl.maximum(first, 0) // BLOCK_N) * BLOCK_N, full)
        tl.atomic_max(Win + bh, tl.max(reach, 0))
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, seq_base, stride_sn,
                               offs_m, q_seq, lo, full, Sk, off, slope2, qk_scale2,
                               BLOCK_N, HEAD_DIM, False, CAUSAL, HAS_ALIBI, HAS_SEQ)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse2 = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    o_ptrs = O + b * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * Sq + offs_m, lse2, mask=row_ok)


# -------------------------------------------------------------------------------------------------- backward
@triton.jit
def _bwd_preprocess(O, DO, Delta, stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom,
                    H, Sq, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta_i = sum_d o_id * do_id (fp32)."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = offs_m[:, None] < Sq
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :], mask=mask,
                other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :],
                 mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + bh.to(tl.int64) * Sq + offs_m, delta, mask=offs_m < Sq)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, stride_qm, stride_dom, lse_base, delta_base, seq_base, stride_sn,
                n0, offs_n, k_seq, lo, hi, Sq, off, slope2, qk_scale2,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SEQ: tl.constexpr):
    """Accumulate dk, dv of one key block over query blocks [lo, hi), working on transposed scores (keys x queries)."""
    offs_d = tl.arange(0, HEAD_DIM)
    col_bias = slope2 * (offs_n - n0).to(tl.float32)  # per key offset inside the block
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < Sq
        qT = tl.load(q_base + offs_m[None, :] * stride_qm + offs_d[:, None], mask=row_ok[None, :], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse2 = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        tT = tl.dot(k, qT) * qk_scale2
        if HAS_ALIBI:  # the per-query part of the ALiBi term goes into the log-sum-exp it is compared with
            tT += col_bias[:, None]
            lse2 -= slope2 * (n0 - offs_m - off).to(tl.float32)
        if MASKED:
            visible = offs_n[:, None] >= 0
            if CAUSAL:
                visible = visible & (offs_n[:, None] <= (offs_m + off)[None, :])
            if HAS_SEQ:
                q_seq = tl.load(seq_base + offs_m * stride_sn, mask=row_ok, other=-1)
                visible = visible & (k_seq[:, None] == q_seq[None, :])
            tT = tl.where(visible, tT, float("-inf"))
        pT = tl.exp2(tT - lse2[None, :])
        dv += tl.dot(pT.to(do.dtype), do)
        dpT = tl.dot(v, tl.trans(do))
        dsT = (pT * (dpT - delta[None, :])).to(qT.dtype)
        dk += tl.dot(dsT, tl.trans(qT))
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, Delta, Slopes, SeqId, Win,
                     stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                     stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                     stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn, stride_sb, stride_sn,
                     H, Hkv, G, Sq, Sk, qk_scale2, sm_scale, Q_BUCKET, K_BUCKET,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                     HAS_ALIBI: tl.constexpr, HAS_SEQ: tl.constexpr, SCAN: tl.constexpr, SKIP: tl.constexpr):
    n0 = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1)
    b = (bhk // Hkv).to(tl.int64)
    hk = bhk % Hkv
    off = Sk - Sq
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < Sk
    k = tl.load(K + b * stride_kb + hk.to(tl.int64) * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)
    v = tl.load(V + b * stride_vb + hk.to(tl.int64) * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)
    seq_base = SeqId + b * stride_sb
    k_seq = offs_n
    if HAS_SEQ:
        k_seq = tl.load(seq_base + offs_n * stride_sn, mask=col_ok, other=-2)

    # query blocks [lo, mid) straddle the diagonal or need id checks (masked); [full, hi) see the whole key block
    if CAUSAL:
        lo = (tl.maximum(n0 - off, 0) // BLOCK_M) * BLOCK_M
        full = tl.maximum(((tl.maximum(n0 + BLOCK_N - 1 - off, 0) + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, lo)
    else:
        lo = 0
        full = 0
    hi = Sq
    if HAS_SEQ:
        k_min, k_max = _id_bounds(k_seq, col_ok, tl.load(seq_base + n0 * stride_sn))
        lo, hi = _id_span(seq_base, stride_sn, lo, Sq, k_min, k_max, BLOCK_M, SCAN)
        full = hi
    mid = tl.minimum(full, hi)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for g in range(0, G):  # every query head sharing this kv head
        h = hk * G + g
        bh = b * H + h
        q_base = Q + b * stride_qb + h.to(tl.int64) * stride_qh
        do_base = DO + b * stride_dob + h.to(tl.int64) * stride_doh
        slope2 = 0.0
        if HAS_ALIBI:
            slope2 = tl.load(Slopes + h) * 1.4426950408889634
        hi_h = hi
        if SKIP:  # queries further than the head's reach from every key of this block see it as negligible
            hi_h = tl.minimum(hi, n0 + BLOCK_N + tl.load(Win + bh) - off)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, stride_qm, stride_dom, LSE + bh * Sq, Delta + bh * Sq,
                             seq_base, stride_sn, n0, offs_n, k_seq, lo, mid, Sq, off, slope2, qk_scale2,
                             BLOCK_M, BLOCK_N, HEAD_DIM, True, CAUSAL, HAS_ALIBI, HAS_SEQ)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, stride_qm, stride_dom, LSE + bh * Sq, Delta + bh * Sq,
                             seq_base, stride_sn, n0, offs_n, k_seq, full, hi_h, Sq, off, slope2, qk_scale2,
                             BLOCK_M, BLOCK_N, HEAD_DIM, False, CAUSAL, HAS_ALIBI, HAS_SEQ)
    dk *= sm_scale
    tl.store(DK + b * stride_dkb + hk.to(tl.int64) * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + b * stride_dvb + hk.to(tl.int64) * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, seq_k_base, stride_sn,
              offs_m, q_seq, lo, hi, Sk, off, slope2, qk_scale2,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SEQ: tl.constexpr):
    """Accumulate dq of one query block over key blocks [lo, hi)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_bias = slope2 * offs_n.to(tl.float32)
    q_abs = offs_m + off
    for start_n in range(lo, hi, BLOCK_N):
        kn = start_n + offs_n
        k_ptrs = k_base + kn[:, None] * stride_kn + offs_d[None, :]
        v_ptrs = v_base + kn[:, None] * stride_vn + offs_d[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=kn[:, None] < Sk, other=0.0)
            v = tl.load(v_ptrs, mask=kn[:, None] < Sk, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        t = _scores(q, k, kn, q_abs, col_bias, q_seq, seq_k_base, stride_sn, Sk, qk_scale2,
                    MASKED, CAUSAL, HAS_ALIBI, HAS_SEQ)
        p = tl.exp2(t - (lse2 - slope2 * (start_n - q_abs).to(tl.float32))[:, None])
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, Delta, Slopes, SeqId, Win,
                   stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                   stride_dqb, stride_dqh, stride_dqm, stride_sb, stride_sn,
                   H, G, Sq, Sk, qk_scale2, sm_scale, Q_BUCKET, K_BUCKET,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                   HAS_ALIBI: tl.constexpr, HAS_SEQ: tl.constexpr, SCAN: tl.constexpr, SKIP: tl.constexpr):
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = (h // G).to(tl.int64)
    off = Sk - Sq
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Sq
    q = tl.load(Q + b * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h.to(tl.int64) * stride_doh + offs_m[:, None] * stride_dom
                 + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(LSE + bh.to(tl.int64) * Sq + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + bh.to(tl.int64) * Sq + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(Slopes + h) * 1.4426950408889634
    seq_base = SeqId + b * stride_sb
    q_seq = offs_m
    if HAS_SEQ:
        q_seq = tl.load(seq_base + offs_m * stride_sn, mask=row_ok, other=-1)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    full, hi = _key_ranges(m0, Sk, off, BLOCK_M, BLOCK_N, CAUSAL, HAS_SEQ)
    mid = full  # masked blocks: [mid, hi)
    if HAS_SEQ:
        q_min, q_max = _id_bounds(q_seq, row_ok, tl.load(seq_base + m0 * stride_sn))
        mid, hi = _id_span(seq_base, stride_sn, 0, hi, q_min, q_max, BLOCK_N, SCAN)
    lo = 0
    if SKIP:  # keys further than the head's reach from every row of this block are negligible
        lo = tl.minimum((tl.maximum(m0 + off - tl.load(Win + bh), 0) // BLOCK_N) * BLOCK_N, full)
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, seq_base, stride_sn,
                   offs_m, q_seq, lo, full, Sk, off, slope2, qk_scale2, BLOCK_N, HEAD_DIM, False,
                   CAUSAL, HAS_ALIBI, HAS_SEQ)
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, seq_base, stride_sn,
                   offs_m, q_seq, mid, hi, Sk, off, slope2, qk_scale2, BLOCK_N, HEAD_DIM, True,
                   CAUSAL, HAS_ALIBI, HAS_SEQ)
    dq *= sm_scale
    tl.store(DQ + b * stride_dqb + h.to(tl.int64) * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ------------------------------------------------------------------------------------------- launch configs
def _cfg(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


_TUNE_KEY = ["Q_BUCKET", "K_BUCKET", "HEAD_DIM", "CAUSAL", "HAS_SEQ", "SKIP"]
_FWD_CONFIGS = [_cfg(64, 64, 4, 3), _cfg(64, 64, 4, 4), _cfg(64, 128, 4, 3), _cfg(128, 64, 4, 3),
                _cfg(128, 64, 8, 3), _cfg(128, 128, 8, 3), _cfg(128, 32, 4, 4)]
_DKDV_CONFIGS = [_cfg(32, 64, 4, 4), _cfg(32, 64, 4, 3), _cfg(32, 32, 4, 4), _cfg(64, 64, 4, 4),
                 _cfg(32, 128, 4, 3), _cfg(64, 128, 8, 3), _cfg(16, 128, 4, 4)]
_DQ_CONFIGS = [_cfg(128, 64, 8, 3), _cfg(128, 64, 8, 4), _cfg(64, 64, 4, 3), _cfg(64, 64, 4, 4),
               _cfg(128, 32, 4, 3), _cfg(64, 32, 4, 4)]

_TUNED = {}  # kind -> autotuned kernel, built on first GPU use (triton.autotune needs an active driver)


def _tuned(kind):
    if kind not in _TUNED:
        kernel, configs = {"fwd": (_fwd_kernel, _FWD_CONFIGS), "dkdv": (_bwd_dkdv_kernel, _DKDV_CONFIGS),
                           "dq": (_bwd_dq_kernel, _DQ_CONFIGS)}[kind]
        _TUNED[kind] = triton.autotune(configs, key=_TUNE_KEY)(kernel)
    return _TUNED[kind]


def _fixed_config(kind: str, Sq: int, D: int):
    """The launch config when not autotuning, or None to autotune.

    Fixed configs: small unequal blocks under the interpreter (so block edges get exercised), 16-row query blocks
    for KV-cache decode (Sq <= 16), small tiles for D > 128, and a default per head dim when
    LLMFOUNDRY_FLASH_ALIBI_AUTOTUNE=0.
    """
    if _INTERPRET:
        return {"fwd": dict(BLOCK_M=32, BLOCK_N=16), "dq": dict(BLOCK_M=32, BLOCK_N=16),
                "dkdv": dict(BLOCK_M=16, BLOCK_N=32)}[kind]
    if Sq <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=3)
    if D > 128:  # the tuned configs target D <= 128; keep big heads to small tiles
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    if os.environ.get("LLMFOUNDRY_FLASH_ALIBI_AUTOTUNE", "1") != "0":
        return None
    return {"fwd": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8 if D > 64 else 4, num_stages=3),
            "dkdv": dict(BLOCK_M=32, BLOCK_N=128, num_warps=4, num_stages=3),
            "dq": dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=3)}[kind]


_BEST = {}  # (kind, autotune key) -> launch kwargs the autotuner picked


def _launch(kind, plain, grid_of, Sq, *args, **kw):
    """Launch ``plain`` with a fixed config, or autotune once per key and then launch ``plain`` directly with the
    winner (the autotuner's own dispatch costs tens of microseconds of host time per call)."""
    cfg = _fixed_config(kind, Sq, kw["HEAD_DIM"])
    if cfg is None:
        key = (kind, args[-2], args[-1], args[0].dtype, args[0].device, tuple(sorted(kw.items())))
        cfg = _BEST.get(key)
        if cfg is None:
            tuned = _tuned(kind)
            tuned[lambda meta: grid_of(meta["BLOCK_M"], meta["BLOCK_N"])](*args, **kw)
            _BEST[key] = tuned.best_config.all_kwargs()
            return
    plain[grid_of(cfg["BLOCK_M"], cfg["BLOCK_N"])](*args, **kw, **cfg)


# ------------------------------------------------------------------------------------------------ wrappers
def _flags(slopes, seq_id, q):
    """Pointers for the optional inputs (q stands in for a missing one: never read then) and the id strides."""
    return (slopes if slopes is not None else q, seq_id if seq_id is not None else q,
            seq_id.stride() if seq_id is not None else (0, 0))


def _skips(causal, slopes, seq_id) -> bool:
    """Whether the kernels skip negligible far-away keys (causal ALiBi without sequence ids; see the module
    docstring). The backward reads the forward's reach per head, which is the whole sequence when it did not."""
    return causal and slopes is not None and seq_id is None


def _forward(q, k, v, slopes, causal, scale, seq_id):
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    o = torch.empty((B, Sq, H, D), device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty((B, H, Sq), device=q.device, dtype=torch.float32)
    skippable = _skips(causal, slopes, seq_id)
    skip = skippable and os.environ.get("LLMFOUNDRY_ALIBI_SKIP", "1") != "0"
    # per-head reach, read by the backward whenever skippable: grown by the forward, or the whole row when the
    # switch is off; never read otherwise (no fill kernel then)
    if skip:
        win = torch.zeros((B, H), device=q.device, dtype=torch.int32)
    elif skippable:
        win = torch.full((B, H), Sk + 1, device=q.device, dtype=torch.int32)
    else:
        win = torch.empty((B, H), device=q.device, dtype=torch.int32)
    kmax = lse  # any pointer when not skipping (never read)
    if skip:
        kmax = torch.zeros((B, Hkv), device=q.device, dtype=torch.float32)
        _kmax_kernel[(triton.cdiv(Sk, 64), B * Hkv)](k, kmax, k.stride(0), k.stride(1), k.stride(2), Hkv, Sk,
                                                     HEAD_DIM=D, BLOCK=64)
    s_ptr, seq_ptr, (ssb, ssn) = _flags(slopes, seq_id, q)
    _launch("fwd", _fwd_kernel, lambda bm, bn: (triton.cdiv(Sq, bm), B * H), Sq,
            q, k, v, o, lse, s_ptr, seq_ptr, kmax, win,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2), ssb, ssn,
            H, H // Hkv, Sq, Sk, scale * _LOG2E, 24.0 + math.log2(max(Sk, 1)),
            triton.next_power_of_2(Sq), triton.next_power_of_2(Sk),
            HEAD_DIM=D, CAUSAL=causal, HAS_ALIBI=slopes is not None, HAS_SEQ=seq_id is not None, SCAN=_SCAN,
            SKIP=skip)
    return o, lse, win


def _backward(do, q, k, v, o, lse, win, slopes, causal, scale, seq_id, grads=None):
    """dq, dk, dv (written into ``grads`` when given: views of one packed buffer, see ``_qkv_bwd_op``); ``win``:
    the forward's per-head reach."""
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    if do.stride(-1) != 1:
        do = do.contiguous()
    delta = torch.empty_like(lse)
    pre_bm = 64
    _bwd_preprocess[(triton.cdiv(Sq, pre_bm), B * H)](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
        H, Sq, HEAD_DIM=D, BLOCK_M=pre_bm)
    dq, dk, dv = grads if grads is not None else (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
    s_ptr, seq_ptr, (ssb, ssn) = _flags(slopes, seq_id, q)
    flags = dict(HEAD_DIM=D, CAUSAL=causal, HAS_ALIBI=slopes is not None, HAS_SEQ=seq_id is not None, SCAN=_SCAN,
                 SKIP=_skips(causal, slopes, seq_id))
    buckets = (triton.next_power_of_2(Sq), triton.next_power_of_2(Sk))
    _launch("dkdv", _bwd_dkdv_kernel, lambda bm, bn: (triton.cdiv(Sk, bn), B * Hkv), Sq,
            q, k, v, do, dk, dv, lse, delta, s_ptr, seq_ptr, win,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2), ssb, ssn,
            H, Hkv, H // Hkv, Sq, Sk, scale * _LOG2E, scale, *buckets, **flags)
    _launch("dq", _bwd_dq_kernel, lambda bm, bn: (triton.cdiv(Sq, bm), B * H), Sq,
            q, k, v, do, dq, lse, delta, s_ptr, seq_ptr, win,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2), ssb, ssn,
            H, H // Hkv, Sq, Sk, scale * _LOG2E, scale, *buckets, **flags)
    return dq, dk, dv


# Registered as torch custom ops (with autograd) so that torch.compile treats the kernels as opaque calls inside
# a compiled block instead of breaking the graph around them (or tracing into the launch code).
@torch.library.custom_op("llmfoundry::flash_alibi_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: Optional[torch.Tensor], causal: bool,
            scale: float, seq_id: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, slopes, causal, scale, seq_id)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, slopes, causal, scale, seq_id):
    B, H, Sq, D = q.shape
    return (q.new_empty((B, Sq, H, D)).transpose(1, 2), q.new_empty((B, H, Sq), dtype=torch.float32),
            q.new_empty((B, H), dtype=torch.int32))


@torch.library.custom_op("llmfoundry::flash_alibi_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
            lse: torch.Tensor, win: torch.Tensor, slopes: Optional[torch.Tensor], causal: bool, scale: float,
            seq_id: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(do, q, k, v, o, lse, win, slopes, causal, scale, seq_id)


@_bwd_op.register_fake
def _bwd_fake(do, q, k, v, o, lse, win, slopes, causal, scale, seq_id):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _save_for_backward(ctx, inputs, output):
    q, k, v, slopes, causal, scale, seq_id = inputs
    o, lse, win = output
    ctx.mark_non_differentiable(lse, win)
    ctx.save_for_backward(q, k, v, o, lse, win, slopes, seq_id)
    ctx.causal, ctx.scale = causal, scale


def _fwd_backward(ctx, do, _dlse, _dwin):
    q, k, v, o, lse, win, slopes, seq_id = ctx.saved_tensors
    dq, dk, dv = _bwd_op(do, q, k, v, o, lse, win, slopes, ctx.causal, ctx.scale, seq_id)
    return dq, dk, dv, None, None, None, None


_fwd_op.register_autograd(_fwd_backward, setup_context=_save_for_backward)


# The same kernels on the packed (B, S, (H + 2 Hkv) * D) output of a fused QKV projection: q, k, v are strided
# views of it, and the backward writes dq, dk, dv into views of ONE buffer of that shape, so autograd needs no
# concatenation of the three gradients (a full extra pass over the projection's output per layer).
def _split_qkv(qkv: torch.Tensor, n_heads: int, kv_heads: int):
    B, S, F = qkv.shape
    t = qkv.view(B, S, n_heads + 2 * kv_heads, F // (n_heads + 2 * kv_heads))
    return tuple(x.transpose(1, 2) for x in t.split([n_heads, kv_heads, kv_heads], dim=2))


@torch.library.custom_op("llmfoundry::flash_alibi_qkv_fwd", mutates_args=())
def _qkv_fwd_op(qkv: torch.Tensor, n_heads: int, kv_heads: int, slopes: Optional[torch.Tensor], causal: bool,
                scale: float, seq_id: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(*_split_qkv(qkv, n_heads, kv_heads), slopes, causal, scale, seq_id)


@_qkv_fwd_op.register_fake
def _qkv_fwd_fake(qkv, n_heads, kv_heads, slopes, causal, scale, seq_id):
    return _fwd_fake(*_split_qkv(qkv, n_heads, kv_heads), slopes, causal, scale, seq_id)


@torch.library.custom_op("llmfoundry::flash_alibi_qkv_bwd", mutates_args=())
def _qkv_bwd_op(do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, win: torch.Tensor,
                n_heads: int, kv_heads: int, slopes: Optional[torch.Tensor], causal: bool, scale: float,
                seq_id: Optional[torch.Tensor]) -> torch.Tensor:
    dqkv = torch.empty_like(qkv)
    _backward(do, *_split_qkv(qkv, n_heads, kv_heads), o, lse, win, slopes, causal, scale, seq_id,
              grads=_split_qkv(dqkv, n_heads, kv_heads))
    return dqkv


@_qkv_bwd_op.register_fake
def _qkv_bwd_fake(do, qkv, o, lse, win, n_heads, kv_heads, slopes, causal, scale, seq_id):
    return torch.empty_like(qkv)


def _qkv_save_for_backward(ctx, inputs, output):
    qkv, n_heads, kv_heads, slopes, causal, scale, seq_id = inputs
    o, lse, win = output
    ctx.mark_non_differentiable(lse, win)
    ctx.save_for_backward(qkv, o, lse, win, slopes, seq_id)
    ctx.heads, ctx.causal, ctx.scale = (n_heads, kv_heads), causal, scale


def _qkv_fwd_backward(ctx, do, _dlse, _dwin):
    qkv, o, lse, win, slopes, seq_id = ctx.saved_tensors
    dqkv = _qkv_bwd_op(do, qkv, o, lse, win, *ctx.heads, slopes, ctx.causal, ctx.scale, seq_id)
    return dqkv, None, None, None, None, None, None


_qkv_fwd_op.register_autograd(_qkv_fwd_backward, setup_context=_qkv_save_for_backward)


def _checked(q, k, v, alibi_slopes, softmax_scale, sequence_id):
    """Validate shapes/dtypes; returns (slopes fp32 or None, sequence ids or None, scale)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be 4-D (B, H, S, D)")
    B, H, Sq, D = q.shape
    Bk, Hkv, Sk, Dk = k.shape
    if v.shape != k.shape or Bk != B or Dk != D:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if H % Hkv != 0:
        raise ValueError(f"number of query heads {H} is not a multiple of kv heads {Hkv}")
    if D < 16 or D > 256 or D & (D - 1):
        raise ValueError(f"head dim {D} must be a power of two in [16, 256]")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q, k, v must share one dtype of fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.to(device=q.device, dtype=torch.float32).contiguous()
        if alibi_slopes.shape != (H,):
            raise ValueError(f"alibi_slopes must have shape ({H},), got {tuple(alibi_slopes.shape)}")
    if sequence_id is not None:
        if Sq != Sk or tuple(sequence_id.shape) != (B, Sq):
            raise ValueError(f"sequence_id must be (B, S) = ({B}, {Sq}) with Sq == Sk, got "
                             f"{tuple(sequence_id.shape)} (Sq={Sq}, Sk={Sk})")
        sequence_id = sequence_id.to(device=q.device)
        if sequence_id.dtype not in (torch.int32, torch.int64):
            sequence_id = sequence_id.to(torch.int32)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(D)
    return alibi_slopes, sequence_id, scale


def flash_alibi_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          alibi_slopes: torch.Tensor | None = None, *, causal: bool = True,
                          softmax_scale: float | None = None,
                          sequence_id: torch.Tensor | None = None) -> torch.Tensor:
    """Fused attention ``softmax(scale * q k^T + slope_h * (k_pos - q_pos) + mask) v`` (differentiable).

    q: ``(B, H, Sq, D)``; k, v: ``(B, Hkv, Sk, D)`` with ``H % Hkv == 0`` (grouped-query heads); queries are the
    LAST ``Sq`` positions of the keys (KV-cache decode: ``Sq < Sk``; with ``Sq > Sk`` the first rows see no key).
    ``alibi_slopes``: ``(H,)`` (fp32), None for no bias. ``sequence_id``: int ``(B, S)`` with ``Sq == Sk == S``;
    a query only attends keys of the same id (packed documents). ``D`` must be a power of two in [16, 256];
    fp16/bf16 (fp32 accepted, mostly for tests). A query row with no visible key returns zeros. Returns
    ``(B, H, Sq, D)`` in q's dtype (a view of a ``(B, Sq, H, D)`` buffer, so ``.transpose(1, 2)`` to the
    ``(B, S, H*D)`` layout of an attention layer is free).
    """
    slopes, seq_id, scale = _checked(q, k, v, alibi_slopes, softmax_scale, sequence_id)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return _fwd_op(q, k, v, slopes, bool(causal), scale, seq_id)[0]


def flash_alibi_attention_qkv(qkv: torch.Tensor, n_heads: int, kv_n_heads: int,
                              alibi_slopes: torch.Tensor | None = None, *, causal: bool = True,
                              softmax_scale: float | None = None,
                              sequence_id: torch.Tensor | None = None) -> torch.Tensor:
    """``flash_alibi_attention`` on a fused projection's output ``qkv`` ``(B, S, (n_heads + 2 kv_n_heads) * D)``
    (q heads, then k heads, then v heads, each ``D`` wide); returns ``(B, S, n_heads * D)``. Same result as
    splitting ``qkv`` into q, k, v and calling ``flash_alibi_attention``, but the backward writes one packed
    gradient for ``qkv`` instead of three that autograd would concatenate."""
    if qkv.dim() != 3 or qkv.shape[-1] % (n_heads + 2 * kv_n_heads):
        raise ValueError(f"qkv must be (B, S, (n_heads + 2 * kv_n_heads) * head_dim), got {tuple(qkv.shape)} "
                         f"for n_heads={n_heads}, kv_n_heads={kv_n_heads}")
    qkv = qkv.contiguous()
    slopes, seq_id, scale = _checked(*_split_qkv(qkv, n_heads, kv_n_heads), alibi_slopes, softmax_scale,
                                     sequence_id)
    out = _qkv_fwd_op(qkv, n_heads, kv_n_heads, slopes, bool(causal), scale, seq_id)[0]
    return out.transpose(1, 2).reshape(qkv.shape[0], qkv.shape[1], -1)
