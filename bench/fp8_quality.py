r"""FP8 training quality against bf16: the same model, seed and data order trained in both, loss curves compared.

MPT-125M (``yamls/mpt-125m.yaml``: its shapes, LION, schedule and FSDP2 settings; our Triton attention, compiled)
trains ``--steps`` batches (default 1000) twice through scripts/train.py, once with ``precision=amp_bf16`` and once
with ``precision=amp_fp8`` (llmfoundry/train/fp8.py, ``--recipe``), from the same ``seed`` (the same initial
weights) in the same data order (``train_loader.shuffle_seed``), on real text given as MDS shards. Writes to
``--out``: each run's console log and parsed curves (``<precision>.json``), ``fp8_quality.json`` (both curves,
evaluation losses, the relative difference of the final evaluation losses) and ``fp8_quality.png`` (the curves;
needs matplotlib, which the GPU image has), and prints the relative difference (goal: within 1%).

The data: "real text" built here, on the CPU: the Python source of this machine's standard library and of the
dev environment's torch and pandas packages (every ``.py`` file that is UTF-8: 5198 files, 90 MB; every 20th file
of the sorted list held out for evaluation), a 16384-token byte-level BPE trained on the training files, packed
into 2048-token samples: 22.7M training and 1.3M evaluation tokens in 20 MiB of zstd shards (1000 batches of 16
read them 1.4 times). The folder travels to the GPU host git-ignored, within the 64 MiB a device call carries
(with the wheels, ~20 MiB). Built with (2 minutes on 2 cores)::

    .venv/bin/python bench/fp8_quality.py build-data --out .fp8data     # --packages torch,pandas (the default)
    # = the files copied to /tmp/fp8src/{train,val}/{stdlib,torch,pandas}/..., then
    python data_prep/build_tokenizer.py /tmp/fp8src/train --extensions .py --vocab_size 16384 --out .fp8data/tokenizer
    python data_prep/convert_text_to_mds.py /tmp/fp8src/train --extensions .py --tokenizer .fp8data/tokenizer \
        --concat_tokens 2048 --out_root .fp8data/mds/train --processes 2
    python data_prep/convert_text_to_mds.py /tmp/fp8src/val --extensions .py --tokenizer .fp8data/tokenizer \
        --concat_tokens 2048 --out_root .fp8data/mds/val

``build-data`` also adds ``/.fp8data/`` to ``.git/info/exclude``. On the GPU host (``carry: [".whl", ".fp8data"]``,
the wheels from ``../shared/device/wheels.sh torchao==0.18.0``), both runs in one command (391 s on one H100:
~195 s a run, startup and ten evaluations included)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit; \
    python3 bench/fp8_quality.py run --data .fp8data --out $OUT --steps 1000

How far apart two bf16 runs end is the yardstick for "the same loss": ``--bf16_seed 43`` adds a bf16 run from other
initial weights (the data order stays the same), and the report says whether FP8's difference is within that
spread; ``--fp8_seed 43`` beside it adds FP8 from those weights too, a second FP8/bf16 pair that shows whether
FP8's difference repeats. With two pairs or more the verdict (and the exit status) is on the means over the seeds:
a single pair's difference is mostly run-to-run noise, as large at 1000 batches as the 1% asked for. Runs take
~200 s each on one H100, so two fit one 600-second call: run ``--precisions '' --bf16_seed 43 --fp8_seed 43`` in a
second one, ``--bf16_seed 44 --fp8_seed 44`` in a third. Runs from separate commands compare anywhere with
``python bench/fp8_quality.py report --out DIR A/amp_bf16.json B/amp_fp8.json [C/amp_bf16-seed43.json
[C/amp_fp8-seed43.json]] [D/amp_bf16-seed44.json ...]`` (``--precisions amp_bf16`` or ``amp_fp8`` runs one of
them); an earlier report's ``fp8_quality.json`` (``docs/fp8_quality.json``: the runs in BENCHMARKS.md) stands for
the runs it holds.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRECISIONS = ("amp_bf16", "amp_fp8")
VAL_EVERY = 20  # every 20th source file (sorted by path) is held out for evaluation
TOLERANCE = 0.01  # the goal: final evaluation losses within 1%
YAML_SEED = 17  # yamls/mpt-125m.yaml's seed: the initial weights of the runs without --bf16_seed/--fp8_seed
DATA_SEED = YAML_SEED  # train_loader.shuffle_seed of every run: one data order for all


# ---------------------------------------------------------------------------------------------------- the data
def python_sources(root: Path) -> list[Path]:
    """The ``.py`` files under ``root`` (not site-packages or caches), sorted, that decode as UTF-8."""
    files = []
    for f in sorted(Path(root).rglob("*.py")):
        rel = f.relative_to(root).parts
        if "site-packages" in rel or "__pycache__" in rel or not f.is_file():
            continue
        try:
            f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        files.append(f)
    return files


def source_roots(packages: list[str], stdlib: Path | None = None) -> list[tuple[str, Path]]:
    """(name, folder): this Python's standard library, then each installed package's folder (found, not imported)."""
    import importlib.util
    roots = [("stdlib", Path(stdlib or sysconfig.get_paths()["stdlib"]))]
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(f"--packages: {name} is not an installed package here; drop it or install it")
        roots.append((name, Path(list(spec.submodule_search_locations)[0])))
    return roots


def _exclude_in_git(path: Path) -> None:
    """Add ``path`` (inside this repository) to .git/info/exclude so it is never committed, only carried."""
    try:
        rel = path.resolve().relative_to(REPO)
    except ValueError:
        return
    exclude = REPO / ".git" / "info" / "exclude"
    if not (REPO / ".git").is_dir():
        return
    line = f"/{rel.as_posix()}/"
    exclude.parent.mkdir(parents=True, exist_ok=True)
    if line not in (exclude.read_text().splitlines() if exclude.exists() else []):
        with open(exclude, "a") as f:
            f.write(line + "\n")
        print(f"added {line} to {exclude}")


def build_data(out: Path, src: Path, vocab_size: int, processes: int, roots: list[tuple[str, Path]]) -> None:
    files = [(name, root, f) for name, root in roots for f in python_sources(root)]
    shutil.rmtree(src, ignore_errors=True)
    for i, (name, root, f) in enumerate(files):
        dest = src / ("val" if i % VAL_EVERY == VAL_EVERY - 1 else "train") / name / f.relative_to(root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dest)
    text_mb = sum(f.stat().st_size for _, _, f in files) / 1e6
    print(f"{len(files)} files ({text_mb:.0f} MB) from {', '.join(f'{n} ({r})' for n, r in roots)} copied to "
          f"{src}/train and {src}/val (every {VAL_EVERY}th)", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    _exclude_in_git(out)
    py = sys.executable
    commands = [
        [py, "data_prep/build_tokenizer.py", f"{src}/train", "--extensions", ".py", "--vocab_size", str(vocab_size),
         "--out", f"{out}/tokenizer"],
        [py, "data_prep/convert_text_to_mds.py", f"{src}/train", "--extensions", ".py", "--tokenizer",
         f"{out}/tokenizer", "--concat_tokens", "2048", "--out_root", f"{out}/mds/train", "--processes",
         str(processes), "--no_progress"],
        [py, "data_prep/convert_text_to_mds.py", f"{src}/val", "--extensions", ".py", "--tokenizer",
         f"{out}/tokenizer", "--concat_tokens", "2048", "--out_root", f"{out}/mds/val", "--no_progress"],
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    for cmd in commands:
        print("+ " + " ".join(cmd), flush=True)
        t0 = time.time()
        subprocess.run(cmd, cwd=REPO, env=env, check=True)
        print(f"  ({time.time() - t0:.0f} s)", flush=True)
    for split in ("train", "val"):
        index = json.loads((out / "mds" / split / "index.json").read_text())
        samples = sum(s["samples"] for s in index["shards"])
        print(f"{split}: {samples} samples of 2048 tokens ({samples * 2048 / 1e6:.1f}M tokens)")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{out}: {size / 2**20:.1f} MiB in all" + ("" if size < 60 * 2**20 else
          " -- more than a device call carries with the wheels (64 MiB in all); lower --vocab_size or use fewer files"))


# ------------------------------------------------------------------------------------------------- the runs
def run_overrides(data: Path, precision: str, steps: int, batch: int, micro: int, eval_interval: int,
                  recipe: str, attn: str, seed: int | None = None) -> list[str]:
    """yamls/mpt-125m.yaml turned into one quality run on ``data`` (``<data>/tokenizer``, ``<data>/mds/{train,val}``):
    both precisions get the same overrides but ``precision``. ``seed``: other initial weights than the YAML's (the
    data order stays ``DATA_SEED``'s)."""
    data = Path(data).resolve()
    return [
        f"tokenizer={data}/tokenizer",
        "train_loader.streams=null", f"train_loader.local={data}/mds", "train_loader.split=train",
        "train_loader.num_workers=2",
        "eval_loader.streams=null", f"eval_loader.local={data}/mds", "eval_loader.split=val",
        "eval_loader.num_workers=2", "eval_subset_num_batches=-1", f"device_eval_batch_size={micro}",
        f"max_duration={steps}ba", f"global_train_batch_size={batch}", f"device_train_microbatch_size={micro}",
        f"eval_interval={eval_interval}ba", "save_folder=null", "autoresume=false", "loggers={}",
        "console_log_interval=10ba", "progress_bar=false", f"model.attn_config.attn_impl={attn}",
        "callbacks.speed_monitor.window_size=10", f"run_name=fp8-quality-{run_label(precision, seed)}",
        f"precision={precision}", f"fp8.recipe={recipe}", f"train_loader.shuffle_seed={DATA_SEED}",
    ] + ([f"seed={seed}"] if seed is not None else [])


