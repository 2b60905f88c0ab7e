"""bench/bench_train.py's planning and overrides (the GPU runs themselves happen on the device machine)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import bench_train  # noqa: E402


def _args(**kw):
    base = dict(attn="flex,triton", suite=False, models="125m,1b", gpus="1,2")
    return argparse.Namespace(**{**base, **kw})


def test_plan_is_the_product_of_models_attn_gpus():
    assert bench_train.plan_runs(_args()) == [("125m", "flex", 1), ("125m", "flex", 2), ("125m", "triton", 1),
                                              ("125m", "triton", 2), ("1b", "flex", 1), ("1b", "flex", 2),
                                              ("1b", "triton", 1), ("1b", "triton", 2)]


def test_suite_skips_runs_needing_more_gpus(capsys):
    plan = bench_train.plan_runs(_args(suite=True))
    have = torch.cuda.device_count()
    assert all(g <= have for _, _, g in plan)
    if have == 0:
        assert plan == [] and "skipping MPT-7b triton on 4 GPUs" in capsys.readouterr().out


def test_overrides_split_the_global_batch():
    o = bench_train.overrides_for("1b", "triton", 2, 8, Path("/tmp/d"), ["compile_config=null"], "eager", accum=4,
                                  mb=16)
    assert "global_train_batch_size=128" in o and "device_train_microbatch_size=16" in o
    assert "model.attn_config.attn_impl=triton" in o and o[-1] == "compile_config=null"
    assert "run_name=bench-1b-triton-eager-2gpu" in o


def test_variant_env_items_are_split_from_overrides():
    env, rest = bench_train.split_env(["env.LLMFOUNDRY_ALIBI_SKIP=0", "fsdp.sharding_strategy=SHARD_GRAD_OP",
                                       "env.X=a=b"])
    assert env == {"LLMFOUNDRY_ALIBI_SKIP": "0", "X": "a=b"} and rest == ["fsdp.sharding_strategy=SHARD_GRAD_OP"]


def test_random_shards_are_rewritten_when_too_few_for_the_runs(tmp_path, capsys):
    """A 7B run's small data set, reused by a 1B run with 4x the samples per step, would wrap around epochs."""
    from streaming import StreamingDataset
    def count():
        return StreamingDataset(local=str(tmp_path / "d" / "train"), batch_size=1).num_samples
    bench_train.write_random_mds(tmp_path / "d", 12, 16, 100)
    assert count() == 12
    bench_train.write_random_mds(tmp_path / "d", 8, 16, 100)  # enough: kept
    assert count() == 12 and "writing them again" not in capsys.readouterr().out
    bench_train.write_random_mds(tmp_path / "d", 40, 16, 100)
    assert count() == 40 and "holds 12 samples, fewer than the 40 these runs read" in capsys.readouterr().out


def test_failure_line_is_the_cause_not_the_last_warning():
    log = ("[rank0]: Traceback (most recent call last):\n[rank0]:   File \"x.py\", line 1\n"
           "[rank0]: RuntimeError: Triton Error [CUDA]: an illegal memory access was encountered\n"
           "/usr/lib/python3.12/multiprocessing/resource_tracker.py:254: UserWarning: resource_tracker: leaked\n"
           "  warnings.warn('resource_tracker: There appear to be %d '\n")
    assert bench_train.failure_line(log) == ("RuntimeError: Triton Error [CUDA]: an illegal memory access was "
                                             "encountered")
    watchdog = "[E1205] Process group watchdog thread terminated with exception: CUDA error: bad\nterminate called\n"
    assert bench_train.failure_line(watchdog).endswith("CUDA error: bad")
    assert bench_train.failure_line("starting\nKilled\n") == "Killed"
