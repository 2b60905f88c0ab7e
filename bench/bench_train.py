"""Training throughput through the real entry: ``composer scripts/train.py yamls/mpt-*.yaml`` on GPUs.

For each recipe x attn_impl x GPU count, this runs the training script as users do (composer Trainer, LION,
FSDP, the recipe's YAML) on random-token MDS shards written locally (object storage is not needed to time a
step), and reads the throughput the run itself logs. The peer, transformers' ``MptForCausalLM`` with the same
shapes, runs in a bare PyTorch loop (bf16 autocast, fused AdamW) in this process: no trainer overhead at all.

MFU = tokens/s/GPU x FLOPs per token / peak, with FLOPs per token = 6 N + 12 n_layers d_model seq_len
(``MPTConfig.flops_per_token``: N all parameters, attention score and value products counted in full, causal
masking not discounted) and peak = 989 TFLOP/s (H100/H200 SXM dense bf16) unless ``--peak_tflops`` says
otherwise.

    python bench/bench_train.py --models 125m,350m,1b --attn flex,triton --peer --json out.json
    python bench/bench_train.py --models 1b --attn triton --gpus 1,2,4        # scaling
    python bench/bench_train.py --models 1b --attn triton --variant "base:" --variant "compiled: compile_config={}"
    python bench/bench_train.py --models 1b --attn triton --variant "base:" --variant "noskip: env.LLMFOUNDRY_ALIBI_SKIP=0"
    python bench/bench_train.py --suite --accum 4 --steps 8 --peer     # the whole table (see plan_runs)
    python bench/bench_train.py --models 1b --attn triton --variant "prof: callbacks.profiler.start_batch=5"
        # the trainer's steps 5-6 profiled: the row gets callbacks.profiler's summary (GPU busy share, by kind)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WINDOW = 5  # SpeedMonitor's window (batches): the throughput is logged from batch WINDOW + 1 on

# per-GPU micro-batches that fit an H200 (141 GB) with the recipes' settings (1b: 70 GB at 16)
MICRO_BATCH = {"125m": 16, "350m": 16, "760m": 16, "1b": 16, "3b": 8, "7b": 4, "13b": 2, "30b": 1}
# --suite: settings for the H200s it runs on (141 GB), as the recipes' comments give them; 7B at micro-batch 4 needs
# no recomputation there (77 GB per GPU on 2 GPUs, BENCHMARKS.md)
SUITE_OVERRIDES = {"7b": ["fsdp.activation_checkpointing=false"]}
METRIC = re.compile(r"(throughput/device/[a-z_]+|memory/peak_allocated_mem|memory/peak_reserved_mem)"
                    r"\s*:\s*([0-9.eE+-]+)")


def write_random_mds(root: Path, n_samples: int, seq_len: int, vocab: int) -> Path:
    """``n_samples`` random-token samples in the project's MDS format (``tokens`` ndarray:int32). Shards already at
    ``root`` are kept when they hold at least as many samples: fewer would make a timing run cross epoch boundaries
    (a loader restart each time, slower steps)."""
    import numpy as np
    from streaming import MDSWriter
    out = root / "train"
    if (out / "index.json").exists():
        have = sum(s["samples"] for s in json.loads((out / "index.json").read_text())["shards"])
        if have >= n_samples:
            return root
        print(f"{out} holds {have} samples, fewer than the {n_samples} these runs read: writing them again",
              flush=True)
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    with MDSWriter(out=str(out), columns={"tokens": "ndarray:int32"}, size_limit="64mb") as w:
        for _ in range(n_samples):
            w.write({"tokens": rng.integers(1, vocab, size=seq_len, dtype=np.int32)})
    return root


def composer_launcher() -> str:
    for cand in (shutil.which("composer"), str(Path(sys.executable).parent / "composer"), "/tmp/site/bin/composer"):
        if cand and Path(cand).exists():
            return cand
    raise SystemExit("composer launcher not found (pip install mosaicml)")


def timing_overrides(data: Path, attn: str, steps: int, mb: int, global_batch: int, run_name: str, window: int,
                     peak_tflops: float, log_interval: int) -> list[str]:
    """A recipe turned into a timing run: the random-token shards at ``data`` (local; no eval, checkpoints or
    loggers), ``steps`` optimizer steps without warmup, composer's SpeedMonitor over the last ``window`` batches."""
    return [
        "tokenizer=bundled",  # only the EOS id is read; the data is random tokens below vocab_size
        "train_loader.streams=null", f"train_loader.local={data}", "train_loader.split=train",
        "train_loader.num_workers=2", "eval_loader=null",
        f"max_duration={steps}ba", f"global_train_batch_size={global_batch}", f"device_train_microbatch_size={mb}",
        "save_folder=null", "autoresume=false", "loggers={}", f"run_name={run_name}",
        f"model.attn_config.attn_impl={attn}", "scheduler.t_warmup=0ba",
        f"callbacks.speed_monitor.window_size={window}",
        f"callbacks.speed_monitor.gpu_flops_available={peak_tflops * 1e12}",
        f"console_log_interval={log_interval}ba", "progress_bar=false",
    ]


