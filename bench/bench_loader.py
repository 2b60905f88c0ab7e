"""Tokens per second of the text dataloader from a warm local cache, vs what a GPU consumes.

    python bench/bench_loader.py                      # 10k samples x 2048 tokens (82 MB), batch 8
    python bench/bench_loader.py --samples 50000 --workers 0,2,4

Writes random pre-tokenized samples with streaming.MDSWriter (the converters' format) to a temporary
directory, then iterates one shuffled epoch through `build_text_dataloader` for each `num_workers` and
reports batches/s and tokens/s. The shards are read from local disk (what a remote stream looks like once its
shards are cached), so this measures the loader itself: MDS decoding, shuffling, collation and worker IPC.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from streaming import MDSWriter  # noqa: E402

from llmfoundry.data.text_loader import TextLoaderConfig, build_text_dataloader  # noqa: E402

GPU_TOKENS_PER_S = 60_000  # MPT-1B training throughput per GPU (reference figure from the project brief)


def write_shards(out: str, samples: int, seq: int) -> float:
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    with MDSWriter(out=out, columns={"tokens": "ndarray:int32"}, size_limit="64mb") as w:
        for _ in range(samples):
            w.write({"tokens": rng.integers(0, 50_000, seq, dtype=np.int32)})
    return time.perf_counter() - start


def bench(data: str, seq: int, batch: int, workers: int, eos: int | None) -> dict:
    cfg = TextLoaderConfig(max_seq_len=seq, local=data, shuffle=True, num_workers=workers)
    start = time.perf_counter()
    loader = build_text_dataloader(cfg, batch, eos_token_id=eos)
    it = iter(loader)
    next(it)  # startup: index, shared memory, worker processes, first batch
    first = time.perf_counter()
    n = 0
    for b in it:
        n += 1
    end = time.perf_counter()
    tokens = n * batch * seq
    return {"workers": workers, "startup_s": first - start, "batches": n, "seconds": end - first,
            "tokens_per_s": tokens / (end - first)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--workers", default="0,1,2", help="comma-separated num_workers values to measure")
    ap.add_argument("--eos", type=int, default=0, help="EOS id for sequence ids (-1: no sequence_id)")
    ap.add_argument("--dir", default=None, help="reuse/keep shards here instead of a temporary directory")
    args = ap.parse_args()

    data = args.dir or tempfile.mkdtemp(prefix="bench-mds-")
    try:
        if not os.path.exists(os.path.join(data, "index.json")):
            secs = write_shards(data, args.samples, args.seq)
            mb = args.samples * args.seq * 4 / 1e6
            print(f"wrote {args.samples} samples x {args.seq} tokens ({mb:.0f} MB) in {secs:.1f}s")
        print(f"cpu cores: {os.cpu_count()}, batch {args.batch}, seq {args.seq}, "
              f"sequence_id: {'yes' if args.eos >= 0 else 'no'}")
        print(f"{'workers':>7} {'startup s':>9} {'batches':>7} {'seconds':>7} {'tokens/s':>12} {'x MPT-1B GPU':>12}")
        for w in [int(x) for x in args.workers.split(",")]:
            r = bench(data, args.seq, args.batch, w, args.eos if args.eos >= 0 else None)
            print(f"{r['workers']:>7} {r['startup_s']:>9.2f} {r['batches']:>7} {r['seconds']:>7.2f} "
                  f"{r['tokens_per_s']:>12,.0f} {r['tokens_per_s'] / GPU_TOKENS_PER_S:>11.0f}x")
    finally:
        if args.dir is None:
            shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
