r"""FP8 against bf16 training throughput and memory, through the real entry, bf16 and FP8 rows from one command.

For each model, the recipe (``yamls/mpt-<size>.yaml``) runs through ``composer scripts/train.py`` exactly as in
bench/bench_train.py (random-token MDS shards, the recipe's FSDP settings, our Triton attention, compiled with
``compile_config={}``, tokens/s/GPU from composer's SpeedMonitor over the last 5-batch window, peak memory from its
MemoryMonitor), once with ``precision=amp_bf16`` and once per FP8 recipe with ``precision=amp_fp8
fp8.recipe=<recipe>`` (llmfoundry/train/fp8.py: torchao's Float8Linear in the transformer blocks; FSDP2 float8
all-gather with tensorwise on more than one GPU). All rows come from one command on one machine, so "vs bf16"
compares like with like.

MFU is against the dense bf16 peak (989 TFLOP/s, ``--peak_tflops``), for FP8 rows too: it measures the model's
FLOPs per second, not the share of the FP8 peak.

GPU hosts (torch 2.11): carry torchao 0.18 as a wheel. Here, in the repository root, once:

    ../shared/device/wheels.sh torchao==0.18.0          # fills .whl/ (git-ignored) with composer & co + torchao

then on the device (``carry: [".whl"]``), one model per command (each command <= 10 minutes; 7B: 90-125 s a run
on one H200, compilation and profiling included; 1B: three runs, profiled as below, in 252 s on one H200, 326 s on
one H100)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH || exit; \
    python3 bench/bench_fp8.py --models 7b --mb 4 --accum 4 --steps 8 --json $OUT/fp8-7b.json
        # MPT-7B, one H200, no activation recomputation, micro-batch 4 x 4 (BENCHMARKS.md's bf16 row b); target 1.28x
        # BENCHMARKS.md adds --variant sgo precision=amp_bf16 fsdp.sharding_strategy=SHARD_GRAD_OP
        #                   --variant sgo fsdp.sharding_strategy=SHARD_GRAD_OP   (the faster setting on one GPU)
    python3 bench/bench_fp8.py --models 1b --mb 16 --accum 4 --steps 8 --recipes tensorwise,rowwise \
        --json $OUT/fp8-1b.json                         # MPT-1B, the recipe as benchmarked; target 1.15x

More ``key=value`` arguments are overrides for every run (bf16 and FP8 alike), e.g.
``fsdp.activation_checkpointing=true``, or ``--steps 10 callbacks.profiler.start_batch=2
'callbacks.profiler.folder=/tmp/tr/{run_name}'``: every row then also says where its GPU time went (the profiler
traces batches 2-3, before the throughput window of batches 6-10; the summary lands in the row's ``profile``).
``--variant NAME KEY=VALUE...`` adds an FP8 row with overrides of its own, to find where FP8 time goes in the same
command; e.g. on one GPU, with the float8 all-gather and its per-step scale precompute forced on (by default it is
on with more than one GPU only: one GPU gathers nothing), and without FSDP::

    python3 bench/bench_fp8.py --models 7b --mb 4 --accum 4 --steps 8 --json $OUT/fp8-7b.json \
        --variant gather fp8.fsdp_float8_all_gather=true --variant no-fsdp fsdp=null model.init_device=cuda

A variant whose overrides include ``precision=amp_bf16`` is a bf16 row, ``bf16-NAME``, and ``fp8-NAME`` is then
compared with it instead of the plain bf16 row: ``--variant no-fsdp precision=amp_bf16 fsdp=null
model.init_device=cuda`` beside the ``no-fsdp`` FP8 variant above gives that setting's own FP8/bf16 ratio.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_train import MICRO_BATCH, WINDOW, flops_per_token, run_recipe, write_random_mds  # noqa: E402

TARGETS = {"7b": 1.28, "1b": 1.15}  # FP8 tokens/s over bf16's, the issue's goals for one H200
# per model: the setting the bf16 rows in BENCHMARKS.md used (7B on one H200: no recomputation at micro-batch 4)
MODEL_OVERRIDES = {"7b": ["fsdp.activation_checkpointing=false"]}
COMMON = ["compile_config={}"]  # FP8 is only fast compiled (torchao's casts and scales fused by Inductor)


def precision_variants(recipes: list[str], variants: list[list[str]] = ()) -> list[tuple[str, list[str]]]:
    """(name, overrides): bf16, then FP8 per recipe, then each ``--variant NAME KEY=VALUE...``: an FP8 row
    ``fp8-NAME`` with those overrides too (e.g. ``fp8.fsdp_float8_all_gather=true``), or, when they include
    ``precision=amp_bf16``, a bf16 row ``bf16-NAME``: the peer of ``fp8-NAME`` (the same setting in bf16)."""
    rows = [("bf16", ["precision=amp_bf16"])] + [
        (f"fp8-{r}", ["precision=amp_fp8", f"fp8.recipe={r}"]) for r in recipes]
    for name, *overrides in variants:
        bf16 = "precision=amp_bf16" in overrides
        rows.append((f"bf16-{name}" if bf16 else f"fp8-{name}", overrides if bf16 else ["precision=amp_fp8",
                                                                                         *overrides]))
    return rows


def speedups(rows: list[dict]) -> None:
    """Each row's tokens/s over its bf16 peer (``vs_bf16``), in place: for ``fp8-NAME`` the row ``bf16-NAME`` when
    there is one (a ``--variant`` in bf16), else the plain ``bf16`` row of its model."""
    def ok_row(model: str, variant: str):
        return next((q for q in rows if q["model"] == model and q["variant"] == variant and q.get("ok")), None)

    for r in rows:
        peer = r["variant"].replace("fp8-", "bf16-", 1) if r["variant"].startswith("fp8-") else None
        base = (peer and ok_row(r["model"], peer)) or ok_row(r["model"], "bf16")
        if base and r.get("ok") and r.get("tokens_per_sec") and base.get("tokens_per_sec"):
            r["vs_bf16"] = r["tokens_per_sec"] / base["tokens_per_sec"]
            r["bf16_peer"] = base["variant"]


def table(rows: list[dict], peak_tflops: float) -> str:
    lines = [f"MFU against {peak_tflops:.0f} TFLOP/s (dense bf16); FLOPs/token = 6N + 12*L*d*S",
             f"{'model':6} {'variant':16} {'mb x accum':>10} {'tokens/s/GPU':>13} {'MFU':>6} {'peak alloc GB':>13} "
             f"{'vs bf16':>8}  target"]
    for r in rows:
        if not r.get("ok"):
            lines.append(f"{r['model']:6} {r['variant']:16} FAILED: {r.get('error')}")
            continue
        mem = r.get("peak_allocated_mem")
        ratio = r.get("vs_bf16")
        target = TARGETS.get(r["model"]) if not r["variant"].startswith("bf16") else None
        verdict = "" if target is None or ratio is None else (
            f">= {target:.2f}x: {'met' if ratio >= target else 'MISSED'}")
        lines.append(f"{r['model']:6} {r['variant']:16} {r['micro_batch']:>5} x {r['accum']:<2} "
                     f"{r['tokens_per_sec'] or 0:13,.0f} {r.get('mfu') or 0:6.3f} "
                     f"{mem if mem is not None else float('nan'):13.1f} {f'{ratio:.3f}x' if ratio else '':>8}  "
                     f"{verdict}" + (f" (against {r['bf16_peer']})" if r.get("bf16_peer", "bf16") != "bf16" else ""))
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="1b", help="comma-separated recipe sizes, e.g. 7b,1b")
    p.add_argument("--recipes", default="tensorwise", help="FP8 recipes to time: tensorwise, rowwise or both")
    p.add_argument("--attn", default="triton")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--steps", type=int, default=8, help=f"optimizer steps per run (more than {WINDOW})")
    p.add_argument("--accum", type=int, default=4, help="micro-batches per optimizer step per GPU")
    p.add_argument("--mb", type=int, default=None, help="micro-batch per GPU (default: bench_train's MICRO_BATCH)")
    p.add_argument("--peak_tflops", type=float, default=989.0)
    p.add_argument("--data", default="/tmp/bench_mds")
    p.add_argument("--logs", default="/tmp/bench_logs")
    p.add_argument("--json", default=None)
    p.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"),
                   help="one more FP8 row, named fp8-NAME, with these overrides (repeatable); with "
                        "precision=amp_bf16 among them a bf16 row bf16-NAME, the peer of fp8-NAME; --recipes '' "
                        "for no other FP8 rows")
    p.add_argument("extra", nargs="*", help="more key=value overrides for every run, bf16 and FP8 alike")
    args = p.parse_args(argv)
    bad = [v[0] for v in args.variant if any("=" not in kv for kv in v[1:]) or "=" in v[0]]
    if bad:
        p.error(f"--variant {bad}: give a name, then key=value overrides")
    if args.steps <= WINDOW:
        p.error(f"--steps {args.steps}: give at least {WINDOW + 1} (SpeedMonitor's {WINDOW}-batch window)")
    recipes = [r for r in args.recipes.split(",") if r]
    bad = [r for r in recipes if r not in ("tensorwise", "rowwise")]
    if bad:
        p.error(f"--recipes: {bad} are not FP8 recipes; use tensorwise and/or rowwise")
    models = [m for m in args.models.split(",") if m]
    n = max((args.mb or MICRO_BATCH[m]) for m in models) * args.gpus * args.accum * (args.steps + 2) + 64
    data = write_random_mds(Path(args.data), n, 2048, 50432)
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)

    rows = []
    for model in models:
        fpt = flops_per_token(model)
        for name, overrides in precision_variants(recipes, args.variant):
            extra = [*COMMON, *MODEL_OVERRIDES.get(model, []), *args.extra, *overrides]
            row = run_recipe(model, args.attn, args.gpus, args.steps, data, extra, logs, name, args.accum, args.mb)
            if row.get("ok"):
                tps = row.get("tokens_per_sec") or (row.get("samples_per_sec") or 0) * 2048 or None
                row["tokens_per_sec"] = tps
                row["mfu"] = tps * fpt / (args.peak_tflops * 1e12) if tps else None
            rows.append(row)
            print(json.dumps(row), flush=True)
    speedups(rows)
    print("\n" + table(rows, args.peak_tflops))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
