r"""Long context on GPUs: training throughput at 2k-65k tokens per sample, and ALiBi length extrapolation.

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
compare with ``--skip off``). Measured on one H200, MPT-1B at 65k: 1.5 s per step with skipping (5.3 s without),
about 50 s for the run with startup.

``--skip on|off|both`` (default on; off when ``LLMFOUNDRY_ALIBI_SKIP=0`` is set in the calling shell): each run
gets ``LLMFOUNDRY_ALIBI_SKIP=1`` (the kernel skips far keys) or ``=0`` in its environment; ``both`` runs every
length twice and the table gives both tokens/s and the speed-up (also ``train_skip_speedup`` in the JSON).

``--weights init|trained`` (default init: initialised weights on random tokens, as above). ``trained``: first a
pretraining run, ``scripts/train.py --yaml`` at ``--pretrain_seq`` (2048) for ``--pretrain_steps`` (200) steps
of ``--pretrain_batch`` (16) samples on the real text in ``--text DIR`` (``DIR/tokenizer``, ``DIR/mds/train``:
packed ``tokens`` samples, as ``bench/fp8_quality.py build-data --out .fp8data`` writes them: Python source,
16384-token BPE), LION at ``--pretrain_lr`` (1e-4; the recipe's 6.7e-5 is set for a 26B-token run of 512-sample
batches) after a warm-up of a tenth of the steps, cosine to 0.1x, eager, model.vocab_size set from the tokenizer;
it saves a weights-only checkpoint (one file, ``fsdp.state_dict_type=full``) under ``--data``. Its first and last
losses, steps, tokens and wall time go to ``pretrain`` in the JSON. ``--pretrained PATH`` reuses such a checkpoint
instead. Then every row loads it (``load_path=... load_weights_only=true``; the row records the path composer's
log says it loaded) and trains on the same text, ``DIR/mds/train``'s samples concatenated in order and cut into
samples of the row's length (``text-seq<S>-n<N>`` under ``--data``). Rows and tables are labelled with the
weights (``initialised`` / ``trained (N steps x B x S tokens of real text)``) and the data (``random tokens`` /
``real text``). The vocabulary differs from the random-token rows (16384 against the recipe's 50432), so compare
skipping on and off within one run, not trained rows with initialised ones.

Trained weights, skipping on and off, one command (``.fp8data`` built here first with
``.venv/bin/python bench/fp8_quality.py build-data --out .fp8data``, ~2 minutes on 2 CPU cores, and carried:
``carry: [".fp8data"]``). On one H100 it took 527 s, inside one 600-second call: the pretraining (200 x 16 x 2048
= 6.6M tokens at ~61k tokens/s, its startup and the ~5 GB fp32 checkpoint) 210 s, then 61-103 s per row (65k
first, the pair that matters most if a call is cut short). The JSON is rewritten after every run, so a run cut
short still returns what it measured::

    PYTHONPATH=$PWD python bench/bench_long_context.py --parts train --weights trained --text .fp8data \
        --skip both --seq_lens 65536,16384 --train_extra compile_config=null --json $OUT/long_trained.json \
        --logs /tmp/long_logs

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

CPU at tiny shapes (what tests/test_bench_long_context.py runs, ~30 s and ~20 s on 2 cores; FSDP2 runs over gloo
there; the second needs a text folder, which the test builds from the bundled corpus at 2048 tokens per sample):

    python bench/bench_long_context.py --device cpu --yaml yamls/tiny-cpu.yaml --seq_lens 128,256 \
        --tokens_per_micro 256 --steps 3 --attn torch --peak_tflops 0.01 --extrap_seq 128 --eval_lens 128,256,512 \
        --extrap_d_model 64 --extrap_layers 2 --extrap_heads 2 --extrap_steps 4 --extrap_batch 4 --eval_batch 8
    python bench/bench_long_context.py --parts train --device cpu --yaml yamls/tiny-cpu.yaml --seq_lens 256 \
        --tokens_per_micro 512 --steps 3 --attn torch --peak_tflops 0.01 --weights trained --text DIR --skip both \
        --pretrain_seq 128 --pretrain_steps 8 --pretrain_batch 4 --pretrain_lr 2e-3
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
WEIGHTS_LOADED = re.compile(r"Model weights loaded from (\S+)")  # composer's log line once load_path is loaded
GB_PER_GIB = 2**30 / 1e9  # composer's MemoryMonitor logs 1e9-byte gigabytes


# ------------------------------------------------------------------------------------------------ subprocesses
def launcher(device: str, nproc: int) -> list[str]:
    """``composer -n N`` on GPUs; plain python on CPU (one process, no launcher)."""
    if device == "cpu":
        return [sys.executable]
    return [composer_launcher(), "-n", str(nproc)]


def run_logged(cmd: list[str], log_path: Path, timeout: float,
               env_vars: dict[str, str] | None = None) -> tuple[int, str, float]:
    """Run ``cmd`` in the repo with its output streamed to ``log_path``; (exit code, log text, seconds).
    ``env_vars`` are set in its environment (and written before the command on the log's first line).
    A run past ``timeout`` is stopped (its whole process group) and returns 124."""
    env_vars = env_vars or {}
    env = dict(os.environ, PYTHONUNBUFFERED="1", **env_vars)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), env.get("PYTHONPATH", "")] if p)
    env.pop("RUN_NAME", None)
    t0 = time.time()
    with open(log_path, "w") as f:
        f.write("".join(f"{k}={shlex.quote(v)} " for k, v in env_vars.items()) + shlex.join(cmd) + "\n\n")
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


def fsdp_overrides(args, full_state_dict: bool) -> list[str]:
    """``--fsdp`` for a run; ``full_state_dict``: checkpoints as one whole file (what the trained rows load)."""
    if args.fsdp == "none":
        return ["fsdp=null", "model.init_device=cpu"]
    return [f"fsdp.version={args.fsdp}"] + (["fsdp.state_dict_type=full"] if full_state_dict else [])


def train_overrides(args, seq_len: int, mb: int, data: Path, start: dict | None = None) -> list[str]:
    """One timing row on the MDS shards at ``data``; ``start`` (trained weights, see ``trained_start``): the
    tokenizer, vocab size and checkpoint the row starts from, else initialised weights and random tokens."""
    o = timing_overrides(data, args.attn, args.steps, mb, mb * args.gpus, f"long-seq{seq_len}-{args.gpus}gpu",
                         window=max(1, args.steps // 2), peak_tflops=args.peak_tflops, log_interval=1)
    o += [f"train_loader.max_seq_len={seq_len}", f"variables.seq_len={seq_len}", f"model.max_seq_len={seq_len}",
          "callbacks.memory_monitor=true", "callbacks.runtime_estimator=false"]
    if args.fsdp != "none":
        o += ["fsdp.sharding_strategy=FULL_SHARD", "fsdp.activation_checkpointing=true"]
    o += fsdp_overrides(args, full_state_dict=start is not None)
    if start is not None:
        o = [x for x in o if not x.startswith("tokenizer=")]
        o += [f"tokenizer={start['tokenizer']}", f"model.vocab_size={start['vocab_size']}",
              f"load_path={start['checkpoint']}", "load_weights_only=true"]
    if args.device == "cpu":
        o += ["device=cpu"]
    return o + list(args.train_extra)


def model_config(yaml: str, overrides: list[str]):
    from llmfoundry.train.config import load_config
    return load_config(yaml, overrides).model


def row_samples(args, seq_len: int) -> int:
    """Samples a timing row reads: its steps plus two, and a little more (no epoch boundary inside the run)."""
    return micro_batch(seq_len, args.tokens_per_micro) * args.gpus * (args.steps + 2) + 2 * args.gpus


def row_data(args, seq_len: int, data_root: Path, start: dict | None) -> tuple[Path, dict]:
    """The MDS shards a row trains on, written once per length: random tokens below the model's vocab_size, or
    (``start``) the real text repacked at ``seq_len``. Returns (folder, what it holds)."""
    n = row_samples(args, seq_len)
    if start is None:
        data = data_root / f"random-seq{seq_len}-n{n}"
        vocab_size = model_config(args.yaml, train_overrides(args, seq_len, 1, data)).vocab_size
        return write_random_mds(data, n, seq_len, vocab_size), {}
    folder = data_root / f"text-seq{seq_len}-n{n}"
    return folder, repack_text(Path(args.text) / "mds" / "train", folder, seq_len, n)


def skip_env(skip: str) -> dict[str, str]:
    """The row's LLMFOUNDRY_ALIBI_SKIP: the Triton kernel skips ALiBi-negligible far keys unless it is 0."""
    return {"LLMFOUNDRY_ALIBI_SKIP": "1" if skip == "on" else "0"}


def skip_modes(skip: str) -> list[str]:
    return ["on", "off"] if skip == "both" else [skip]


def log_name(args, seq_len: int, skip: str) -> str:
    """train-seq<S>-<G>gpu[-trained][-noskip].log (the names of the default run unchanged)."""
    return (f"train-seq{seq_len}-{args.gpus}gpu" + ("-trained" if args.weights == "trained" else "")
            + ("-noskip" if skip == "off" else "") + ".log")


def run_train(args, seq_len: int, data: Path, logs: Path, skip: str, start: dict | None, labels: dict) -> dict:
    """One ``scripts/train.py`` timing run at ``seq_len`` on the shards at ``data``; the row for the table."""
    mb = micro_batch(seq_len, args.tokens_per_micro)
    overrides = train_overrides(args, seq_len, mb, data, start)
    mcfg = model_config(args.yaml, overrides)
    cmd = [*launcher(args.device, args.gpus), str(REPO / "scripts/train.py"), str(args.yaml), *overrides]
    rc, text, wall = run_logged(cmd, logs / log_name(args, seq_len, skip), args.timeout, skip_env(skip))
    fpt = mcfg.flops_per_token(seq_len)
    row = {"seq_len": seq_len, "micro_batch": mb, "gpus": args.gpus, "tokens_per_step": mb * seq_len * args.gpus,
           "flops_per_token": fpt, "skip": skip, **labels, "ok": rc == 0, "wall_s": round(wall, 1)}
    if start is not None:
        loaded = WEIGHTS_LOADED.search(text)
        row.update(load_path=start["checkpoint"], loaded_from=loaded.group(1) if loaded else None)
    if rc != 0:
        row["error"] = error_line(text, rc)
        return row
    row.update(logged_metrics(text))
    losses = [float(x) for x in TRAIN_LOSS.findall(text)]
    if losses:
        row["loss_first"], row["loss_last"] = losses[0], losses[-1]
    tps = row.get("tokens_per_sec")
    row["tflops_per_gpu"] = tps * fpt / 1e12 if tps else None
    row.setdefault("mfu", tps * fpt / (args.peak_tflops * 1e12) if tps else None)
    return row


def failed_row(seq_len: int, mb: int, skip: str, labels: dict, error: str) -> dict:
    return {"seq_len": seq_len, "micro_batch": mb, "skip": skip, **labels, "ok": False, "wall_s": 0.0, "error": error}


def run_train_part(args, data_root: Path, logs: Path, results: dict) -> None:
    """Part ``train``: (with ``--weights trained``) the pretraining run or ``--pretrained``, then every
    ``--seq_lens`` value once per ``--skip`` mode; ``results`` is saved after every run."""
    rows = results["train"] = []
    start = None
    if args.weights == "trained":
        start = trained_start(args, data_root, logs, results)
        save(results, args.json)
    labels = row_labels(args, results.get("pretrain"))
    for s in args.seq_lens:
        mb = micro_batch(s, args.tokens_per_micro)
        if args.weights == "trained" and start is None:
            rows += [failed_row(s, mb, k, labels, "no trained checkpoint (pretraining failed)")
                     for k in skip_modes(args.skip)]
            continue
        try:
            data, written = row_data(args, s, data_root, start)
        except ValueError as e:  # not enough text for the row
            rows += [failed_row(s, mb, k, labels, str(e)) for k in skip_modes(args.skip)]
            continue
        for k in skip_modes(args.skip):
            rows.append(run_train(args, s, data, logs, k, start, {**labels, **written}))
            print(json.dumps(rows[-1]), flush=True)
            save(results, args.json)
    results["train_skip_speedup"] = skip_speedups(rows)


def skip_speedups(rows: list[dict]) -> list[dict]:
    """tokens/s with skipping on over off, for each length that ran both ways."""
    out = []
    for on in (r for r in rows if r.get("skip") == "on"):
        off = next((r for r in rows if r.get("skip") == "off" and r["seq_len"] == on["seq_len"]), None)
        if off is not None:
            a, b = on.get("tokens_per_sec"), off.get("tokens_per_sec")
            out.append({"seq_len": on["seq_len"], "on_tokens_per_sec": a, "off_tokens_per_sec": b,
                        "speedup": a / b if a and b else None})
    return out


def train_table(rows: list[dict], peak_tflops: float) -> str:
    """One line per run, or with both skip modes one line per length: both tokens/s and the speed-up."""
    labels = sorted({f"weights: {r.get('weights', '-')}; data: {r.get('data', '-')}" for r in rows})
    lines = [f"MFU against {peak_tflops:g} TFLOP/s per GPU; FLOPs/token = 6N + 12*L*d*seq_len "
             "(activation recomputation not counted; attention counted in full, including keys a kernel skips)",
             *labels, ""]
    if {r.get("skip") for r in rows} == {"on", "off"}:
        return "\n".join(lines + skip_table(rows))
    lines += ["| seq_len | micro batch | weights | data | skipping | tokens/s/GPU | MFU | TFLOP/s/GPU | "
              "peak allocated GiB | wall s |", "|---:|---:|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        head = f"| {r['seq_len']} | {r['micro_batch']} | {r.get('weights', '-')} | {r.get('data', '-')} | " \
               f"{r.get('skip', '-')} |"
        if not r["ok"]:
            lines.append(f"{head} FAILED: {r.get('error')} | | | | {r['wall_s']} |")
            continue
        lines.append(f"{head} {fmt(r.get('tokens_per_sec'), ',.0f')} | {fmt(r.get('mfu'), '.3f')} | "
                     f"{fmt(r.get('tflops_per_gpu'), '.1f')} | {fmt(r.get('peak_allocated_gib'), '.1f')} | "
                     f"{r['wall_s']} |")
    return "\n".join(lines)


def skip_table(rows: list[dict]) -> list[str]:
    lines = ["| seq_len | micro batch | weights | data | skipping on: tokens/s/GPU | off: tokens/s/GPU | speed-up | "
             "off: MFU | peak allocated GiB on / off | wall s on / off |",
             "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for s in dict.fromkeys(r["seq_len"] for r in rows):
        on = next((r for r in rows if r["seq_len"] == s and r["skip"] == "on"), {})
        off = next((r for r in rows if r["seq_len"] == s and r["skip"] == "off"), {})
        first = on or off
        a, b = on.get("tokens_per_sec"), off.get("tokens_per_sec")
        errors = "; ".join(f"{k}: FAILED: {r.get('error')}" for k, r in (("on", on), ("off", off))
                           if r and not r["ok"])
        lines.append(f"| {s} | {first['micro_batch']} | {first.get('weights', '-')} | {first.get('data', '-')} | "
                     f"{fmt(a, ',.0f')} | {fmt(b, ',.0f')} | {fmt(a / b if a and b else None, '.2f', 'x')} | "
                     f"{fmt(off.get('mfu'), '.3f')} | {fmt(on.get('peak_allocated_gib'), '.1f')} / "
                     f"{fmt(off.get('peak_allocated_gib'), '.1f')} | {on.get('wall_s', '-')} / "
                     f"{off.get('wall_s', '-')} |" + (f" {errors}" if errors else ""))
    return lines


def fmt(x, spec: str, unit: str = "") -> str:
    return "-" if x is None else format(x, spec) + unit


# ------------------------------------------------------------------------- part 1 with trained weights
def mds_samples(split_dir: Path, scratch: Path):
    """Each sample's ``tokens`` (int32) of the MDS folder ``split_dir``, in order (shards may sit in part-NNNNN/
    folders, as the converters write them with several processes). Compressed shards (the converters' zstd) are
    decompressed one at a time into ``scratch``, which is removed afterwards."""
    import numpy as np
    from streaming.base.compression import decompress
    from streaming.base.format import reader_from_json
    index = json.loads((split_dir / "index.json").read_text())
    try:
        for info in index["shards"]:
            folder, raw = split_dir, info["raw_data"]["basename"]
            if not (split_dir / raw).exists():
                (scratch / raw).parent.mkdir(parents=True, exist_ok=True)
                packed = (split_dir / info["zip_data"]["basename"]).read_bytes()
                (scratch / raw).write_bytes(decompress(info["compression"], packed))
                folder = scratch
            shard = reader_from_json(str(folder), None, info)
            for i in range(shard.samples):
                yield np.asarray(shard[i]["tokens"], dtype=np.int32)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def repack_text(src: Path, root: Path, seq_len: int, n_samples: int | None) -> dict:
    """The samples of the MDS folder ``src`` concatenated in order and cut every ``seq_len`` tokens into
    ``n_samples`` samples (None: all the text holds), written to ``root/train`` in ``write_random_mds``'s layout.
    Raises ValueError when ``src`` holds fewer tokens than asked for."""
    import numpy as np
    from streaming import MDSWriter
    shutil.rmtree(root, ignore_errors=True)
    pending, have, written, read = [], 0, 0, 0
    with MDSWriter(out=str(root / "train"), columns={"tokens": "ndarray:int32"}, size_limit="64mb") as w:
        for tokens in mds_samples(src, root / "scratch"):
            if n_samples is not None and written == n_samples:
                break
            pending.append(tokens)
            have += len(tokens)
            read += 1
            while have >= seq_len and (n_samples is None or written < n_samples):
                flat = np.concatenate(pending)
                w.write({"tokens": flat[:seq_len]})
                written += 1
                pending, have = [flat[seq_len:]], have - seq_len
    if n_samples is not None and written < n_samples:
        raise ValueError(f"{src} holds {written * seq_len + have:,} tokens, fewer than the {n_samples} samples of "
                         f"{seq_len} this row reads ({n_samples * seq_len:,} tokens)")
    return {"text_samples": written, "text_source_samples_read": read, "text_source": str(src)}


def text_vocab_size(text: Path) -> int:
    """model.vocab_size for the tokenizer in ``text/tokenizer`` (its length rounded up to a multiple of 64)."""
    from llmfoundry.data.tokenizer import load_tokenizer, padded_vocab_size
    return padded_vocab_size(load_tokenizer(str(text / "tokenizer")))


def pretrain_overrides(args, data: Path, vocab_size: int, ckpt_dir: Path) -> list[str]:
    """``--yaml`` as a short pretraining run on the real text at ``data``, ending in a weights-only checkpoint."""
    s, n, b = args.pretrain_seq, args.pretrain_steps, args.pretrain_batch
    mb = max(1, min(args.pretrain_micro, b // args.gpus))
    o = [f"tokenizer={Path(args.text).resolve() / 'tokenizer'}", f"model.vocab_size={vocab_size}",
         "train_loader.streams=null", f"train_loader.local={data}", "train_loader.split=train",
         f"train_loader.max_seq_len={s}", f"variables.seq_len={s}", f"model.max_seq_len={s}",
         "train_loader.num_workers=2", "eval_loader=null", f"model.attn_config.attn_impl={args.attn}",
         f"max_duration={n}ba", f"global_train_batch_size={b}", f"device_train_microbatch_size={mb}",
         f"optimizer.lr={args.pretrain_lr}", f"scheduler.t_warmup={max(1, n // 10)}ba", "compile_config=null",
         f"save_folder={ckpt_dir}", f"save_interval={n}ba", "save_num_checkpoints_to_keep=1",
         "save_weights_only=true", "autoresume=false", "run_name=long-pretrain", "loggers={}",
         "console_log_interval=1ba", "progress_bar=false", "callbacks.runtime_estimator=false",
         f"callbacks.speed_monitor.gpu_flops_available={args.peak_tflops * 1e12}"]
    o += fsdp_overrides(args, full_state_dict=True)
    if args.device == "cpu":
        o += ["device=cpu"]
    return o + list(args.pretrain_extra)


def source_seq_len(split_dir: Path, scratch: Path) -> int:
    """Tokens per sample of the MDS folder ``split_dir`` (its first sample's)."""
    samples = mds_samples(split_dir, scratch)
    try:
        return len(next(samples))
    finally:
        samples.close()


def pretrain(args, data_root: Path, logs: Path, vocab_size: int) -> dict:
    """The pretraining phase: ``scripts/train.py --yaml`` on ``--text`` at ``--pretrain_seq`` (the text's samples
    as they are at their own length, else repacked), saving a weights-only checkpoint under ``data_root``."""
    src = Path(args.text).resolve() / "mds" / "train"
    p = {"seq_len": args.pretrain_seq, "steps": args.pretrain_steps, "batch": args.pretrain_batch,
         "tokens": args.pretrain_steps * args.pretrain_batch * args.pretrain_seq, "lr": args.pretrain_lr,
         "warmup_steps": max(1, args.pretrain_steps // 10), "text": str(src), "ok": False}
    data = src.parent
    if source_seq_len(src, data_root / "scratch") != args.pretrain_seq:
        data = data_root / f"text-pretrain-seq{args.pretrain_seq}"
        p.update(repack_text(src, data, args.pretrain_seq, None))
    ckpt_dir = data_root / "pretrain-checkpoints"
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    cmd = [*launcher(args.device, args.gpus), str(REPO / "scripts/train.py"), str(args.yaml),
           *pretrain_overrides(args, data, vocab_size, ckpt_dir)]
    rc, text, wall = run_logged(cmd, logs / "pretrain.log", args.timeout)
    losses = [float(x) for x in TRAIN_LOSS.findall(text)]
    p.update(wall_s=round(wall, 1), loss_first=losses[0] if losses else None,
             loss_last=losses[-1] if losses else None, losses_logged=len(losses))
    p.update({k: v for k, v in logged_metrics(text).items() if k in ("tokens_per_sec", "mfu")})
    ckpt = ckpt_dir / "latest-rank0.pt"
    if rc != 0 or not ckpt.exists():
        p["error"] = f"pretraining failed: {error_line(text, rc)}"
        return p
    p.update(ok=True, checkpoint=str(ckpt.resolve()))
    return p


def trained_start(args, data_root: Path, logs: Path, results: dict) -> dict | None:
    """What the trained rows start from: {tokenizer, vocab_size, checkpoint}; the pretraining run (or
    ``--pretrained``) recorded in ``results['pretrain']``. None when pretraining failed."""
    text = Path(args.text).resolve()
    vocab_size = text_vocab_size(text)
    if args.pretrained:
        results["pretrain"] = {"ok": True, "checkpoint": args.pretrained, "reused": True}
    else:
        results["pretrain"] = pretrain(args, data_root, logs, vocab_size)
        print(json.dumps(results["pretrain"]), flush=True)
    if not results["pretrain"]["ok"]:
        return None
    return {"tokenizer": str(text / "tokenizer"), "vocab_size": vocab_size,
            "checkpoint": results["pretrain"]["checkpoint"]}


def row_labels(args, pre: dict | None) -> dict:
    """{'weights', 'data'}: what every row of this run trains from and on."""
    if args.weights == "init":
        return {"weights": "initialised", "data": "random tokens"}
    if pre is None or pre.get("reused"):
        weights = f"trained (checkpoint {args.pretrained})"
    else:
        weights = f"trained ({pre['steps']} steps x {pre['batch']} x {pre['seq_len']} tokens of real text)"
    return {"weights": weights, "data": "real text"}


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
    p.add_argument("--skip", choices=["on", "off", "both"],
                   default="off" if os.environ.get("LLMFOUNDRY_ALIBI_SKIP") == "0" else "on",
                   help="the Triton kernel's skipping of ALiBi-negligible far keys in the part-1 runs: on, off "
                        "(LLMFOUNDRY_ALIBI_SKIP=0 in the run's environment) or both (each length twice; the table "
                        "gives the speed-up). Default: on, or off when LLMFOUNDRY_ALIBI_SKIP=0 is set here")
    p.add_argument("--weights", choices=["init", "trained"], default="init",
                   help="init: initialised weights on random tokens; trained: first pretrain --yaml on --text (or "
                        "take --pretrained), then every row loads that checkpoint and trains on the text repacked "
                        "at its length")
    p.add_argument("--text", default=None,
                   help="--weights trained: a folder with tokenizer/ and mds/train (packed `tokens` samples), as "
                        "`bench/fp8_quality.py build-data --out DIR` writes it")
    p.add_argument("--pretrained", default=None,
                   help="--weights trained: this checkpoint (weights-only, one file) instead of the pretraining run")
    p.add_argument("--pretrain_seq", type=int, default=2048)
    p.add_argument("--pretrain_steps", type=int, default=200)
    p.add_argument("--pretrain_batch", type=int, default=16, help="samples per pretraining step (all GPUs)")
    p.add_argument("--pretrain_micro", type=int, default=8, help="pretraining micro-batch per GPU (at most)")
    p.add_argument("--pretrain_lr", type=float, default=1e-4,
                   help="LION learning rate of the pretraining run (warm-up: a tenth of its steps, then cosine)")
    p.add_argument("--pretrain_extra", nargs="*", default=[], help="more key=value overrides for the pretraining")
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
    args.text = str(Path(args.text).resolve()) if args.text else None
    args.pretrained = str(Path(args.pretrained).resolve()) if args.pretrained else None
    if args.weights == "trained" and "train" in args.parts:
        text = Path(args.text or "")
        if not args.text or not (text / "tokenizer").is_dir() or not (text / "mds" / "train" / "index.json").exists():
            p.error(f"--weights trained needs --text DIR with tokenizer/ and mds/train/ (got {args.text}); build one "
                    "with: python bench/fp8_quality.py build-data --out .fp8data")
        if args.pretrained and not Path(args.pretrained).is_file():
            p.error(f"--pretrained {args.pretrained}: no such checkpoint file")
    elif args.pretrained:
        p.error("--pretrained needs --weights trained")
    return args


def all_finite(results: dict) -> bool:
    """True when every run succeeded and every number in the tables is finite."""
    rows = results.get("train", [])
    ok = all(r["ok"] and r.get("tokens_per_sec") and math.isfinite(r["tokens_per_sec"]) for r in rows)
    ok = ok and all(r.get("loaded_from") == r["load_path"] for r in rows if "load_path" in r)  # trained rows
    ok = ok and results.get("pretrain", {}).get("ok", True)
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
            run_train_part(args, data, logs, results)
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
