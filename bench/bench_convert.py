"""Conversion speed: tokens per second (total and per process) turning JSON Lines into MDS shards.

The input is the bundled corpus repeated to --mb megabytes, written as --files JSON Lines files so that the
work splits evenly over processes. Times are end to end (tokenizer load, process start, shard writing, index
merge) after one untimed warm-up conversion (imports, forkserver start); the fixed cost per conversion
(tokenizer load, worker start) is measured on a two-document input and printed too. Tokens per CPU-second
(CPU time of the converting processes, all threads) is the figure that holds up on a shared, busy machine.

    python bench/bench_convert.py --mb 8 --processes 1 2
"""
import argparse
import json
import os
import platform
import tempfile

from llmfoundry.data.convert import ConvertConfig, convert
from llmfoundry.data.bundled import corpus_documents
from llmfoundry.data.readers import JsonFiles, TextList


def write_corpus(folder: str, mb: float, files: int) -> list[str]:
    docs = corpus_documents()
    lines = [json.dumps({"text": d}) + "\n" for d in docs]
    per_file = mb * 1e6 / files
    paths = []
    for f in range(files):
        path = os.path.join(folder, f"part{f:03d}.jsonl")
        size, i = 0, f  # start each file at a different document
        with open(path, "w") as out:
            while size < per_file:
                out.write(lines[i % len(lines)])
                size += len(lines[i % len(lines)])
                i += 1
        paths.append(path)
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=8.0, help="input size in MB")
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tokenizer", default="bundled")
    parser.add_argument("--concat_tokens", type=int, default=2048)
    parser.add_argument("--compression", default="zstd")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_corpus(tmp, args.mb, args.files)
        mb = sum(os.path.getsize(p) for p in paths) / 1e6

        def run(source, processes, name):
            cfg = ConvertConfig(out_root=os.path.join(tmp, name), tokenizer=args.tokenizer,
                                concat_tokens=args.concat_tokens, compression=args.compression,
                                processes=processes, progress=False)
            return convert(source, cfg)

        warm = TextList(("warm up " * 2000,) * 2, docs_per_unit=1)
        for p in sorted(set(args.processes)):  # imports, forkserver start: once per Python process, not timed
            run(warm, p, f"warm{p}")
        for p in sorted(set(args.processes)):
            print(f"fixed cost per conversion with {p} process(es) (two small documents): "
                  f"{run(warm, p, f'fixed{p}').seconds:.2f} s")
        print("| processes | input MB | tokens | seconds | tokens/s | tokens/s per process | tokens per CPU-second |")
        print("|---|---|---|---|---|---|---|")
        for p in args.processes:
            s = run(JsonFiles(tuple(paths)), p, f"out{p}")
            total = s.tokens + s.dropped_tokens
            print(f"| {s.processes} | {mb:.1f} | {total:,} | {s.seconds:.2f} | {s.tokens_per_second:,.0f} | "
                  f"{s.tokens_per_second / s.processes:,.0f} | {s.tokens_per_cpu_second:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
