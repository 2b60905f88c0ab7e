"""Where a training step's time goes: our MPT in a bare loop (no trainer), timed by part and profiled by kernel.

Complements bench_train.py (which times the real entry): the difference between the two is the trainer's share.
Parts timed with CUDA events, each the median over ``--steps`` steps after warm-up: forward+backward of one
micro-batch (bf16 autocast, fp32 weights, as composer's amp_bf16), gradient-norm clipping, the LION step. Then
the CUDA kernels of two steps are listed by total time, and grouped (``llmfoundry.train.callbacks.profiler.kernel_group``).
The trainer's own step is profiled by ``callbacks.profiler`` (in bench_train.py: ``--variant "prof:
callbacks.profiler.start_batch=5"``).

    PYTHONPATH=$PWD python3 bench/profile_step.py --yaml yamls/mpt-1b.yaml --mb 8 [--compile blocks|whole] \
        [--attn flex] [--fsdp] [--set key=value ...]

``--fsdp`` wraps each block and the root with FSDP2 (one rank, bf16 params and gradient reduction: the 3B+
recipes' ``mixed_precision: PURE``; the <=1B recipes' fp32 reduction once per optimizer step is timed through the
trainer by bench_train.py), and ``--compile whole`` compiles the wrapped model as composer's ``compile_config`` does,
so that ``--fsdp --compile whole`` is the trainer's step without the trainer.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--yaml", default=str(REPO / "yamls/mpt-1b.yaml"))
    p.add_argument("--attn", default="triton")
    p.add_argument("--mb", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--compile", choices=["none", "blocks", "whole"], default="none",
                   help="torch.compile each block, or the whole (FSDP-wrapped) model")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 per block + root on one rank, bf16 params")
    p.add_argument("--set", action="append", default=[], help="config override, e.g. model.n_layers=4")
    p.add_argument("--peak_tflops", type=float, default=989.0)
    p.add_argument("--top", type=int, default=40)
    args = p.parse_args(argv)

    from llmfoundry.models.mpt import MPTForCausalLM
    from llmfoundry.train.config import load_config
    from llmfoundry.train.lion import Lion
    from llmfoundry.train.callbacks.profiler import kernel_group
    cfg = load_config(args.yaml, ["tokenizer=bundled", f"model.attn_config.attn_impl={args.attn}",
                                  "model.init_device=cuda", *args.set]).model
    torch.manual_seed(0)
    model = MPTForCausalLM(cfg).cuda().train()
    n_params = model.num_params()
    if args.fsdp:
        import torch.distributed as dist
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        if not dist.is_initialized():
            dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29511", world_size=1, rank=0)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
        for block in model.transformer.blocks:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    if args.compile == "blocks":
        for block in model.transformer.blocks:
            block.compile()
    elif args.compile == "whole":
        model = torch.compile(model)
    opt = Lion(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    x = torch.randint(1, cfg.vocab_size, (args.mb, args.seq), device="cuda")

    def fwd_bwd():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()

    def clip():
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)

    def step():
        opt.step()
        opt.zero_grad(set_to_none=True)

    def timed(fn) -> float:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b)

    for _ in range(3):
        fwd_bwd(), clip(), step()
    times = {"fwd+bwd": [], "clip": [], "lion": []}
    for _ in range(args.steps):
        times["fwd+bwd"].append(timed(fwd_bwd))
        times["clip"].append(timed(clip))
        times["lion"].append(timed(step))
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = args.mb * args.seq
    fpt = cfg.flops_per_token(args.seq)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {Path(args.yaml).name} attn={args.attn} "
          f"mb={args.mb} seq={args.seq} compile={args.compile} fsdp={args.fsdp} {' '.join(args.set)}; "
          f"{n_params / 1e9:.3f}B params")
    for k, v in med.items():
        print(f"  {k:8} {v:8.2f} ms")
    total = sum(med.values())
    print(f"  step     {total:8.2f} ms  -> {tokens / total * 1e3:,.0f} tokens/s, MFU "
          f"{tokens * fpt / (total * 1e-3) / (args.peak_tflops * 1e12):.3f} (fwd+bwd alone: "
          f"{tokens * fpt / (med['fwd+bwd'] * 1e-3) / (args.peak_tflops * 1e12):.3f})")
    print(f"  peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")

    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            fwd_bwd(), clip(), step()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / 2e3, e.count // 2) for e in prof.key_averages()
            if e.device_time_total > 0]
    rows.sort(key=lambda r: -r[1])
    by_group: dict[str, float] = {}
    for name, ms, _ in rows:
        group = kernel_group(name)
        by_group[group] = by_group.get(group, 0.0) + ms
    print("\nGPU time per step by group (ms): " + ", ".join(f"{g} {t:.1f}" for g, t in
                                                         sorted(by_group.items(), key=lambda kv: -kv[1])))
    print(f"\n{'ms/step':>8} {'calls':>6}  kernel")
    for name, ms, n in rows[:args.top]:
        print(f"{ms:8.2f} {n:6d}  {name[:110]}")


if __name__ == "__main__":
    main()
