"""Conversion on Spark against the single-machine converter: tokens per core-second on the same input.

The input is bench_convert.py's: the tiny default corpus repeated to --mb megabytes in --files JSON Lines files.
For each core count N, in a process of its own pinned to N CPUs (Spark's JVM and Python workers and the
converter's processes and tokenizer threads inherit the pinning, so N cores is all that either gets), the
single-machine converter (--processes N) and Spark (local[N], N partitions: the same ranges of the input) take
turns converting it --repeat times after an untimed warm-up (imports, Spark's Python workers loading the
tokenizer); the best run of each is shown. Spark's start-up (its JVM) is printed, not timed,
and so is each converter's fixed cost per conversion (8 small documents: Spark's two jobs and their tasks; the
single machine's process start). Two figures per run:

- tokens per core-second: tokens / (wall seconds x cores used), what sizing a cluster needs;
- tokens per CPU-second: tokens / CPU seconds of every process involved (this Python, its workers, Spark's JVM
  and Python workers), the figure that holds up when other work shares the machine.

    python bench/bench_convert_spark.py --mb 8 --files 8
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_convert import write_corpus  # noqa: E402

from llmfoundry.data.convert import ConvertConfig, convert  # noqa: E402
from llmfoundry.data.readers import JsonFiles, TextList  # noqa: E402
from llmfoundry.data.spark import convert_on_spark, start_spark  # noqa: E402


@dataclass
class Run:
    name: str
    cores: int
    tokens: int
    seconds: float
    cpu_seconds: float

    @property
    def per_core_second(self) -> float:
        return self.tokens / (self.seconds * self.cores)

    @property
    def per_cpu_second(self) -> float:
        return self.tokens / self.cpu_seconds


def tree_cpu() -> float:
    """CPU seconds of this process and all its descendants (and of their children that have exited)."""
    total = 0.0
    me = psutil.Process()
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def best(runs: list[Run]) -> Run:
    return min(runs, key=lambda r: r.seconds)


def measure(name: str, cores: int, convert_once) -> Run:
    cpu0, t0 = tree_cpu(), time.perf_counter()
    summary = convert_once()
    seconds, cpu = time.perf_counter() - t0, tree_cpu() - cpu0
    return Run(name, cores, summary.tokens + summary.dropped_tokens, seconds, cpu)


def compare(args, paths: tuple[str, ...], tmp: str, n: int) -> list[Run]:
    """--processes n against local[n], taking turns (both then see the same load on a shared machine); the best
    run of each."""
    warm = TextList(("warm up " * 2000,) * 8, docs_per_unit=1)

    def config(name: str, processes: int = 1) -> ConvertConfig:
        out = os.path.join(tmp, name)
        shutil.rmtree(out, ignore_errors=True)
        return ConvertConfig(out_root=out, tokenizer=args.tokenizer, concat_tokens=args.concat_tokens,
                             processes=processes, progress=False)

    t0 = time.perf_counter()
    spark = start_spark(f"local[{n}]", {"spark.ui.enabled": "false"}, progress=False)
    print(f"local[{n}], pinned to CPUs {sorted(os.sched_getaffinity(0))}: Spark started in "
          f"{time.perf_counter() - t0:.1f} s (not timed)", flush=True)
    try:
        convert(warm, config("warm", n))
        convert_on_spark(warm, config("warm"), spark, partitions=n)
        fixed = [min(convert(warm, config("warm", n)).seconds for _ in range(3)),
                 min(convert_on_spark(warm, config("warm"), spark, partitions=n).seconds for _ in range(3))]
        print(f"  fixed cost per conversion (8 small documents): single machine {fixed[0]:.2f} s, Spark "
              f"{fixed[1]:.2f} s", flush=True)
        single, on_spark = [], []
        for _ in range(args.repeat):
            single.append(measure(f"single machine, --processes {n}", n,
                                  lambda: convert(JsonFiles(paths), config("out", n))))
            on_spark.append(measure(f"Spark local[{n}]", n, lambda: convert_on_spark(
                JsonFiles(paths), config("out"), spark, partitions=args.partitions or n)))
            print(f"  {single[-1]}\n  {on_spark[-1]}", flush=True)
    finally:
        spark.stop()
    return [best(single), best(on_spark)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=8.0, help="input size in MB")
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cores", type=int, nargs="+", default=[1, 2], help="processes / local[N] to compare")
    parser.add_argument("--partitions", type=int, default=None,
                        help="Spark tasks (default: one per core, the ranges of --processes N)")
    parser.add_argument("--tokenizer", default="bundled")
    parser.add_argument("--concat_tokens", type=int, default=2048)
    parser.add_argument("--corpus", default=None, help=argparse.SUPPRESS)  # set for the pinned child processes
    args = parser.parse_args()
    if args.corpus:  # a child: one core count, pinned to that many CPUs (Spark's JVM and workers inherit it)
        (n,) = args.cores
        os.sched_setaffinity(0, range(n))
        paths = tuple(sorted(os.path.join(args.corpus, f) for f in os.listdir(args.corpus)))
        with tempfile.TemporaryDirectory() as tmp:
            runs = compare(args, paths, tmp, n)
        print("RESULT " + json.dumps([dataclasses.asdict(r) for r in runs]))
        return
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; Python {platform.python_version()}")
    runs: list[Run] = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_corpus(tmp, args.mb, args.files)
        mb = sum(os.path.getsize(p) for p in paths) / 1e6
        for n in args.cores:  # each in a process of its own, pinned to n CPUs: "per core" means what it says
            res = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--cores", str(n), "--corpus", tmp],
                                 stdout=subprocess.PIPE, text=True, check=True)
            lines = res.stdout.splitlines()
            print("\n".join(line for line in lines if not line.startswith("RESULT ")), flush=True)
            runs += [Run(**r) for r in json.loads(lines[-1][len("RESULT "):])]
    baseline = {r.cores: r for r in runs if r.name.startswith("single")}
    print(f"\ninput: {mb:.1f} MB of JSON Lines in {args.files} files, concat_tokens {args.concat_tokens}, best of "
          f"{args.repeat}; load average now {os.getloadavg()[0]:.1f}\n")
    print("| converter | cores | tokens | seconds | tokens/s | tokens per core-second | vs single machine | "
          "tokens per CPU-second | vs single machine |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        base = baseline.get(r.cores, r)
        print(f"| {r.name} | {r.cores} | {r.tokens:,} | {r.seconds:.2f} | {r.tokens / r.seconds:,.0f} | "
              f"{r.per_core_second:,.0f} | {r.per_core_second / base.per_core_second:.2f}x | "
              f"{r.per_cpu_second:,.0f} | {r.per_cpu_second / base.per_cpu_second:.2f}x |")


if __name__ == "__main__":
    main()
