"""bench/bench_long_context.py end to end on CPU at tiny shapes: both parts run through scripts/train.py and
scripts/eval.py, and the tables and the JSON hold finite numbers (the GPU run uses the same code at real sizes);
part ``train`` with trained weights (a pretraining run on real text, its checkpoint loaded by every row) and
skipping on and off in one run; the repacking of real text at each row's length."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_long_context", REPO / "bench" / "bench_long_context.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_micro_batch_keeps_tokens_per_micro_batch():
    bench = load_bench()
    assert [bench.micro_batch(s, 65536) for s in (2048, 16384, 65536, 131072)] == [32, 4, 1, 1]


def test_logged_metrics_parses_composer_console_lines():
    bench = load_bench()
    text = ("\t Train throughput/device/tokens_per_sec: 100.5\n\t Train memory/peak_allocated_mem: 2.1475\n"
            "\t Train throughput/device/tokens_per_sec: 200.0\n\t Train throughput/device/mfu: 0.25\n"
            "\t Train memory/peak_allocated_mem: 4.295\n")
    m = bench.logged_metrics(text)
    assert m["tokens_per_sec"] == 200.0 and m["mfu"] == 0.25  # the last window
    assert m["peak_allocated_gib"] == pytest.approx(4.295e9 / 2**30)  # the highest peak, GB -> GiB


@pytest.mark.slow
def test_both_parts_end_to_end_on_cpu(tmp_path, capsys):
    bench = load_bench()
    out_json = tmp_path / "long.json"
    logs = tmp_path / "logs"
    results = bench.main([
        "--device", "cpu", "--yaml", str(REPO / "yamls" / "tiny-cpu.yaml"), "--seq_lens", "128,256",
        "--tokens_per_micro", "256", "--steps", "3", "--attn", "torch", "--fsdp", "2", "--peak_tflops", "0.01",
        "--extrap_seq", "128", "--eval_lens", "128,256,512", "--extrap_d_model", "64", "--extrap_layers", "2",
        "--extrap_heads", "2", "--extrap_steps", "4", "--extrap_batch", "4", "--eval_batch", "8",
        "--logs", str(logs), "--data", str(tmp_path / "data"), "--json", str(out_json)])
    printed = capsys.readouterr().out
    assert results["ok"], json.dumps(results, indent=1)[-3000:]
    assert json.loads(out_json.read_text())["ok"]

    rows = results["train"]
    assert [(r["seq_len"], r["micro_batch"]) for r in rows] == [(128, 2), (256, 1)]
    for r in rows:
        for key in ("tokens_per_sec", "mfu", "tflops_per_gpu"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert f"| {r['seq_len']} | {r['micro_batch']} | " in printed
    assert "fsdp.activation_checkpointing=true" in (logs / "train-seq256-1gpu.log").read_text()

    ex = results["extrap"]
    assert [r["eval_len"] for r in ex["eval"]] == [128, 256, 512]
    for r in ex["eval"]:
        assert math.isfinite(r["loss"]) and math.isfinite(r["perplexity"]) and r["tokens"] > 10_000
        assert f"| {r['eval_len']} | {r['samples']} | {r['tokens']} | " in printed
    assert len(ex["train"]["heldout_loss_during_training"]) == 4  # every quarter of the run
    assert json.loads((logs / "extrap-eval.yaml").read_text())["model_overrides"] == {"max_seq_len": 512}
    for name in ("extrap-train.log", "extrap-eval.log", "train-seq128-1gpu.log"):
        assert (logs / name).stat().st_size > 0


def write_source_mds(folder: Path, samples: list[list[int]]) -> None:
    """zstd-compressed ``tokens`` samples in two part-NNNNN/ folders under one merged index, the layout the converters
    write with several processes (``bench/fp8_quality.py build-data`` uses two)."""
    import numpy as np
    from streaming import MDSWriter
    from streaming.base.util import merge_index
    half = len(samples) // 2
    parts = [folder / "part-00000", folder / "part-00001"]
    for part, chunk in zip(parts, (samples[:half], samples[half:])):
        with MDSWriter(out=str(part), columns={"tokens": "ndarray:int32"}, compression="zstd") as w:
            for s in chunk:
                w.write({"tokens": np.asarray(s, dtype=np.int32)})
    merge_index([str(p / "index.json") for p in parts], str(folder), keep_local=True)


def read_tokens(bench, split_dir: Path, scratch: Path) -> list[list[int]]:
    return [t.tolist() for t in bench.mds_samples(split_dir, scratch)]


def test_repack_text_concatenates_samples_in_order(tmp_path):
    """Compressed 8-token samples in two part folders repacked at 12 tokens: the same tokens in the same order, the
    layout of the random-token writer (``tokens`` ndarray:int32 under root/train), an error when the text is too
    short."""
    bench = load_bench()
    src = [list(range(i * 8, i * 8 + 8)) for i in range(5)]  # 40 tokens
    write_source_mds(tmp_path / "src", src)
    out = bench.repack_text(tmp_path / "src", tmp_path / "packed", 12, 3)
    assert out["text_samples"] == 3 and out["text_source_samples_read"] == 5
    got = read_tokens(bench, tmp_path / "packed" / "train", tmp_path / "scratch")
    assert got == [list(range(0, 12)), list(range(12, 24)), list(range(24, 36))]
    index = json.loads((tmp_path / "packed" / "train" / "index.json").read_text())
    shard = index["shards"][0]
    assert (shard["column_names"], shard["column_encodings"]) == (["tokens"], ["ndarray:int32"])
    assert shard["compression"] is None  # as write_random_mds writes them
    assert not (tmp_path / "packed" / "scratch").exists()  # decompressed shards are not left behind
    assert len(read_tokens(bench, tmp_path / "src", tmp_path / "s2")) == 5  # shorter samples: all of the text
    assert [len(t) for t in read_tokens(bench, tmp_path / "packed" / "train", tmp_path / "s3")] == [12] * 3
    assert bench.repack_text(tmp_path / "src", tmp_path / "all", 16, None)["text_samples"] == 2
    with pytest.raises(ValueError, match="fewer than the 4 samples"):
        bench.repack_text(tmp_path / "src", tmp_path / "short", 12, 4)


def test_skip_both_table_gives_both_rates_and_the_speed_up():
    bench = load_bench()
    labels = {"weights": "trained (200 steps x 16 x 2048 tokens of real text)", "data": "real text"}
    rows = [{"seq_len": 65536, "micro_batch": 1, "skip": "on", "ok": True, "wall_s": 50.0, "tokens_per_sec": 40000.0,
             **labels},
            {"seq_len": 65536, "micro_batch": 1, "skip": "off", "ok": True, "wall_s": 60.0, "tokens_per_sec": 10000.0,
             "mfu": 0.5, **labels}]
    table = bench.train_table(rows, 989.0)
    assert "| 65536 | 1 | trained (200 steps x 16 x 2048 tokens of real text) | real text | 40,000 | 10,000 | 4.00x |" \
        in table
    assert "weights: trained (200 steps x 16 x 2048 tokens of real text); data: real text" in table
    assert bench.skip_speedups(rows) == [{"seq_len": 65536, "on_tokens_per_sec": 40000.0,
                                          "off_tokens_per_sec": 10000.0, "speedup": 4.0}]
    assert bench.skip_env("on") == {"LLMFOUNDRY_ALIBI_SKIP": "1"} and bench.skip_env("off") == {
        "LLMFOUNDRY_ALIBI_SKIP": "0"}


def build_text_dir(root: Path) -> int:
    """A tiny stand-in for ``fp8_quality.py build-data``'s folder: the bundled tokenizer saved to tokenizer/, the
    bundled corpus's train split packed into zstd-compressed 2048-token samples in mds/train. Returns the samples."""
    from llmfoundry.data.bundled import corpus_documents, split_documents
    from llmfoundry.data.convert import ConvertConfig, convert
    from llmfoundry.data.readers import TextList
    from llmfoundry.data.tokenizer import load_tokenizer
    load_tokenizer("bundled").save_pretrained(str(root / "tokenizer"))
    cfg = ConvertConfig(out_root=str(root / "mds" / "train"), tokenizer="bundled", concat_tokens=2048,
                        compression="zstd", overwrite=True, progress=False)
    return convert(TextList(tuple(split_documents(corpus_documents())["train"])), cfg).samples


