"""Build a data mix from a recipe: fetch each source's raw files, then convert them into the MDS streams a training
YAML reads (``<out_root>/<stream>/<split>``), on this machine or on Spark.

    # print every command of the MPT-7B mix (yamls/mpt-7b.yaml's ten streams) without running anything
    python data_prep/build_mix.py data_prep/recipes/mpt-7b.yaml --raw_dir /data/raw --out_root s3://bucket/mds --dry_run
    # fetch and convert two streams on this machine, 16 processes each
    python data_prep/build_mix.py data_prep/recipes/mpt-7b.yaml --raw_dir /data/raw --out_root s3://bucket/mds \\
        --streams c4 wikipedia --processes 16
    # convert what was fetched, on a Spark cluster (run through spark-submit's Python, see docs/SPARK.md)
    python data_prep/build_mix.py data_prep/recipes/mpt-7b.yaml --raw_dir /data/raw --out_root s3://bucket/mds \\
        --steps convert --engine spark --master spark://head:7077

Recipe (YAML): ``tokenizer``, ``concat_tokens``, and ``streams: {name: {fetch: [shell commands, run in
<raw_dir>/<name>], format: json | parquet | text, text_field, splits: {split: [globs under <raw_dir>/<name>]}}}``.
Each command is printed before it runs; the first that fails stops the build, naming the stream (the streams
converted before it are complete: their index.json is written last). docs/DATA_MIX.md has the walk-through.
"""
import argparse
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONVERTERS = {"json": "convert_dataset_json.py", "parquet": "convert_dataset_parquet.py",
              "text": "convert_text_to_mds.py"}


@dataclass
class StreamRecipe:
    fetch: list[str] = field(default_factory=list)
    format: str = "json"
    text_field: str | None = "text"
    splits: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Recipe:
    tokenizer: str
    concat_tokens: int
    streams: dict[str, StreamRecipe]


def load_recipe(path: str) -> Recipe:
    """Read and check a recipe; every problem of the file in one ``ValueError``."""
    import yaml
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    problems, streams = [], {}
    for key in ("tokenizer", "concat_tokens", "streams"):
        if key not in data:
            problems.append(f"'{key}' is missing")
    for name, s in (data.get("streams") or {}).items():
        unknown = set(s or {}) - {"fetch", "format", "text_field", "splits"}
        if unknown:
            problems.append(f"streams.{name}: unknown keys {sorted(unknown)} (fetch, format, text_field, splits)")
            continue
        r = StreamRecipe(**(s or {}))
        if r.format not in CONVERTERS:
            problems.append(f"streams.{name}.format '{r.format}': one of {', '.join(CONVERTERS)}")
        if not r.splits or not all(isinstance(g, list) and g for g in r.splits.values()):
            problems.append(f"streams.{name}.splits: give {{split: [globs]}}, e.g. {{train: ['*.jsonl']}}")
        streams[name] = r
    if problems:
        raise ValueError(f"recipe {path}: " + "; ".join(problems))
    return Recipe(data["tokenizer"], int(data["concat_tokens"]), streams)


def join_out(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts]) if "://" in root else os.path.join(root, *parts)


def convert_command(recipe: Recipe, name: str, split: str, raw_dir: str, out_root: str, args) -> list[str]:
    """The converter command for one split of one stream."""
    s = recipe.streams[name]
    inputs = [os.path.join(raw_dir, name, g) for g in s.splits[split]]
    out = join_out(out_root, name, split)
    common = ["--out_root", out, "--tokenizer", args.tokenizer or recipe.tokenizer,
              "--concat_tokens", str(args.concat_tokens or recipe.concat_tokens)]
    if s.format != "text":
        common += ["--text_field", s.text_field or "text"]
    if args.overwrite:
        common.append("--overwrite")
    if args.engine == "spark":
        return ["python", script("convert_spark.py"), *inputs, "--format", s.format, *common, "--master", args.master]
    return ["python", script(CONVERTERS[s.format]), *inputs, *common, "--processes", str(args.processes)]


def script(name: str) -> str:
    """A data_prep script's path as the user would type it from the current folder."""
    return os.path.relpath(HERE / name)


def plan(recipe: Recipe, args) -> list[tuple[str, str, str | list[str]]]:
    """(stream, cwd, command) in order: a shell string for a fetch step, an argv list for a conversion."""
    steps = []
    for name in args.streams or list(recipe.streams):
        raw = os.path.join(args.raw_dir, name)
        if "fetch" in args.steps:
            steps += [(name, raw, cmd) for cmd in recipe.streams[name].fetch]
        if "convert" in args.steps:
            steps += [(name, ".", convert_command(recipe, name, split, args.raw_dir, args.out_root, args))
                      for split in recipe.streams[name].splits]
    return steps


def show(cwd: str, cmd) -> str:
    line = cmd if isinstance(cmd, str) else shlex.join(cmd)
    return f"(cd {shlex.quote(cwd)} && {line})" if cwd != "." else line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="a recipe YAML, e.g. data_prep/recipes/mpt-7b.yaml")
    parser.add_argument("--raw_dir", required=True, help="where raw files are fetched to (<raw_dir>/<stream>)")
    parser.add_argument("--out_root", required=True, help="MDS output root (local folder or s3://bucket/prefix)")
    parser.add_argument("--streams", nargs="*", default=None, help="only these streams (default: all)")
    parser.add_argument("--steps", nargs="+", default=["fetch", "convert"], choices=["fetch", "convert"])
    parser.add_argument("--engine", default="local", choices=["local", "spark"])
    parser.add_argument("--processes", type=int, default=max(1, os.cpu_count() or 1), help="local engine")
    parser.add_argument("--master", default="local[*]", help="spark engine: the Spark master URL")
    parser.add_argument("--tokenizer", default=None, help="instead of the recipe's")
    parser.add_argument("--concat_tokens", type=int, default=None, help="instead of the recipe's")
    parser.add_argument("--overwrite", action="store_true", help="replace existing MDS outputs")
    parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    unknown = [s for s in args.streams or [] if s not in recipe.streams]
    if unknown:
        print(f"error: --streams {' '.join(unknown)}: not in {args.recipe} ({', '.join(recipe.streams)})",
              file=sys.stderr)
        return 2
    steps = plan(recipe, args)
    for i, (name, cwd, cmd) in enumerate(steps, 1):
        print(f"# [{i}/{len(steps)}] {name}\n{show(cwd, cmd)}", flush=True)
        if args.dry_run:
            continue
        os.makedirs(cwd, exist_ok=True)
        if isinstance(cmd, list) and cmd[0] == "python":
            cmd = [sys.executable, *cmd[1:]]  # this Python (its venv), whatever 'python' is on PATH
        r = subprocess.run(cmd, cwd=cwd, shell=isinstance(cmd, str))
        if r.returncode != 0:
            print(f"error: stream {name}: the command above failed (exit status {r.returncode}); fix it and run "
                  f"again with --streams {name} (streams before it are complete)", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