def overrides_for(model: str, attn: str, gpus: int, steps: int, data: Path, extra: list[str],
                  variant: str = "base", accum: int = 1, mb: int | None = None) -> list[str]:
    mb = mb or MICRO_BATCH[model]
    return [*timing_overrides(data, attn, steps, mb, mb * accum * gpus, f"bench-{model}-{attn}-{variant}-{gpus}gpu",
                              window=WINDOW, peak_tflops=989.0, log_interval=WINDOW), *extra]


def split_env(items: list[str]) -> tuple[dict[str, str], list[str]]:
    """``env.NAME=value`` items (environment variables of the run) apart from the config overrides."""
    env = dict(e[len("env."):].split("=", 1) for e in items if e.startswith("env."))
    return env, [e for e in items if not e.startswith("env.")]


def failure_line(log: str) -> str:
    """The line of a failed run's log that says why: the first exception line (``SomethingError: ...``, a rank's
    ``[rank0]: ...`` prefix dropped), else the first line that speaks of an error (a CUDA fault reported by NCCL's
    watchdog), else the last line; warnings printed at shutdown are never the cause."""
    lines = [re.sub(r"^\[rank\d+\]:\s*", "", ln.strip()) for ln in log.splitlines() if ln.strip()]
    lines = [ln for ln in lines if "Warning" not in ln and not ln.startswith("warnings.warn")]
    for ln in lines:
        if re.match(r"^[\w.]*(Error|Exception): ", ln):
            return ln[:300]
    for ln in lines:
        if re.search(r"error", ln, re.IGNORECASE):
            return ln[:300]
    return lines[-1][:300] if lines else ""


