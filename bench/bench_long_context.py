"""Long context on GPUs: training throughput at 2k-65k tokens per sample, and ALiBi length extrapolation.

Run on the GPU machine (4 minutes on one H200 with the defaults, measured; results in BENCHMARKS.md; the log of
every subprocess goes to --logs, the JSON is rewritten after every run):

    PYTHONPATH=$PWD python bench/bench_long_context.py --json $OUT/long_context.json --logs $OUT/long_logs
    PYTHONPATH=$PWD python bench/bench_long_context.py --parts train --gpus 2 --seq_lens 2048,65536   # one part
    PYTHONPATH=$PWD python bench/bench_long_context.py --parts extrap --extrap_steps 300                # the other

Part ``train``: for each ``--seq_lens`` value, ``composer -n GPUS scripts/train.py --yaml`` (default MPT-1B) with
FSDP2 FULL_SHARD, activation checkpointing of every block and ``--attn`` (default the Triton ALiBi kernel), on
random-token MDS shards written at that length (as ``bench_train.py`` does). The micro-batch keeps the tokens per
micro-batch constant (``--tokens_per_micro`` / seq_len sequences, at least 1); one micro-batch per GPU per step.
Throughput, MFU and peak memory are what the run itself logs (composer's SpeedMonitor over the last half of the
``--steps`` batches, so the first steps with kernel autotuning are left out; MemoryMonitor). MFU counts
``MPTConfig.flops_per_token(seq_len)`` = 6 N + 12 n_layers d_model seq_len (attention in full, causal masking and
activation recomputation not counted) against ``--peak_tflops``; the Triton kernel skips the keys ALiBi makes
negligible, so with it the MFU column can pass 1 at long lengths (work not done, not speed: read tokens/s, and
compare with ``LLMFOUNDRY_ALIBI_SKIP=0``). Measured on one H200, MPT-1B at 65k: 1.5 s per step with skipping
(5.3 s without), about 50 s for the run with startup.

Part ``extrap``: train a small ALiBi MPT (``yamls/tiny-cpu.yaml`` with d_model 512, 8 layers, 8 heads, vocab 4096)
at ``--extrap_seq`` (2048) on the train split of the bundled corpus through ``scripts/train.py``, save a
checkpoint, then ``scripts/eval.py`` scores the held-out split, converted into samples of 2048, 4096 and 8192
tokens, with ``model_overrides.max_seq_len`` raised to the longest (ALiBi has no position table).

The bundled corpus is small: ~315k tokens of train documents (154 samples of 2048) and 6 held-out documents of
~17k tokens, the longest 7,056 tokens. So no single held-out document is 8192 tokens long: each eval length packs
the held-out documents back to back (EOS between them), and every length scores the same first 16,384 held-out
tokens (8 x 2048 = 4 x 4096 = 2 x 8192). Training is sized in epochs, not minutes: 160 steps of 16 x 2048 tokens
are ~17 passes over the corpus (about a minute on an H200 with startup); many more passes only memorize it. The
trainer also scores the held-out samples at --extrap_seq every quarter of the run, so the log shows whether it
overfits (its last value should equal scripts/eval.py's at that length: same weights, same tokens).

CPU at tiny shapes (what tests/test_bench_long_context.py runs, ~90 s on 2 cores; FSDP2 runs over gloo there):

    python bench/bench_long_context.py --device cpu --yaml yamls/tiny-cpu.yaml --seq_lens 128,256 \
        --tokens_per_micro 256 --steps 3 --attn torch --peak_tflops 0.01 --extrap_seq 128 --eval_lens 128,256,512 \
        --extrap_d_model 64 --extrap_layers 2 --extrap_heads 2 --extrap_steps 4 --extrap_batch 4 --eval_batch 8
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "data_prep"))

from bench_train import METRIC, composer_launcher, timing_overrides, write_random_mds  # noqa: E402

EVAL_CE = re.compile(r"metrics/eval/LanguageCrossEntropy\s*:\s*([0-9.eE+-]+)")
TRAIN_LOSS = re.compile(r"loss/train/total\s*:\s*([0-9.eE+-]+)")
GB_PER_GIB = 2**30 / 1e9  # composer's MemoryMonitor logs 1e9-byte gigabytes


# ------------------------------------------------------------------------------------------------ subprocesses
def launcher(device: str, nproc: int) -> list[str]:
    """``composer -n N`` on GPUs; plain python on CPU (one process, no launcher)."""
    if device == "cpu":
        return [sys.executable]
    return [composer_launcher(), "-n", str(nproc)]


def run_logged(cmd: list[str], log_path: Path, timeout: float) -> tuple[int, str, float]:
    """Run ``cmd`` in the repo with its output streamed to ``log_path``; (exit code, log text, seconds).
    A run past ``timeout`` is stopped (its whole process group) and returns 124."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), env.get("PYTHONPATH", "")] if p)
    env.pop("RUN_NAME", None)
    t0 = time.time()
    with open(log_path, "w") as f:
        f.write(shlex.join(cmd) + "\n\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stop_group(proc)
            rc = 124
    return rc, log_path.read_text(errors="replace"), time.time() - t0


def stop_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
            return
        except (subprocess.TimeoutExpired, ProcessLookupError):
            continue


def error_line(text: str, rc: int) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or ln.startswith("error:"):
            return ln[:300]
    return (lines[-1][:300] if lines else "") + f" (exit {rc})"


def logged_metrics(text: str) -> dict:
    """The last throughput/MFU values the run logged, and the highest peak memory (in GiB)."""
    values: dict[str, list[float]] = {}
    for key, val in METRIC.findall(text):
        values.setdefault(key.split("/")[-1], []).append(float(val))
    out = {k: v[-1] for k, v in values.items() if not k.startswith("peak_")}
    for k in ("peak_allocated_mem", "peak_reserved_mem"):
        if k in values:
            out[k.replace("_mem", "_gib")] = max(values[k]) / GB_PER_GIB
    return out


# ----------------------------------------------------------------------------------------- part 1: training
def micro_batch(seq_len: int, tokens_per_micro: int) -> int:
    return max(1, tokens_per_micro // seq_len)


def train_overrides(args, seq_len: int, mb: int, data: Path) -> list[str]:
    o = timing_overrides(data, args.attn, args.steps, mb, mb * args.gpus, f"long-seq{seq_len}-{args.gpus}gpu",
                         window=max(1, args.steps // 2), peak_tflops=args.peak_tflops, log_interval=1)
    o += [f"train_loader.max_seq_len={seq_len}", f"variables.seq_len={seq_len}", f"model.max_seq_len={seq_len}",
          "callbacks.memory_monitor=true", "callbacks.runtime_estimator=false"]
    if args.fsdp == "none":
        o += ["fsdp=null", "model.init_device=cpu"]
    else:
        o += [f"fsdp.version={args.fsdp}", "fsdp.sharding_strategy=FULL_SHARD", "fsdp.activation_checkpointing=true"]
    if args.device == "cpu":
        o += ["device=cpu"]
    return o + list(args.train_extra)


def model_config(yaml: str, overrides: list[str]):
    from llmfoundry.train.config import load_config
    return load_config(yaml, overrides).model


def run_train(args, seq_len: int, data_root: Path, logs: Path) -> dict:
    mb = micro_batch(seq_len, args.tokens_per_micro)
    n = mb * args.gpus * (args.steps + 2) + 2 * args.gpus
    data = data_root / f"random-seq{seq_len}-n{n}"
    overrides = train_overrides(args, seq_len, mb, data)
    mcfg = model_config(args.yaml, overrides)
    write_random_mds(data, n, seq_len, mcfg.vocab_size)
    cmd = [*launcher(args.device, args.gpus), str(REPO / "scripts/train.py"), str(args.yaml), *overrides]
    rc, text, wall = run_logged(cmd, logs / f"train-seq{seq_len}-{args.gpus}gpu.log", args.timeout)
    fpt = mcfg.flops_per_token(seq_len)
    row = {"seq_len": seq_len, "micro_batch": mb, "gpus": args.gpus, "tokens_per_step": mb * seq_len * args.gpus,
           "flops_per_token": fpt, "ok": rc == 0, "wall_s": round(wall, 1)}
    if rc != 0:
        row["error"] = error_line(text, rc)
        return row
    row.update(logged_metrics(text))
    tps = row.get("tokens_per_sec")
    row["tflops_per_gpu"] = tps * fpt / 1e12 if tps else None
    row.setdefault("mfu", tps * fpt / (args.peak_tflops * 1e12) if tps else None)
    return row


def train_table(rows: list[dict], peak_tflops: float) -> str:
    lines = [f"MFU against {peak_tflops:g} TFLOP/s per GPU; FLOPs/token = 6N + 12*L*d*seq_len "
             "(activation recomputation not counted; attention counted in full, including keys a kernel skips)",
             "",
             "| seq_len | micro batch | tokens/s/GPU | MFU | TFLOP/s/GPU | peak allocated GiB | wall s |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if not r["ok"]:
            lines.append(f"| {r['seq_len']} | {r['micro_batch']} | FAILED: {r.get('error')} | | | | {r['wall_s']} |")
            continue
        lines.append(f"| {r['seq_len']} | {r['micro_batch']} | {fmt(r.get('tokens_per_sec'), ',.0f')} | "
                     f"{fmt(r.get('mfu'), '.3f')} | {fmt(r.get('tflops_per_gpu'), '.1f')} | "
                     f"{fmt(r.get('peak_allocated_gib'), '.1f')} | {r['wall_s']} |")
    return "\n".join(lines)


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


# ----------------------------------------------------------------------------- part 2: ALiBi extrapolation
def bundled_splits() -> dict[str, list[str]]:
    """The tiny default corpus split as its MDS shards are (every 20th document held out)."""
    from llmfoundry.data.bundled import corpus_documents, split_documents
    return split_documents(corpus_documents())


def convert_split(texts: list[str], out: Path, seq_len: int) -> dict:
    """Pack ``texts`` into MDS samples of ``seq_len`` tokens (the project's converter, bundled tokenizer)."""
    from llmfoundry.data import DataError
    from llmfoundry.data.convert import ConvertConfig, convert
    from llmfoundry.data.readers import TextList
    cfg = ConvertConfig(out_root=str(out), tokenizer="bundled", concat_tokens=seq_len, compression=None,
                        overwrite=True, progress=False)
    try:
        s = convert(TextList(tuple(texts)), cfg)
    except DataError as e:
        return {"seq_len": seq_len, "documents": len(texts), "samples": 0, "error": str(e)}
    return {"seq_len": seq_len, "documents": s.documents, "samples": s.samples, "tokens": s.tokens,
            "dropped_tokens": s.dropped_tokens}


def extrap_train_overrides(args, data: Path, ckpt: Path) -> list[str]:
    s, n = args.extrap_seq, args.extrap_steps
    o = [f"model.d_model={args.extrap_d_model}", f"model.n_heads={args.extrap_heads}",
         f"model.n_layers={args.extrap_layers}", f"variables.seq_len={s}", f"model.max_seq_len={s}",
         f"model.attn_config.attn_impl={args.extrap_attn or args.attn}", "model.attn_config.alibi=true",
         "model.learned_pos_emb=false", f"model.resid_pdrop={args.extrap_dropout}",
         f"model.emb_pdrop={args.extrap_dropout}",
         f"train_loader.local={data}", "train_loader.split=train", f"train_loader.max_seq_len={s}",
         f"eval_loader.local={data}", "eval_loader.split=val", f"eval_loader.max_seq_len={s}",
         f"global_train_batch_size={args.extrap_batch}", f"device_train_microbatch_size={args.extrap_batch}",
         f"device_eval_batch_size={min(args.extrap_batch, 8)}", "eval_subset_num_batches=-1",
         f"max_duration={n}ba", f"eval_interval={max(1, n // 4)}ba",
         f"optimizer.lr={args.extrap_lr}", f"scheduler.t_warmup={max(1, n // 10)}ba",
         f"save_folder={ckpt}", f"save_interval={n}ba", "save_num_checkpoints_to_keep=1", "autoresume=false",
         "run_name=long-extrap", "loggers={}", f"console_log_interval={max(1, n // 10)}ba", "progress_bar=false",
         "callbacks.runtime_estimator=false", f"callbacks.speed_monitor.gpu_flops_available={args.peak_tflops * 1e12}"]
    if args.device == "cpu":
        o += ["device=cpu"]
    return o + list(args.extrap_extra)


def eval_config(args, ckpt: str, data_root: Path, lens: list[int], results: Path) -> dict:
    loaders = {f"len{n}": {"local": str(data_root / f"seq{n}"), "split": "val", "max_seq_len": n, "shuffle": False,
                           "drop_last": False, "num_workers": 0} for n in lens}
    return {"load_path": ckpt, "model_overrides": {"max_seq_len": max(lens)},
            "device": "cpu" if args.device == "cpu" else "gpu",
            "precision": "fp32" if args.device == "cpu" else "amp_bf16",  # as trained: fp32 weights, bf16 autocast
            "device_eval_batch_size": args.eval_batch, "eval_loaders": loaders, "results_path": str(results)}


def prepare_bundled(args, root: Path, out: dict) -> list[int]:
    """Convert the train split at ``--extrap_seq`` and the held-out split at every length into ``root``; record
    what was written in ``out`` and return the eval lengths the held-out text is long enough for."""
    splits = bundled_splits()
    eval_lens = sorted(set(args.eval_lens))
    tr = convert_split(splits["train"], root / f"seq{args.extrap_seq}" / "train", args.extrap_seq)
    val = {n: convert_split(splits["val"], root / f"seq{n}" / "val", n) for n in sorted({args.extrap_seq, *eval_lens})}
    out["data"] = {"train": tr, "val": list(val.values())}
    usable = [n for n in eval_lens if val[n]["samples"] > 0]
    for n in eval_lens:
        if n not in usable:
            out["notes"].append(f"eval length {n}: the held-out text is shorter than one {n}-token sample; skipped")
    if tr["samples"] == 0 or val[args.extrap_seq]["samples"] == 0:
        return []
    v = val[args.extrap_seq]
    out["notes"].append(f"bundled train split: {tr['documents']} documents, {tr['tokens'] + tr['dropped_tokens']:,} "
                        f"tokens -> {tr['samples']} samples of {args.extrap_seq}")
    out["notes"].append(f"held-out split: {v['documents']} documents, {v['tokens'] + v['dropped_tokens']:,} tokens; "
                        "each eval length packs them back to back (EOS between documents), so a long sample spans "
                        "several documents; samples per length: "
                        + ", ".join(f"{n}: {val[n]['samples']} x {n}" for n in usable))
    return usable


def train_extrap_model(args, data: Path, ckpt_dir: Path, logs: Path, out: dict) -> Path | None:
    """``scripts/train.py yamls/tiny-cpu.yaml`` + overrides; the saved checkpoint, or None when training failed."""
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    yaml = str(REPO / "yamls/tiny-cpu.yaml")
    overrides = extrap_train_overrides(args, data, ckpt_dir)
    mcfg = model_config(yaml, overrides)
    train_samples = out["data"]["train"]["samples"]
    t = out["train"] = {"params": mcfg.num_params(), "seq_len": args.extrap_seq, "steps": args.extrap_steps,
                        "batch": args.extrap_batch, "epochs": args.extrap_steps * args.extrap_batch / train_samples}
    cmd = [*launcher(args.device, 1), str(REPO / "scripts/train.py"), yaml, *overrides]
    rc, text, wall = run_logged(cmd, logs / "extrap-train.log", args.timeout)
    t.update(ok=rc == 0, wall_s=round(wall, 1), train_loss=[float(x) for x in TRAIN_LOSS.findall(text)],
             heldout_loss_during_training=[float(x) for x in EVAL_CE.findall(text)])
    t.update({k: v for k, v in logged_metrics(text).items() if k in ("tokens_per_sec", "mfu")})
    ckpt = ckpt_dir / "latest-rank0.pt"
    if rc != 0 or not ckpt.exists():
        out["error"] = f"extrap training failed: {error_line(text, rc)}"
        return None
    return ckpt.resolve()


def eval_extrap_model(args, ckpt: Path, root: Path, lens: list[int], logs: Path, out: dict) -> bool:
    """``scripts/eval.py`` on the held-out samples of every length, max_seq_len raised to the longest."""
    results_path = logs / "extrap-eval.json"
    results_path.unlink(missing_ok=True)
    eval_yaml = logs / "extrap-eval.yaml"
    eval_yaml.write_text(json.dumps(eval_config(args, str(ckpt), root, lens, results_path), indent=1))  # JSON is YAML
    rc, text, wall = run_logged([sys.executable, str(REPO / "scripts/eval.py"), str(eval_yaml)],
                                logs / "extrap-eval.log", args.timeout)
    out["eval_wall_s"] = round(wall, 1)
    if rc != 0 or not results_path.exists():
        out["error"] = f"extrap eval failed: {error_line(text, rc)}"
        return False
    ppl = json.loads(results_path.read_text())["perplexity"]
    samples = {v["seq_len"]: v["samples"] for v in out["data"]["val"]}
    out["eval"] = [{"eval_len": n, "samples": samples[n], **ppl[f"len{n}"]} for n in lens]
    return True


def run_extrap(args, data_root: Path, logs: Path) -> dict:
    out: dict = {"ok": False, "notes": []}
    root = data_root / "bundled"
    lens = prepare_bundled(args, root, out)
    if not lens:
        out["error"] = "not enough bundled text at these lengths: " + json.dumps(out["data"])
        return out
    ckpt = train_extrap_model(args, root / f"seq{args.extrap_seq}", data_root / "extrap-checkpoints", logs, out)
    out["ok"] = ckpt is not None and eval_extrap_model(args, ckpt, root, lens, logs, out)
    return out


def extrap_table(out: dict) -> str:
    t = out.get("train", {})
    lines = [f"ALiBi extrapolation: {t.get('params', 0) / 1e6:.1f}M-parameter model trained at {t.get('seq_len')} "
             f"tokens for {t.get('steps')} steps x {t.get('batch')} samples ({t.get('epochs', 0):.1f} epochs of the "
             f"bundled train split, {t.get('wall_s')} s); held-out loss during training: "
             f"{', '.join(f'{x:.3f}' for x in t.get('heldout_loss_during_training', [])) or '-'}", "",
             "| eval_len | samples | tokens scored | loss | perplexity |", "|---:|---:|---:|---:|---:|"]
    for r in out.get("eval", []):
        lines.append(f"| {r['eval_len']} | {r['samples']} | {r['tokens']} | {r['loss']:.4f} | {r['perplexity']:.3f} |")
    lines += [f"note: {n}" for n in out.get("notes", [])]
    if out.get("error"):
        lines.append(f"FAILED: {out['error']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ main
def int_list(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="train,extrap", help="comma-separated: train, extrap")
    p.add_argument("--device", choices=["gpu", "cpu"], default="gpu",
                   help="cpu: plain python subprocesses with device=cpu (tiny shapes, for the test)")
    p.add_argument("--logs", default="/tmp/long_logs", help="every subprocess's log, the eval config and results")
    p.add_argument("--data", default="/tmp/long_context_data", help="MDS shards and the extrapolation checkpoint")
    p.add_argument("--json", default=None)
    p.add_argument("--timeout", type=float, default=300, help="seconds per subprocess (then it is stopped)")
    p.add_argument("--peak_tflops", type=float, default=989.0, help="per-GPU peak for MFU (H100/H200 SXM bf16)")
    p.add_argument("--attn", default="triton", help="attn_impl for both parts")
    # part 1
    p.add_argument("--yaml", default=str(REPO / "yamls/mpt-1b.yaml"))
    p.add_argument("--seq_lens", type=int_list, default=[2048, 16384, 65536])
    p.add_argument("--tokens_per_micro", type=int, default=65536, help="micro batch = this // seq_len (>= 1)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--fsdp", choices=["2", "1", "none"], default="2",
                   help="fsdp.version with FULL_SHARD + activation checkpointing, or none (fsdp=null)")
    p.add_argument("--train_extra", nargs="*", default=[], help="more key=value overrides for the part-1 runs")
    # part 2
    p.add_argument("--extrap_seq", type=int, default=2048)
    p.add_argument("--eval_lens", type=int_list, default=[2048, 4096, 8192])
    p.add_argument("--extrap_d_model", type=int, default=512)
    p.add_argument("--extrap_layers", type=int, default=8)
    p.add_argument("--extrap_heads", type=int, default=8)
    p.add_argument("--extrap_steps", type=int, default=160)
    p.add_argument("--extrap_batch", type=int, default=16, help="samples per step (one micro-batch)")
    p.add_argument("--extrap_lr", type=float, default=5e-4, help="LION learning rate")
    p.add_argument("--extrap_dropout", type=float, default=0.1, help="resid_pdrop and emb_pdrop")
    p.add_argument("--extrap_attn", default=None, help="attn_impl of the extrapolation model (default: --attn)")
    p.add_argument("--eval_batch", type=int, default=1, help="device_eval_batch_size of scripts/eval.py")
    p.add_argument("--extrap_extra", nargs="*", default=[], help="more key=value overrides for the extrap training")
    args = p.parse_args(argv)
    args.yaml = str(Path(args.yaml).resolve() if Path(args.yaml).exists() else REPO / args.yaml)
    args.parts = [x for x in args.parts.split(",") if x]
    unknown = set(args.parts) - {"train", "extrap"}
    if unknown:
        p.error(f"unknown --parts {sorted(unknown)}; use train, extrap")
    return args


def all_finite(results: dict) -> bool:
    """True when every run succeeded and every number in the tables is finite."""
    rows = results.get("train", [])
    ok = all(r["ok"] and r.get("tokens_per_sec") and math.isfinite(r["tokens_per_sec"]) for r in rows)
    ex = results.get("extrap")
    if ex is not None:
        ok = ok and ex["ok"] and all(math.isfinite(r["loss"]) for r in ex["eval"])
    return ok


def save(results: dict, path: str | None) -> None:
    """Write the JSON after every run, so a run stopped part-way still leaves what it measured."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(results, indent=1))


def main(argv=None) -> dict:
    args = parse_args(argv)
    logs, data = Path(args.logs).resolve(), Path(args.data).resolve()
    logs.mkdir(parents=True, exist_ok=True)
    data.mkdir(parents=True, exist_ok=True)
    results: dict = {"args": dict(vars(args)), "ok": False}
    t0 = time.time()
    for part in args.parts:
        if part == "train":
            results["train"] = []
            for s in args.seq_lens:
                results["train"].append(run_train(args, s, data, logs))
                print(json.dumps(results["train"][-1]), flush=True)
                save(results, args.json)
            print("\n" + train_table(results["train"], args.peak_tflops) + "\n", flush=True)
        else:
            results["extrap"] = run_extrap(args, data, logs)
            print("\n" + extrap_table(results["extrap"]) + "\n", flush=True)
        save(results, args.json)
    results["wall_s"] = round(time.time() - t0, 1)
    results["ok"] = all_finite(results)
    save(results, args.json)
    print(f"total {results['wall_s']} s, {'all runs ok' if results['ok'] else 'SOME RUNS FAILED'}; logs in {logs}",
          flush=True)
    return results


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
