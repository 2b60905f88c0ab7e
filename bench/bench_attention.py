"""Causal attention forward+backward timings: our Triton ALiBi kernel vs PyTorch's options.

    PYTHONPATH=$PWD python3 bench/bench_attention.py [--batch 8 --heads 16 --seq 2048 --dims 128 64] [--sweep]

Rows: SDPA flash (causal, no bias: the speed target), SDPA with an additive ALiBi+causal mask (materialized
H x S x S bf16, built outside the timed region), FlexAttention with an ALiBi score_mod and a causal block mask
(torch.compile'd), and llmfoundry's Triton kernel (also with 8 packed documents per row via sequence_id, with
its skipping of negligible far keys turned off, LLMFOUNDRY_ALIBI_SKIP=0: q, k, v are N(0, 1) and the slopes
MPT's). ``--sweep`` first times each kernel over the launch configs in SWEEP at the first head dim.
Times are medians of triton.testing.do_bench (ms, host overhead included); the last column sums the GPU kernel
durations of one fwd+bwd from torch.profiler (TFLOP/s counts the causal half, so rows that skip work show more).
The kernel module is loaded from its file, so this needs only torch and triton.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

_PATH = Path(__file__).resolve().parents[1] / "llmfoundry" / "kernels" / "flash_alibi.py"
_spec = importlib.util.spec_from_file_location("flash_alibi", _PATH)
flash_alibi = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(flash_alibi)


def alibi_slopes(H):
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], dtype=torch.float32)


# rows that run our kernel under a switch (set around the row's whole forward+backward timing)
ROW_ENV = {"ours, far keys not skipped": {"LLMFOUNDRY_ALIBI_SKIP": "0"}}


@contextlib.contextmanager
def environ(values):
    """Set environment variables for the block, then restore the caller's values."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def make_methods(B, H, S, D, dtype, dev, n_docs=8):
    slopes = alibi_slopes(H).to(dev)
    pos = torch.arange(S, device=dev)
    rel = (pos[None, :] - pos[:, None]).float()
    mask = (slopes.view(H, 1, 1) * rel).masked_fill(rel > 0, float("-inf")).to(dtype)[None]  # (1, H, S, S)

    def sdpa_flash(q, k, v):
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def sdpa_mask(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    methods = {"SDPA flash, causal, no ALiBi": sdpa_flash, "SDPA + ALiBi mask": sdpa_mask}
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        block_mask = create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, S, S, device=dev)

        def alibi_mod(score, b, h, qi, ki):
            return score + slopes[h] * (ki - qi)

        flex = torch.compile(flex_attention)
        methods["FlexAttention ALiBi (compiled)"] = lambda q, k, v: flex(q, k, v, score_mod=alibi_mod,
                                                                          block_mask=block_mask)
    except Exception as e:  # noqa: BLE001 - an older torch without flex attention
        print(f"FlexAttention unavailable: {e!r}")

    def ours(q, k, v):
        return flash_alibi.flash_alibi_attention(q, k, v, slopes)

    methods["Triton flash_alibi (ours)"] = ours
    methods["ours, far keys not skipped"] = ours
    docs = (torch.arange(S, device=dev) * n_docs // S).expand(B, S)  # n_docs equal packed documents per row
    methods[f"ours + sequence_id ({n_docs} docs/row)"] = lambda q, k, v: flash_alibi.flash_alibi_attention(
        q, k, v, slopes, sequence_id=docs)
    return methods, mask


def kernel_ms(fn, iters=10):
    """GPU kernel time per call (ms) from torch.profiler: excludes host overhead, which do_bench includes."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    us = sum(getattr(e, "self_device_time_total", 0) for e in prof.key_averages())
    return us / iters / 1e3


def bench_shape(B, H, S, D, dtype, dev):
    gen = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=dtype, generator=gen).requires_grad_() for _ in range(3))
    do = torch.randn(B, H, S, D, device=dev, dtype=dtype, generator=gen)
    methods, mask = make_methods(B, H, S, D, dtype, dev)
    flops_fwd = 4 * B * H * S * S * D / 2  # causal: half the score matrix
    def measure(fn):
        def fwd_bwd():
            out = fn(q, k, v)
            out.backward(do)
        fwd_bwd()  # compile / autotune outside the timing
        torch.cuda.synchronize()
        with torch.no_grad():
            t_fwd = do_bench(lambda: fn(q, k, v), warmup=100, rep=500)
        t_all = do_bench(fwd_bwd, warmup=100, rep=500, grad_to_none=[q, k, v])

        def fresh_fwd_bwd():
            q.grad = k.grad = v.grad = None
            fwd_bwd()
        return t_fwd, t_all, kernel_ms(fresh_fwd_bwd)

    rows = []
    for name, fn in methods.items():
        try:
            with environ(ROW_ENV.get(name, {})):
                rows.append((name, *measure(fn)))
        except Exception as e:  # noqa: BLE001 - keep the table going
            print(f"{name}: failed: {e!r}"[:400])
            rows.append((name, float("nan"), float("nan"), float("nan")))
    with torch.no_grad():  # sanity: our output vs the masked SDPA
        err = (methods["Triton flash_alibi (ours)"](q, k, v).float()
               - F.scaled_dot_product_attention(q, k, v, attn_mask=mask).float()).abs().max().item()
    base = rows[0][2]
    print(f"\nB{B} H{H} S{S} D{D} {str(dtype).replace('torch.', '')}  (max |ours - SDPA+mask| = {err:.2e})")
    print("| method | fwd ms | fwd+bwd ms | fwd+bwd / SDPA flash | fwd+bwd TFLOP/s | fwd+bwd GPU kernels ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, tf, ta, tk in rows:
        print(f"| {name} | {tf:.3f} | {ta:.3f} | {ta / base:.2f}x | {3.5 * flops_fwd / ta / 1e9:.0f} | {tk:.3f} |")
    return rows


# launch configs (BLOCK_M, BLOCK_N, num_warps, num_stages) tried per kernel by --sweep
SWEEP = {
    "fwd": [(64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 4),
            (128, 128, 8, 3), (128, 128, 8, 2), (128, 32, 4, 4), (64, 128, 8, 3)],
    "dkdv": [(32, 64, 4, 4), (32, 64, 4, 3), (32, 32, 4, 4), (64, 64, 4, 4), (64, 64, 4, 3), (32, 128, 4, 3),
             (32, 128, 4, 4), (32, 128, 8, 3), (64, 128, 8, 3), (64, 128, 8, 2), (64, 128, 4, 3), (16, 128, 4, 4),
             (16, 64, 4, 4), (128, 128, 8, 2)],
    "dq": [(128, 64, 8, 3), (128, 64, 8, 4), (128, 64, 4, 3), (64, 64, 4, 3), (64, 64, 4, 4), (128, 32, 4, 3),
           (128, 32, 8, 4), (64, 32, 4, 4), (128, 128, 8, 2), (64, 128, 4, 3)],
}
_KERNEL = {"fwd": "_fwd_kernel", "dkdv": "_bwd_dkdv_kernel", "dq": "_bwd_dq_kernel"}


def kernel_times(fn, iters=5):
    """GPU ms per call of each kernel name in ``fn`` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    return {e.key: getattr(e, "self_device_time_total", 0) / iters / 1e3 for e in prof.key_averages()
            if getattr(e, "self_device_time_total", 0) > 0}


def sweep(B, H, S, D, dtype, dev):
    """Time every config of SWEEP for each kernel (the others autotuned)."""
    gen = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=dtype, generator=gen).requires_grad_() for _ in range(3))
    do = torch.randn(B, H, S, D, device=dev, dtype=dtype, generator=gen)
    slopes = alibi_slopes(H).to(dev)
    orig = flash_alibi._fixed_config

    def fwd_bwd():
        q.grad = k.grad = v.grad = None
        flash_alibi.flash_alibi_attention(q, k, v, slopes).backward(do)

    print(f"\nsweep B{B} H{H} S{S} D{D}: GPU ms per call (kernel alone | whole fwd+bwd)")
    for kind, configs in SWEEP.items():
        for bm, bn, warps, stages in configs:
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
            flash_alibi._fixed_config = lambda kd, sq, d, _c=cfg, _k=kind: dict(_c) if kd == _k else orig(kd, sq, d)
            try:
                fwd_bwd()
                times = kernel_times(fwd_bwd)
                mine = sum(t for name, t in times.items() if _KERNEL[kind] in name)
                print(f"{kind:4s} {bm:3d}x{bn:<3d} w{warps} s{stages}: {mine:7.3f} | {sum(times.values()):7.3f}",
                      flush=True)
            except Exception as e:  # noqa: BLE001 - out of shared memory etc.
                print(f"{kind:4s} {bm:3d}x{bn:<3d} w{warps} s{stages}: failed {type(e).__name__}", flush=True)
            finally:
                flash_alibi._fixed_config = orig