@pytest.mark.slow
def test_trained_weights_with_skipping_on_and_off_on_cpu(tmp_path, capsys):
    """--weights trained --skip both: a pretraining run on real text saves a weights-only checkpoint, then the row
    runs twice (skipping on, LLMFOUNDRY_ALIBI_SKIP=0) from that checkpoint on the same text repacked at its length."""
    bench = load_bench()
    text, logs, data, out_json = tmp_path / "text", tmp_path / "logs", tmp_path / "data", tmp_path / "long.json"
    assert build_text_dir(text) > 100
    results = bench.main([
        "--parts", "train", "--device", "cpu", "--yaml", str(REPO / "yamls" / "tiny-cpu.yaml"), "--seq_lens", "256",
        "--tokens_per_micro", "512", "--steps", "3", "--attn", "torch", "--fsdp", "2", "--peak_tflops", "0.01",
        "--weights", "trained", "--text", str(text), "--skip", "both", "--pretrain_seq", "128",
        "--pretrain_steps", "8", "--pretrain_batch", "4", "--pretrain_lr", "2e-3",
        "--logs", str(logs), "--data", str(data), "--json", str(out_json)])
    printed = capsys.readouterr().out
    assert results["ok"], json.dumps(results, indent=1)[-3000:]
    saved = json.loads(out_json.read_text())
    assert saved["ok"]

    # the pretraining run: real text at 128 tokens, its losses, a weights-only checkpoint under --data
    pre = saved["pretrain"]
    assert (pre["steps"], pre["batch"], pre["seq_len"], pre["tokens"]) == (8, 4, 128, 8 * 4 * 128)
    assert pre["losses_logged"] == 8 and pre["loss_last"] < pre["loss_first"]
    ckpt = Path(pre["checkpoint"])
    assert ckpt.is_file() and ckpt.is_relative_to(data.resolve())
    assert "save_weights_only=true" in (logs / "pretrain.log").read_text()
    import torch
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state"]
    assert not state.get("optimizers") and any(k.startswith("model.") for k in state["model"])

    # both rows: skipping on and off, each loading the checkpoint, finite rates, labelled
    label = "trained (8 steps x 4 x 128 tokens of real text)"
    rows = saved["train"]
    assert [(r["seq_len"], r["skip"]) for r in rows] == [(256, "on"), (256, "off")]
    for r in rows:
        assert r["ok"] and math.isfinite(r["tokens_per_sec"]) and r["tokens_per_sec"] > 0, r
        assert (r["weights"], r["data"]) == (label, "real text")
        assert r["load_path"] == r["loaded_from"] == str(ckpt)
        # trained weights: the first loss on the text is below the initialised model's first loss on it
        assert r["loss_first"] < pre["loss_first"]
    for name, env in (("train-seq256-1gpu-trained.log", "LLMFOUNDRY_ALIBI_SKIP=1"),
                      ("train-seq256-1gpu-trained-noskip.log", "LLMFOUNDRY_ALIBI_SKIP=0")):
        log = (logs / name).read_text()
        first = log.splitlines()[0]
        assert first.startswith(env + " ") and f"load_path={ckpt}" in first and "load_weights_only=true" in first
        assert f"Model weights loaded from {ckpt}" in log
    (sp,) = saved["train_skip_speedup"]
    assert sp["seq_len"] == 256 and math.isfinite(sp["speedup"]) and sp["speedup"] > 0

    # the rows' data: the source samples concatenated in order, cut into 256-token samples
    packed = read_tokens(bench, data / f"text-seq256-n{rows[0]['text_samples']}" / "train", tmp_path / "s1")
    source = [t for s in read_tokens(bench, text / "mds" / "train", tmp_path / "s2") for t in s]
    assert len(packed) == rows[0]["text_samples"] == 12 and all(len(s) == 256 for s in packed)
    assert [t for s in packed for t in s] == source[:12 * 256]

    # the printed table: both rates, the speed-up and the labels
    assert f"weights: {label}; data: real text" in printed
    assert f"| 256 | 2 | {label} | real text | " in printed
    line = next(ln for ln in printed.splitlines() if ln.startswith(f"| 256 | 2 | {label}"))
    assert f"| {sp['speedup']:.2f}x |" in line and "FAILED" not in line
