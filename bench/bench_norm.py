"""Residual add + LayerNorm, forward and backward: our Triton kernels vs torch eager and Inductor, on one GPU.

    PYTHONPATH=$PWD python3 bench/bench_norm.py [--tokens 32768 --width 2048] [--sweep]

The default shape is MPT-1B's residual stream at micro-batch 16 x 2048 (one norm of one block), bf16, as the
recipes run it (``low_precision_layernorm`` under bf16 autocast, no bias). What is timed, per row:
- copy: ``torch.add(x, a, out=r)`` plus ``y.copy_(x)``, the forward's bytes (read x and a, write r and y);
- torch eager: ``r = x + a``, then MPT's LayerNorm module;
- Inductor: the same function under ``torch.compile`` (what a compiled MPT runs with ``LLMFOUNDRY_LAYERNORM=torch``);
- ours: ``llmfoundry.kernels.layer_norm.add_layer_norm``.
The forward is timed alone, the backward as (forward + backward of ``(r * gr).sum() + (y * gy).sum()``: the
gradient of r from the residual path, of y from the branch) minus the forward; each both ways: "timed" by
do_bench (what an eager caller waits, host overhead included: torch custom ops cost tens of microseconds of
Python per call) and "GPU" (kernel time from torch.profiler: what a GPU-bound compiled training step pays). GB/s
counts the bytes each pass must move over the GPU time: 4 row-sized tensors each way (forward reads x, a, writes
r, y; backward reads u, dy, dr, writes du). ``--sweep`` times our kernels alone under other launch configs first.
"""
from __future__ import annotations

import argparse
import itertools

import torch
from triton.testing import do_bench

from llmfoundry.kernels import layer_norm as kernel
from llmfoundry.models.mpt.norm import LayerNorm


def _ms(fn) -> float:
    return do_bench(fn, warmup=100, rep=500)


def _gpu_ms(fn, iters: int = 20) -> float:
    """GPU kernel time of one call (torch.profiler, summed over kernels): host overhead excluded."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    return sum(e.device_time_total for e in prof.key_averages() if e.device_time_total > 0) / iters / 1e3


def sweep(n: int, d: int, dev) -> None:
    x = torch.randn(n, d, device=dev, dtype=torch.bfloat16)
    a, dy, dr = torch.randn_like(x), torch.randn_like(x), torch.randn_like(x)
    w = torch.ones(d, device=dev, dtype=torch.bfloat16)
    fwd = torch.ops.llmfoundry.add_layer_norm
    bwd = torch.ops.llmfoundry.add_layer_norm_backward
    _, _, mean, rstd = fwd(x, a, w, None, 1e-5, torch.bfloat16)
    gb = 4 * n * d * 2 / 1e9
    print(f"sweep at {n} x {d} bf16 (ms, GB/s):")
    for rows, warps in itertools.product((1, 2, 4, 8), (4, 8, 16)):
        kernel.TUNING["fwd"] = dict(ROWS=rows, num_warps=warps)
        t = _ms(lambda: fwd(x, a, w, None, 1e-5, torch.bfloat16))
        print(f"  fwd rows {rows} warps {warps:2d}: {t:.3f} ms {gb / t * 1e3:6.0f} GB/s")
    kernel.TUNING["fwd"] = None
    for rows, warps, per_sm, stages in itertools.product((1, 2, 4), (4, 8), (1, 2, 4), (1, 2, 3)):
        kernel.TUNING["bwd"] = dict(ROWS=rows, num_warps=warps, STAGES=stages)
        kernel.TUNING["programs_per_sm"] = per_sm
        t = _ms(lambda: bwd(dy, dr, x, w, mean, rstd, False))
        print(f"  bwd rows {rows} warps {warps} programs/SM {per_sm} stages {stages}: {t:.3f} ms "
              f"{gb / t * 1e3:6.0f} GB/s")
    kernel.TUNING.update(fwd=None, bwd=None, programs_per_sm=2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--sweep", action="store_true")
    args = p.parse_args()
    dev = torch.device("cuda")
    n, d = args.tokens, args.width
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {n} x {d} bf16, residual add + LayerNorm "
          "(low precision, no bias)")
    if args.sweep:
        sweep(n, d, dev)

    norm = LayerNorm(d, bias=False, low_precision=True).to(dev)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(d, device=dev))

    def unfused(x, a):
        r = x + a
        return r, norm(r)

    def fused(x, a):
        return kernel.add_layer_norm(x, a, norm.weight, None, norm.eps, torch.bfloat16)

    compiled = torch.compile(unfused)
    x = torch.randn(n, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    a = torch.randn_like(x, requires_grad=True)
    gr, gy = torch.randn_like(x), torch.randn_like(x)
    gb = 4 * n * d * 2 / 1e9

    def run(fn, backward: bool):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            r, y = fn(x, a)
        if backward:  # returned, not accumulated into .grad (no copies of the kernel's output)
            return torch.autograd.grad([r, y], [x, a, norm.weight], [gr, gy])

    out = {}
    for name, fn in (("torch eager", unfused), ("Inductor", compiled), ("ours", fused)):
        run(fn, True)  # compile / warm up
        f, fb = _ms(lambda: run(fn, False)), _ms(lambda: run(fn, True))
        gf, gfb = _gpu_ms(lambda: run(fn, False)), _gpu_ms(lambda: run(fn, True))
        out[name] = (f, fb - f, gf, gfb - gf)
    r_buf, y_buf = torch.empty_like(x), torch.empty_like(x)
    copy = _gpu_ms(lambda: (torch.add(x.detach(), a.detach(), out=r_buf), y_buf.copy_(x.detach())))
    print("\nms per call (timed: do_bench, host included; GPU: kernel time) and GB/s of the GPU time")
    print(f"{'':12} {'fwd timed':>9} {'fwd GPU':>8} {'GB/s':>6} {'bwd timed':>9} {'bwd GPU':>8} {'GB/s':>6}")
    print(f"{'copy':12} {'':9} {copy:8.3f} {gb / copy * 1e3:6.0f}")
    for name, (f, b, gf, gb_) in out.items():
        print(f"{name:12} {f:9.3f} {gf:8.3f} {gb / gf * 1e3:6.0f} {b:9.3f} {gb_:8.3f} {gb / gb_ * 1e3:6.0f}")

    # agreement with torch eager (bf16 outputs; gradients of x, a and the weight)
    res = {}
    for name, fn in (("eager", unfused), ("ours", fused)):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            r, y = fn(x, a)
        res[name] = (r.detach(), y.detach(), *torch.autograd.grad([r, y], [x, a, norm.weight], [gr, gy]))
    names = ("r", "y", "dx", "da", "dw")
    diffs = ", ".join(f"{k} {(u.float() - v.float()).abs().max().item():.2e}"
                      for k, u, v in zip(names, res["ours"], res["eager"]))
    same_y = (res["ours"][1] == res["eager"][1]).float().mean().item()
    print(f"\nmax |ours - eager|: {diffs}; y bit-equal in {same_y:.4f} of entries")


if __name__ == "__main__":
    main()
