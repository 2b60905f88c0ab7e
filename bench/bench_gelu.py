"""Exact GELU forward and backward timings: our Triton kernels vs torch eager and Inductor, on one GPU.

    PYTHONPATH=$PWD python3 bench/bench_gelu.py [--tokens 32768 --width 8192]

The default shape is MPT-1B's up-projection output at micro-batch 16 x 2048 (one layer). Rows:
- copy: ``y.copy_(x)`` (forward's traffic) and ``x + dy`` (backward's): the memory rate to compare against;
- torch eager: ``F.gelu`` / ``aten.gelu_backward``;
- Inductor: the same, ``torch.compile``'d (what a compiled MPT runs without our kernels);
- ours: ``llmfoundry.kernels.gelu``.
Then the MLP block (up-projection, GELU, down-projection; forward + backward, bf16) compiled with each GELU,
so any fusion Inductor loses around an opaque kernel shows up. Times are medians of triton.testing.do_bench;
GB/s counts the bytes each pass must move (2 tensors forward, 3 backward).
Accuracy: our fp32 results against a float64 reference built from ``math.erfc`` (no cancellation in the
tails), and the share of bf16 outputs that differ from torch eager's.
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from llmfoundry.kernels.gelu import _gelu_bwd_op, gelu


def reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 gelu(x), gelu'(x) and the scale of gelu''s terms |Phi| + |x phi| (they cancel near x = -0.75), via
    erfc (accurate for large negative x, where torch's 0.5 x (1 + erf) cancels)."""
    xd = x.double().cpu()
    cdf = 0.5 * torch.special.erfc(-xd / math.sqrt(2))
    xpdf = xd * torch.exp(-xd * xd / 2) / math.sqrt(2 * math.pi)
    return xd * cdf, cdf + xpdf, cdf.abs() + xpdf.abs()


def accuracy(dev) -> None:
    x = torch.cat([torch.randn(1 << 20, device=dev) * 3, torch.linspace(-12, 12, 1 << 20, device=dev)])
    ref_y, ref_d, scale_d = reference(x)
    dy = torch.ones_like(x)
    passes = (("forward", gelu, F.gelu, ref_y, ref_y.abs()),
              ("backward", lambda t: _gelu_bwd_op(dy, t), lambda t: torch.ops.aten.gelu_backward(dy, t), ref_d,
               scale_d))
    for name, ours, torch_fn, ref, scale in passes:
        errs = [((fn(x).double().cpu() - ref).abs() / scale)[scale > 1e-30].max().item() for fn in (ours, torch_fn)]
        print(f"fp32 {name}: max relative error ours {errs[0]:.2e}, torch {errs[1]:.2e}")
    xb = (torch.randn(1 << 22, device=dev) * 3).bfloat16()
    exact = reference(xb)[0].to(torch.bfloat16).to(dev)
    ours, theirs = gelu(xb), F.gelu(xb)
    print(f"bf16 forward, share of outputs that differ from the correctly rounded value: ours "
          f"{(ours != exact).float().mean().item():.2e}, torch {(theirs != exact).float().mean().item():.2e}; "
          f"ours vs torch where x >= -2: {(ours != theirs)[xb >= -2].float().mean().item():.2e}")


def sweep(tokens: int, width: int, dev) -> None:
    """Our kernels' time (ms) per (elements per program, warps); the module's defaults are restored after."""
    from llmfoundry.kernels import gelu as mod
    x = torch.randn(tokens, width, device=dev, dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    defaults = mod._BLOCK, mod._NUM_WARPS
    print("\n| elements per program | warps | fwd ms | bwd ms |\n|---:|---:|---:|---:|")
    for block in (1024, 2048, 4096, 8192):
        for warps in (4, 8, 16):
            mod._BLOCK, mod._NUM_WARPS = block, warps
            fwd = do_bench(lambda: gelu(x), warmup=20, rep=100)
            bwd = do_bench(lambda: _gelu_bwd_op(dy, x), warmup=20, rep=100)
            print(f"| {block} | {warps} | {fwd:.3f} | {bwd:.3f} |", flush=True)
    mod._BLOCK, mod._NUM_WARPS = defaults


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--width", type=int, default=8192)
    p.add_argument("--d-model", type=int, default=2048)
    p.add_argument("--sweep", action="store_true", help="first time our kernels over block sizes and warps")
    args = p.parse_args()
    dev = torch.device("cuda")
    accuracy(dev)
    if args.sweep:
        sweep(args.tokens, args.width, dev)

    n = args.tokens * args.width
    x = torch.randn(args.tokens, args.width, device=dev, dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    out = torch.empty_like(x)
    inductor_fwd = torch.compile(lambda t: F.gelu(t))
    inductor_bwd = torch.compile(lambda g, t: torch.ops.aten.gelu_backward(g, t))
    rows = [
        ("copy (y.copy_(x))", "fwd", lambda: out.copy_(x)),
        ("copy (x + dy)", "bwd", lambda: torch.add(x, dy, out=out)),
        ("torch eager", "fwd", lambda: F.gelu(x)),
        ("torch eager", "bwd", lambda: torch.ops.aten.gelu_backward(dy, x)),
        ("Inductor (torch.compile)", "fwd", lambda: inductor_fwd(x)),
        ("Inductor (torch.compile)", "bwd", lambda: inductor_bwd(dy, x)),
        ("ours (llmfoundry.kernels.gelu)", "fwd", lambda: gelu(x)),
        ("ours (llmfoundry.kernels.gelu)", "bwd", lambda: _gelu_bwd_op(dy, x)),
    ]
    print(f"\nGELU on ({args.tokens}, {args.width}) bf16, {torch.cuda.get_device_name()}")
    print("| kernel | pass | ms | GB/s |")
    print("|---|---|---:|---:|")
    for name, kind, fn in rows:
        fn()
        ms = do_bench(fn, warmup=50, rep=300)
        moved = n * 2 * (2 if kind == "fwd" else 3)
        print(f"| {name} | {kind} | {ms:.3f} | {moved / ms / 1e6:,.0f} |", flush=True)

    up = torch.randn(args.width, args.d_model, device=dev, dtype=torch.bfloat16, requires_grad=True)
    down = torch.randn(args.d_model, args.width, device=dev, dtype=torch.bfloat16, requires_grad=True)
    h = torch.randn(args.tokens, args.d_model, device=dev, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(args.tokens, args.d_model, device=dev, dtype=torch.bfloat16)
    print(f"\nMLP ({args.tokens} x {args.d_model} -> {args.width} -> {args.d_model}), compiled, forward + backward")
    print("| GELU | ms |")
    print("|---|---:|")
    for name, act in (("Inductor (F.gelu)", F.gelu), ("ours", gelu)):
        mlp = torch.compile(lambda t, a=act: F.linear(a(F.linear(t, up)), down))

        def step():
            mlp(h).backward(g)
        step()
        print(f"| {name} | {do_bench(step, warmup=20, rep=200, grad_to_none=[up, down, h]):.3f} |", flush=True)


if __name__ == "__main__":
    main()