def run_label(precision: str, seed: int | None = None) -> str:
    """``amp_bf16``, ``amp_fp8``, or with another seed ``amp_bf16-seed43``: the run's name and its files' names."""
    return precision if seed is None else f"{precision}-seed{seed}"


_BATCH = re.compile(r"^\[batch=(\d+)/\d+\]")
_TRAIN = re.compile(r"Train loss/train/total: ([-\d.eE+]+|nan|inf)")
_EVAL = re.compile(r"Eval metrics/eval/LanguageCrossEntropy: ([-\d.eE+]+|nan|inf)")
_TPS = re.compile(r"throughput/device/tokens_per_sec: ([\d.eE+]+)")


def parse_log(text: str) -> dict:
    """{'train': {batch: loss}, 'eval': {batch: cross-entropy}, 'tokens_per_sec': last logged} from a run's
    console log (``[batch=N/T]:`` blocks; an evaluation block counts for the batch logged last)."""
    train, evals, tps, batch = {}, {}, None, 0
    for line in text.splitlines():
        m = _BATCH.match(line)
        if m:
            batch = int(m.group(1))
        elif (m := _TRAIN.search(line)):
            train[batch] = float(m.group(1))
        elif (m := _EVAL.search(line)):
            evals[batch] = float(m.group(1))
        elif (m := _TPS.search(line)):
            tps = float(m.group(1))
    return {"train": train, "eval": evals, "tokens_per_sec": tps}