def run_recipe(model: str, attn: str, gpus: int, steps: int, data: Path, extra: list[str], log_dir: Path,
               variant: str = "base", accum: int = 1, mb: int | None = None) -> dict:
    env_items, extra = split_env(extra)
    cmd = [composer_launcher(), "-n", str(gpus), str(REPO / "scripts/train.py"), str(REPO / f"yamls/mpt-{model}.yaml"),
           *overrides_for(model, attn, gpus, steps, data, extra, variant, accum, mb)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", **env_items)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), env.get("PYTHONPATH", "")] if p)
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    text = proc.stdout + proc.stderr
    (log_dir / f"{model}-{attn}-{variant}-{gpus}gpu.log").write_text(" ".join(cmd) + "\n\n" + text)
    metrics: dict[str, list[float]] = {}
    for key, val in METRIC.findall(text):
        metrics.setdefault(key, []).append(float(val))
    row = {"model": model, "attn": attn, "variant": variant, "extra": " ".join(extra), "gpus": gpus,
           "micro_batch": mb or MICRO_BATCH[model], "accum": accum,
           "ok": proc.returncode == 0, "wall_s": round(time.time() - t0, 1)}
    if proc.returncode != 0:
        row["error"] = failure_line(text) or f"exit {proc.returncode}"
        return row
    # the last window is the steadiest (compilation and autotuning are behind it)
    for key, vals in metrics.items():
        row[key.split("/")[-1]] = vals[-1]
    profile = re.search(r"profiler: batches .*", text)  # callbacks.profiler's summary, when a variant sets it
    if profile:
        row["profile"] = profile.group(0)
    return row


def flops_per_token(model: str, seq_len: int = 2048) -> float:
    from llmfoundry.train.config import load_config
    cfg = load_config(REPO / f"yamls/mpt-{model}.yaml", ["tokenizer=bundled"])
    return cfg.model.flops_per_token(seq_len)


def run_hf_peer(model: str, steps: int, seq_len: int = 2048, accum: int = 1) -> dict:
    """The peer at MICRO_BATCH[model], halved until it fits (its eager attention holds S x S scores per head)."""
    import torch
    b = MICRO_BATCH[model]
    while True:
        try:
            return _hf_peer_run(model, steps, seq_len, accum, b)
        except torch.OutOfMemoryError:
            if b == 1:
                raise
        torch.cuda.empty_cache()  # outside the except: its traceback would keep the failed model alive
        b //= 2


def _hf_peer_run(model: str, steps: int, seq_len: int, accum: int, b: int) -> dict:
    """transformers' MptForCausalLM, same shapes, bare loop: bf16 autocast, fused AdamW, one GPU."""
    import torch
    from transformers import MptConfig, MptForCausalLM
    from llmfoundry.train.config import load_config
    cfg = load_config(REPO / f"yamls/mpt-{model}.yaml", ["tokenizer=bundled"]).model
    hf_cfg = MptConfig(d_model=cfg.d_model, n_heads=cfg.n_heads, n_layers=cfg.n_layers,
                       expansion_ratio=int(cfg.expansion_ratio), max_seq_len=seq_len, vocab_size=cfg.vocab_size,
                       no_bias=True, attn_config={"alibi": True, "attn_impl": "torch"}, use_cache=False)
    torch.manual_seed(0)
    net = MptForCausalLM(hf_cfg).cuda()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    x = torch.randint(1, cfg.vocab_size, (b, seq_len), device="cuda")
    torch.cuda.reset_peak_memory_stats()

    def step():
        for _ in range(accum):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = net(input_ids=x, labels=x).loss
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / (steps * accum)
    row = {"model": model, "attn": "transformers-MPT", "gpus": 1, "ok": True, "micro_batch": b, "accum": accum,
           "tokens_per_sec": b * seq_len / dt, "peak_allocated_mem": torch.cuda.max_memory_allocated() / 2**30}
    net = opt = None  # free the GPU memory before the trainer runs
    torch.cuda.empty_cache()
    return row


def plan_runs(args) -> list[tuple[str, str, int]]:
    """(model, attn_impl, GPUs) to run: ``--models x --attn x --gpus``, or with ``--suite`` the issue's table."""
    attns = args.attn.split(",")
    if not args.suite:
        return [(m, a, int(g)) for m in args.models.split(",") for a in attns for g in args.gpus.split(",")]
    import torch
    have = torch.cuda.device_count()
    plan = [(m, a, 1) for m in ("125m", "350m", "1b") for a in attns]
    plan += [("1b", "triton", 2), ("1b", "triton", 4), ("7b", "triton", 4)]
    for m, a, g in plan:
        if g > have:
            print(f"skipping MPT-{m} {a} on {g} GPUs: this machine has {have}", flush=True)
    return [run for run in plan if run[2] <= have]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="125m,350m,1b")
    p.add_argument("--attn", default="flex,triton")
    p.add_argument("--gpus", default="1", help="comma-separated GPU counts, e.g. 1,2,4 for scaling")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    p.add_argument("--accum", type=int, default=1,
                   help="micro-batches per optimizer step per GPU (the recipes' 512 over 8 GPUs at micro-batch 16 "
                        "is 4); 1 steps the optimizer after every micro-batch, the worst case")
    p.add_argument("--mb", type=int, default=None, help="micro-batch per GPU (default: MICRO_BATCH[model])")
    p.add_argument("--peer", action="store_true", help="also time transformers' MptForCausalLM (one GPU)")
    p.add_argument("--peak_tflops", type=float, default=989.0)
    p.add_argument("--data", default="/tmp/bench_mds")
    p.add_argument("--logs", default="/tmp/bench_logs")
    p.add_argument("--json", default=None)
    p.add_argument("--variant", action="append", default=None,
                   help="'NAME: key=value ...': a named set of overrides (env.NAME=value sets an environment "
                        "variable of the run); each attn x gpus runs once per variant (default: one variant 'base' "
                        "with none)")
    p.add_argument("--suite", action="store_true",
                   help="the speed issue's table: 125m/350m/1b x --attn on 1 GPU, 1b triton on 2 and 4 GPUs, 7b "
                        "triton on 4 GPUs with SUITE_OVERRIDES (runs needing more GPUs than this machine has are "
                        "skipped, and said so)")
    p.add_argument("extra", nargs="*", help="more key=value overrides for every run (e.g. compile_config={})")
    args = p.parse_args(argv)
    if args.steps <= WINDOW:
        p.error(f"--steps {args.steps}: give at least {WINDOW + 1}; the throughput is the SpeedMonitor's "
                f"{WINDOW}-batch window, logged once that many batches follow the first")

    variants = [(v.split(":", 1)[0].strip(), v.split(":", 1)[1].split() if ":" in v else [])
                for v in (args.variant or ["base:"])]
    plan = plan_runs(args)
    if not plan:
        raise SystemExit("nothing to run: no run fits the GPUs of this machine")
    models = list(dict.fromkeys(m for m, _, _ in plan))
    n = max((args.mb or MICRO_BATCH[m]) * g for m, _, g in plan) * args.accum * (args.steps + 2) + 64
    data = write_random_mds(Path(args.data), n, 2048, 50432)
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)

    rows = []
    for model in models:
        fpt = flops_per_token(model)
        if args.peer:
            rows.append(run_hf_peer(model, args.steps, accum=args.accum))
        for _, attn, g in (run for run in plan if run[0] == model):
            for name, overrides in variants:
                suite = SUITE_OVERRIDES.get(model, []) if args.suite else []
                rows.append(run_recipe(model, attn, g, args.steps, data, [*args.extra, *suite, *overrides], logs,
                                       name, args.accum, args.mb))
                print(json.dumps(rows[-1]), flush=True)
        for r in rows:
            if r["model"] == model and r.get("ok"):
                tps = r.get("tokens_per_sec")
                if tps is None and r.get("samples_per_sec"):
                    tps = r["samples_per_sec"] * 2048
                r["tokens_per_sec"] = tps
                r["mfu_ours"] = tps * fpt / (args.peak_tflops * 1e12) if tps else None
        print(json.dumps([r for r in rows if r["model"] == model], indent=1), flush=True)

    print(f"\nMFU against {args.peak_tflops:.0f} TFLOP/s; FLOPs/token = 6N + 12*L*d*S")
    print(f"{'model':6} {'attn':18} {'variant':10} {'gpus':>4} {'tokens/s/GPU':>13} {'MFU':>6} {'peak mem GB':>11}"
          "  vs peer")
    for r in rows:
        if not r.get("ok"):
            print(f"{r['model']:6} {r['attn']:18} {r.get('variant', ''):10} {r['gpus']:>4}  FAILED: {r.get('error')}")
            continue
        peer = next((q for q in rows if q["model"] == r["model"] and q["attn"] == "transformers-MPT"), None)
        ratio = f"{r['tokens_per_sec'] / peer['tokens_per_sec']:.2f}x" if peer and r["tokens_per_sec"] else ""
        mem = r.get("peak_allocated_mem")
        print(f"{r['model']:6} {r['attn']:18} {r.get('variant', ''):10} {r['gpus']:>4} {r['tokens_per_sec'] or 0:13,.0f} "
              f"{r.get('mfu_ours') or 0:6.3f} {mem if mem is not None else float('nan'):11.1f}  {ratio}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
