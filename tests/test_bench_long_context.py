"""bench/bench_long_context.py end to end on CPU at tiny shapes: both parts run through scripts/train.py and
scripts/eval.py, and the tables and the JSON hold finite numbers (the GPU run uses the same code at real sizes)."""
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