def run_one(precision: str, args, seed: int | None = None) -> dict:
    cmd = [sys.executable, str(REPO / "scripts" / "train.py"), str(REPO / "yamls" / "mpt-125m.yaml"),
           *run_overrides(Path(args.data), precision, args.steps, args.batch, args.micro, args.eval_interval,
                          args.recipe, args.attn, seed), *args.extra]
    label = run_label(precision, seed)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), env.get("PYTHONPATH", "")] if p)
    print("+ " + " ".join(cmd), flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    out = Path(args.out)
    (out / f"{label}.log").write_text(" ".join(cmd) + "\n\n" + text)
    result = {"precision": precision, "label": label, "seed": seed,
              "recipe": args.recipe if precision == "amp_fp8" else None,
              "steps": args.steps, "batch": args.batch, "ok": proc.returncode == 0,
              "wall_s": round(time.time() - t0, 1), **parse_log(text)}
    if proc.returncode != 0:
        result["error"] = text.strip().splitlines()[-1][:500] if text.strip() else f"exit {proc.returncode}"
    (out / f"{label}.json").write_text(json.dumps(result, indent=1))
    print(f"{label}: {'ok' if result['ok'] else 'FAILED: ' + result['error']} in {result['wall_s']} s; final "
          f"eval loss {_last(result['eval'])}", flush=True)
    return result


def load_runs(path: Path) -> list[dict]:
    """The runs in a JSON file: one run's (``run_one``'s ``<label>.json``) or every run of an earlier report
    (``fp8_quality.json``, e.g. ``docs/fp8_quality.json``), each as ``run_one`` returned it: the curves keyed by
    batch numbers again (JSON keys are strings)."""
    data = json.loads(path.read_text())
    runs = list(data["runs"].values()) if "runs" in data else [data]
    for run in runs:
        for key in ("train", "eval"):
            run[key] = {int(batch): loss for batch, loss in run.get(key, {}).items()}
    return runs


def _last(curve: dict):
    return curve[max(curve)] if curve else None


# ----------------------------------------------------------------------------------------------- the report
def _relative(x, ref):
    """(x - ref) / ref, or None when either is missing (or ref is 0)."""
    return (x - ref) / ref if ref and x is not None else None


def _apart(x, ref):
    """|x - ref| / ref, or None."""
    r = _relative(x, ref)
    return None if r is None else abs(r)


def _pair_name(seed: int | None) -> str:
    """A seed's name in the report, ``seed 43``; ``None``: the YAML's (``YAML_SEED``)."""
    return f"seed {YAML_SEED if seed is None else seed}"


def _pairs(bf16: dict, fp8: dict, others=()) -> dict:
    """{seed name: (bf16, fp8 or None)}: the YAML seed's pair first, then each other seed's bf16 run and the FP8
    run from that seed when there is one."""
    fp8_of = {r["seed"]: r for r in others if r["precision"] == "amp_fp8"}
    pairs = {_pair_name(None): (bf16, fp8)}
    for r in others:
        if r["precision"] == "amp_bf16":
            pairs[_pair_name(r["seed"])] = (r, fp8_of.get(r["seed"]))
    return pairs


def compare(bf16: dict, fp8: dict, others=()) -> dict:
    """The final evaluation losses and their relative difference, |fp8 - bf16| / bf16. ``others``: runs from other
    seeds (other initial weights, the same data order), each seed's bf16 run and optionally its FP8 run. A bf16 run
    from another seed gives the bf16-to-bf16 spread (``bf16_seed_spread``, the largest |other - bf16| / bf16): the
    difference that two bf16 runs show. Each seed with both runs is one more FP8/bf16 pair, and
    ``signed_relative_difference`` holds each pair's (FP8 minus bf16, over bf16: whether FP8 ends above or below).
    With two pairs or more the difference of the means over the seeds (``seed_mean_relative_difference``) decides
    the ``verdict``: one pair's difference carries one pair's run-to-run noise (as large as the bf16 seed spread),
    the mean of several pairs less of it."""
    a, b = _last(bf16["eval"]), _last(fp8["eval"])
    rel = _apart(b, a)
    pairs = _pairs(bf16, fp8, others)
    full = [(_last(x["eval"]), _last(y["eval"])) for x, y in pairs.values() if y is not None]
    out = {"final_eval_loss": {r.get("label", r["precision"]): _last(r["eval"]) for r in (bf16, fp8, *others)},
           "relative_difference": rel, "within_1_percent": rel is not None and rel <= TOLERANCE,
           "signed_relative_difference": {name: _relative(_last(y["eval"]), _last(x["eval"]))
                                          for name, (x, y) in pairs.items() if y is not None},
           "final_train_loss": {"amp_bf16": _last(bf16["train"]), "amp_fp8": _last(fp8["train"])},
           "tokens_per_sec": {"amp_bf16": bf16.get("tokens_per_sec"), "amp_fp8": fp8.get("tokens_per_sec")}}
    spreads = [_apart(_last(x["eval"]), a) for x, _ in list(pairs.values())[1:]]
    if spreads:
        spread = None if None in spreads else max(spreads)
        out.update(bf16_seed_spread=spread, within_bf16_seed_spread=None if spread is None or rel is None
                   else rel <= spread)
    if len(full) > 1 and all(None not in losses for losses in full):
        mean_bf16, mean_fp8 = (sum(losses[i] for losses in full) / len(full) for i in (0, 1))
        mean_rel = _apart(mean_fp8, mean_bf16)
        out.update(seeds=len(full), seed_mean_final_eval_loss={"amp_bf16": mean_bf16, "amp_fp8": mean_fp8},
                   seed_mean_relative_difference=mean_rel, seed_mean_within_1_percent=mean_rel <= TOLERANCE)
    out["verdict"] = ("seed_mean_within_1_percent" if "seed_mean_within_1_percent" in out else "within_1_percent")
    return out


def plot(runs: list[dict], path: Path, title: str) -> bool:
    """Training and evaluation curves of ``runs``: one colour per seed, bf16 solid and FP8 dashed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no {path.name} (the curves are in the JSON)")
        return False
    seeds = list(dict.fromkeys(run.get("seed") for run in runs))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in runs:
        label = run.get("label", run["precision"]) + (f" ({run['recipe']})" if run.get("recipe") else "")
        style = dict(color=f"C{seeds.index(run.get('seed')) % 10}",
                     linestyle="--" if run["precision"] == "amp_fp8" else "-")
        for ax, key in ((ax1, "train"), (ax2, "eval")):
            xs = sorted(run[key])
            ax.plot(xs, [run[key][x] for x in xs], marker="o" if key == "eval" else None, label=label, **style)
    ax1.set(title="training loss", xlabel="batch", ylabel="cross-entropy")
    ax2.set(title="evaluation loss (held-out files)", xlabel="batch", ylabel="cross-entropy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def report(bf16: dict, fp8: dict, out: Path, others=()) -> dict:
    """``fp8_quality.json`` and ``.png`` in ``out`` for the runs (``others``: bf16 and FP8 runs from other seeds,
    optional, as ``compare`` takes them), and the verdict printed; returns the JSON's content."""
    summary = compare(bf16, fp8, others)
    runs = [bf16, fp8, *others]
    result = {"model": "MPT-125M (yamls/mpt-125m.yaml)", **summary,
              "runs": {r.get("label", r["precision"]): r for r in runs}}
    (out / "fp8_quality.json").write_text(json.dumps(result, indent=1))
    rel, spread = summary["relative_difference"], summary.get("bf16_seed_spread")
    signed = summary["signed_relative_difference"]
    runs_of = f"MPT-125M, {bf16.get('steps')} batches of {bf16.get('batch')} x 2048 tokens"
    if summary.get("seed_mean_relative_difference") is not None:
        title = (f"{runs_of}, {summary['seeds']} seeds: final eval loss, mean of FP8 ({fp8.get('recipe')}) vs mean "
                 f"of bf16 {summary['seed_mean_relative_difference']:.2%}\n(each pair: "
                 f"{', '.join(f'{name} {_signed(x)}' for name, x in signed.items())}; bf16 seeds apart: {spread:.2%})")
    else:
        title = (f"{runs_of}: bf16 vs FP8 ({fp8.get('recipe')}); final eval loss difference {rel:.2%}"
                 if rel is not None else "MPT-125M")
        if spread is not None:
            title += f" (bf16 seeds apart: {spread:.2%})"
    plot(runs, out / "fp8_quality.png", title)
    a, b = summary["final_eval_loss"]["amp_bf16"], summary["final_eval_loss"]["amp_fp8"]
    print(f"final eval loss: bf16 {a}, fp8 {b}; relative difference "
          f"{'n/a' if rel is None else f'{rel:.3%}'} ({'within' if summary['within_1_percent'] else 'NOT within'} "
          f"{TOLERANCE:.0%}); written to {out}/fp8_quality.json and .png")
    for name, (x, y) in list(_pairs(bf16, fp8, others).items())[1:]:
        apart = _apart(_last(x["eval"]), a)
        print(f"bf16 from {name}: final eval loss {_last(x['eval'])}, "
              f"{'n/a' if apart is None else f'{apart:.3%}'} from bf16 of {_pair_name(None)}"
              + (f"; FP8 from {name}: {_last(y['eval'])}, {_signed(signed.get(name))} from that bf16" if y else ""))
    if spread is not None and summary["within_bf16_seed_spread"] is not None:
        print(f"FP8's difference is {'within' if summary['within_bf16_seed_spread'] else 'beyond'} the spread of the "
              f"bf16 runs ({spread:.3%})")
    if summary.get("seed_mean_relative_difference") is not None:
        m = summary["seed_mean_final_eval_loss"]
        ok = summary["seed_mean_within_1_percent"]
        print(f"means over the {summary['seeds']} seeds: bf16 {m['amp_bf16']:.4f}, fp8 {m['amp_fp8']:.4f}; relative "
              f"difference {summary['seed_mean_relative_difference']:.3%} ({'within' if ok else 'NOT within'} "
              f"{TOLERANCE:.0%})")
    return result


def _signed(x) -> str:
    """One pair's signed difference, e.g. "FP8 -2.47%"."""
    return "n/a" if x is None else f"FP8 {x:+.2%}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build-data", help="build the tokenizer and MDS shards from this Python's standard library")
    b.add_argument("--out", default=".fp8data")
    b.add_argument("--src", default="/tmp/fp8src", help="where the source files are copied (not carried)")
    b.add_argument("--stdlib", default=None, help="another standard library folder to read")
    b.add_argument("--packages", default="torch,pandas",
                   help="installed packages whose .py files join the standard library's (comma-separated; '' for "
                        "none): more text, fewer epochs over it in 1000 steps")
    b.add_argument("--vocab_size", type=int, default=16384)
    b.add_argument("--processes", type=int, default=2)
    r = sub.add_parser("run", help="train bf16 and FP8 and compare them")
    r.add_argument("--data", default=".fp8data", help="the folder build-data wrote (tokenizer/, mds/{train,val})")
    r.add_argument("--out", default="/tmp/fp8_quality")
    r.add_argument("--steps", type=int, default=1000)
    r.add_argument("--batch", type=int, default=16, help="global batch (samples of 2048 tokens)")
    r.add_argument("--micro", type=int, default=16, help="micro-batch")
    r.add_argument("--eval_interval", type=int, default=100)
    r.add_argument("--recipe", default="tensorwise", choices=["tensorwise", "rowwise"])
    r.add_argument("--attn", default="triton")
    r.add_argument("--precisions", default=",".join(PRECISIONS))
    r.add_argument("--bf16_seed", type=int, default=None,
                   help="also train bf16 from this seed (other initial weights, the same data order): the spread of "
                        "two bf16 runs, the yardstick for FP8's difference")
    r.add_argument("--fp8_seed", type=int, default=None,
                   help="also train FP8 from this seed: with --bf16_seed of the same value a second FP8/bf16 pair, "
                        "from other initial weights")
    r.add_argument("extra", nargs="*", help="more key=value overrides for both runs")
    c = sub.add_parser("report", help="compare runs' JSON files (from separate commands)")
    c.add_argument("--out", required=True)
    c.add_argument("runs", nargs="+", help="amp_bf16.json and amp_fp8.json (and per other seed N "
                                           "amp_bf16-seedN.json, amp_fp8-seedN.json), or an earlier report's "
                                           "fp8_quality.json in place of the runs it holds")
    args = p.parse_args(argv)

    if args.command == "build-data":
        roots = source_roots([x for x in args.packages.split(",") if x], Path(args.stdlib) if args.stdlib else None)
        build_data(Path(args.out), Path(args.src), args.vocab_size, args.processes, roots)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.command == "report":
        loaded = [run for x in args.runs for run in load_runs(Path(x))]
        runs = {r["precision"]: r for r in loaded if r.get("seed") is None}
        others = sorted((r for r in loaded if r.get("seed") is not None), key=lambda r: (r["seed"], r["precision"]))
        keys = [(_pair_name(r.get("seed")), r["precision"]) for r in loaded]  # seed 17 is the YAML's
        bf16_seeds = {r["seed"] for r in others if r["precision"] == "amp_bf16"}
        if set(runs) != set(PRECISIONS) or len(set(keys)) != len(keys) or any(r["seed"] not in bf16_seeds
                                                                               for r in others):
            p.error(f"report needs one amp_bf16 and one amp_fp8 run of the YAML's seed, and from each other seed a "
                    f"bf16 run (with or without FP8 from that seed), each run once; got "
                    f"{[r.get('label', r['precision']) for r in loaded]}")
        result = report(runs["amp_bf16"], runs["amp_fp8"], out, others)
        return 0 if result[result["verdict"]] else 1
    if not (Path(args.data) / "tokenizer").is_dir() or not (Path(args.data) / "mds" / "val").is_dir():
        p.error(f"--data {args.data}: no tokenizer/ and mds/val/ there; build it with: python bench/fp8_quality.py "
                f"build-data --out {args.data}")
    precisions = [x for x in args.precisions.split(",") if x]
    if set(precisions) - set(PRECISIONS):
        p.error(f"--precisions: use {', '.join(PRECISIONS)}")
    runs = {x: run_one(x, args) for x in precisions}
    other = run_one("amp_bf16", args, args.bf16_seed) if args.bf16_seed is not None else None
    other_fp8 = run_one("amp_fp8", args, args.fp8_seed) if args.fp8_seed is not None else None
    ok = all(r["ok"] for r in [*runs.values(), other, other_fp8] if r is not None)
    if set(runs) == set(PRECISIONS) and ok:
        pair = other_fp8 if other and other_fp8 and other_fp8["seed"] == other["seed"] else None
        result = report(runs["amp_bf16"], runs["amp_fp8"], out, [r for r in (other, pair) if r is not None])
        return 0 if result[result["verdict"]] else 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