def bench_decode(B, H, Hkv, Sk, D, dtype, dev):
    """One decode step (Sq = 1) against a KV cache of Sk keys: forward only."""
    gen = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(B, H, 1, D, device=dev, dtype=dtype, generator=gen)
    k, v = (torch.randn(B, Hkv, Sk, D, device=dev, dtype=dtype, generator=gen) for _ in range(2))
    slopes = alibi_slopes(H).to(dev)
    mask = (slopes.view(H, 1, 1) * (torch.arange(Sk, device=dev) - (Sk - 1)).float()).to(dtype)[None]
    kr, vr = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    t_sdpa = do_bench(lambda: F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask), warmup=50, rep=200)
    t_ours = do_bench(lambda: flash_alibi.flash_alibi_attention(q, k, v, slopes), warmup=50, rep=200)
    print(f"\ndecode B{B} H{H} Hkv{Hkv} Sq1 Sk{Sk} D{D}: SDPA + ALiBi mask (pre-expanded kv) {t_sdpa * 1e3:.1f} us, "
          f"ours {t_ours * 1e3:.1f} us")


def bench_host_overhead(dev, n=200):
    """Host time per call at a tiny shape, where the GPU work is negligible (Python + launch overhead)."""
    q, k, v = (torch.randn(1, 2, 256, 64, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do, slopes = torch.randn_like(q), alibi_slopes(2).to(dev)

    def fwd_bwd():
        q.grad = k.grad = v.grad = None
        flash_alibi.flash_alibi_attention(q, k, v, slopes).backward(do)
    fwd_bwd()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fwd_bwd()
    torch.cuda.synchronize()
    print(f"\nhost time per fwd+bwd call of ours (B1 H2 S256 D64): {(time.perf_counter() - t0) / n * 1e6:.0f} us")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--dims", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--sweep", action="store_true", help="first time each kernel over the launch configs in SWEEP "
                    "at the first head dim")
    args = ap.parse_args()
    dev = "cuda"
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    if args.sweep:
        sweep(args.batch, args.heads, args.seq, args.dims[0], getattr(torch, args.dtype), dev)
    for D in args.dims:
        bench_shape(args.batch, args.heads, args.seq, D, getattr(torch, args.dtype), dev)
    bench_host_overhead(dev)
    bench_decode(args.batch, args.heads, args.heads // 4, 4096, 128, getattr(torch, args.dtype), dev)
    for kind, tuned in flash_alibi._TUNED.items():
        for key, cfg in getattr(tuned, "cache", {}).items():
            print(f"autotuned {kind} {key}: {cfg}")


if __name__ == "__main__":
    main()
