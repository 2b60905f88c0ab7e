"""Training on CPU: the README's default run, bit-exact resume after a crash, checkpoints on disk and S3, and the
clear errors for bad states (other model shape, unreachable bucket)."""
from __future__ import annotations

import glob
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmfoundry.train import build_trainer, load_config, train
from llmfoundry.train.checks import TrainError
from llmfoundry.train.composer_model import ComposerMPT, causal_lm_loss
from llmfoundry.utils.config import ConfigError

from conftest import assert_same_weights, checkpoint_state

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "yamls" / "tiny-cpu.yaml")
N = 8  # batches of the short runs


def fast(save_folder, *extra) -> list[str]:
    """Overrides that make tiny-cpu a few-second run (4 samples per step in 2 micro-batches)."""
    return [f"save_folder={save_folder}", "global_train_batch_size=4", "device_train_microbatch_size=2",
            "device_eval_batch_size=4", f"max_duration={N}ba", "eval_interval=4ba", "eval_subset_num_batches=1",
            "save_interval=3ba", "save_num_checkpoints_to_keep=-1", "console_log_interval=1ba",
            "callbacks.speed_monitor.window_size=2", "scheduler.t_warmup=2ba", *extra]


def run_cli(args: list[str], script: str = str(REPO / "scripts" / "train.py"), timeout: int = 300,
            cwd=REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RUN_NAME", None)
    return subprocess.run([sys.executable, script, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def final_state(folder, batch: int = N) -> dict:
    return checkpoint_state(folder, batch)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """tiny-cpu trained for N batches in one go (the reference for the resume tests)."""
    folder = tmp_path_factory.mktemp("full") / "ck"
    r = run_cli([TINY, *fast(folder), "callbacks.speed_monitor.gpu_flops_available=1e12"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return folder, r


# ------------------------------------------------------------------------------------------ the model wrapper
def test_composer_mpt_loss_metrics_flops():
    cfg = load_config(TINY).model
    model = ComposerMPT(cfg)
    assert [n for n, _ in model.named_children()] == ["model"]  # FSDP wraps the single child
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    labels = ids.clone()
    labels[0, 5:9] = -100
    batch = {"input_ids": ids, "labels": labels}
    model.train()  # training without train metrics: the model returns its (chunked) loss, no logits
    train_out = model(batch)
    assert train_out.logits is None
    train_loss = model.loss(train_out, batch)
    model.eval()
    logits = model(batch)
    assert logits.shape == (2, 16, cfg.vocab_size)
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, cfg.vocab_size), labels[:, 1:].reshape(-1),
                                             ignore_index=-100)
    assert torch.allclose(model.loss(logits, batch), want)
    assert torch.allclose(train_loss, want, atol=1e-6)
    assert ComposerMPT(cfg).get_metrics(is_train=True) == {}
    assert set(ComposerMPT(cfg, train_metrics=True).get_metrics(is_train=True)) == {
        "LanguageCrossEntropy", "LanguagePerplexity", "TokenAccuracy"}
    assert torch.allclose(causal_lm_loss(logits, batch["labels"]), want)
    metrics = model.get_metrics(is_train=False)
    for m in metrics.values():
        model.update_metric(batch, logits, m)
    assert torch.allclose(metrics["LanguageCrossEntropy"].compute(), want)
    assert torch.allclose(metrics["LanguagePerplexity"].compute(), want.exp())
    assert model.flops_per_batch(batch) == cfg.flops_per_token(16) * 2 * 16


# ------------------------------------------------------------------------------------------ the default run
def test_default_run_trains_evaluates_logs_and_saves(uninterrupted):
    folder, r = uninterrupted
    out = r.stdout + r.stderr
    assert "run tiny-cpu: MPT with" in out and f"full config: {folder}/config.yaml" in out  # a summary is logged
    for needle in ("loss/train/total", "metrics/eval/LanguageCrossEntropy", "metrics/eval/LanguagePerplexity",
                   "lr-Lion/group0", "throughput/device/tokens_per_sec", "throughput/device/mfu",
                   "MFU is measured against a peak of 1e+12"):
        assert needle in out, needle
    assert (folder / "config.yaml").exists()
    assert os.path.realpath(folder / "latest-rank0.pt").endswith(f"-ba{N}-rank0.pt")
    state = final_state(folder)
    assert state["timestamp"]["Timestamp"]["batch"] == N
    assert state["dataset_state"]["train"]["sample_in_epoch"] == 4 * N  # the loader position is saved


CRASH_DRIVER = """
import os, sys
from composer.core import Callback
from llmfoundry.train import build_trainer, load_config

class Crash(Callback):
    def batch_end(self, state, logger):
        if int(state.timestamp.batch) == int(sys.argv[2]):
            os._exit(17)  # like a killed process: nothing after this batch is saved or flushed

trainer = build_trainer(load_config(sys.argv[1], sys.argv[3:]))
trainer.state.callbacks.append(Crash())
trainer.fit()
"""


def test_crash_then_same_command_resumes_bit_exact(uninterrupted, tmp_path):
    """Crash after batch 5 (last checkpoint at 3), rerun the same command: the final weights and LION state equal
    those of a run that never stopped, bit for bit (model, optimizer, scheduler, RNG, data position restored)."""
    folder = tmp_path / "ck"
    driver = tmp_path / "crash.py"
    driver.write_text(CRASH_DRIVER)
    args = fast(folder, "callbacks.speed_monitor.gpu_flops_available=1e12")
    crashed = run_cli([TINY, "5", *args], script=str(driver))
    assert crashed.returncode == 17, crashed.stderr[-3000:]
    assert os.path.realpath(folder / "latest-rank0.pt").endswith("-ba3-rank0.pt")
    resumed = run_cli([TINY, *args])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Autoresuming training from checkpoint" in resumed.stdout + resumed.stderr
    assert_same_weights(final_state(folder), final_state(uninterrupted[0]))


def test_stop_at_k_then_extend_bit_exact(uninterrupted, tmp_path):
    """max_duration=k, then the same command with max_duration=N: same weights as N in one go (the cosine horizon
    is pinned with scheduler.t_max so that the first run's schedule is the full run's)."""
    folder = tmp_path / "ck"
    pinned = f"scheduler.t_max={N}ba"
    first = run_cli([TINY, *fast(folder, pinned), "max_duration=5ba", "save_interval=5ba"])
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli([TINY, *fast(folder, pinned)])
    assert second.returncode == 0, second.stderr[-3000:]
    assert_same_weights(final_state(folder), final_state(uninterrupted[0]))


# ------------------------------------------------------------------------------------------ load_path / bad states
def test_load_path_weights(uninterrupted, tmp_path):
    ckpt = glob.glob(str(uninterrupted[0] / f"ep*-ba{N}-rank0.pt"))[0]
    cfg = load_config(TINY, fast(tmp_path / "ck", f"load_path={ckpt}", "load_weights_only=true",
                                 "autoresume=false"))
    trainer = build_trainer(cfg)
    try:
        saved = final_state(uninterrupted[0])["model"]
        for k, v in trainer.state.model.state_dict().items():
            assert torch.equal(v, saved[k]), k
        assert int(trainer.state.timestamp.batch) == 0  # weights only: a fresh run
    finally:
        trainer.close()


def test_checkpoint_of_another_shape_is_named(uninterrupted, tmp_path):
    ckpt = glob.glob(str(uninterrupted[0] / f"ep*-ba{N}-rank0.pt"))[0]
    cfg = load_config(TINY, fast(tmp_path / "ck", f"load_path={ckpt}", "model.d_model=64", "autoresume=false"))
    with pytest.raises(TrainError) as e:
        build_trainer(cfg)
    msg = str(e.value)
    assert ckpt in msg and "model.transformer.wte.weight" in msg and "[4096, 128] in the checkpoint" in msg
    assert "[4096, 64] in this model" in msg and "d_model=64" in msg and "Fix" in msg


@pytest.mark.parametrize("n_layers", [3, 1])
def test_autoresume_from_other_shape_is_named(uninterrupted, n_layers):
    cfg = load_config(TINY, fast(uninterrupted[0], f"model.n_layers={n_layers}", f"max_duration={N + 2}ba"))
    with pytest.raises(TrainError, match=rf"ep0-ba{N}-rank0.pt does not fit this model.*n_layers={n_layers}.*"
                                         r"blocks\.[12]\."):
        build_trainer(cfg)


def test_existing_run_without_autoresume_is_refused(uninterrupted):
    before = sorted(os.listdir(uninterrupted[0]))
    cfg = load_config(TINY, fast(uninterrupted[0], "autoresume=false", "optimizer.lr=1e-4"))
    with pytest.raises(TrainError, match="already holds checkpoints.*autoresume: true.*save_overwrite: true"):
        train(cfg)
    after = sorted(os.listdir(uninterrupted[0]))
    assert set(before) <= set(after) and all(f.startswith("config-") for f in set(after) - set(before))


def test_unreachable_bucket_stops_before_training(s3_server):
    cfg = load_config(TINY, fast("s3://no-such-bucket-abc/runs/{run_name}"))
    with pytest.raises(TrainError, match=r"save_folder = 's3://no-such-bucket-abc.*cannot write to bucket"):
        build_trainer(cfg)
    cfg = load_config(TINY, fast("/tmp/unused", "load_path=s3://no-such-bucket-abc/ck/latest-rank0.pt",
                                 "autoresume=false"))
    with pytest.raises(TrainError, match=r"load_path = .*cannot read bucket 'no-such-bucket-abc'"):
        build_trainer(cfg)


def test_missing_local_load_path(tmp_path):
    cfg = load_config(TINY, fast(tmp_path / "ck", f"load_path={tmp_path}/nope.pt", "autoresume=false"))
    with pytest.raises(TrainError, match="load_path = .*nope.pt' does not exist"):
        build_trainer(cfg)



def _truncated_copy(src: str, dst) -> str:
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: len(data) // 2])
    return str(dst)


@pytest.mark.parametrize("kind", ["plain_folder", "hf_folder", "text_file", "truncated"])
def test_load_path_that_is_not_a_checkpoint_is_named(uninterrupted, tmp_path, kind):
    """load_path pointing at something that is not a composer checkpoint stops before the model is built, with
    one message naming it and what to pass (before: composer's IsADirectoryError / UnpicklingError tracebacks)."""
    ckpt = glob.glob(str(uninterrupted[0] / f"ep*-ba{N}-rank0.pt"))[0]
    if kind == "plain_folder":
        path, expected = str(uninterrupted[0]), r"is a folder without \.metadata.*it holds: ep0-ba3-rank0\.pt"
    elif kind == "hf_folder":
        (tmp_path / "hf").mkdir()
        (tmp_path / "hf" / "config.json").write_text("{}")
        path, expected = str(tmp_path / "hf"), r"is a Hugging Face folder of model_type None: only MPT folders"
    elif kind == "text_file":
        path, expected = str(REPO / "README.md"), r"README\.md' is not a composer checkpoint file"
    else:
        path, expected = _truncated_copy(ckpt, tmp_path / "half.pt"), r"half\.pt' is not a composer checkpoint file"
    cfg = load_config(TINY, fast(tmp_path / "ck", f"load_path={path}", "autoresume=false"))
    with pytest.raises(TrainError, match="load_path = .*" + expected):
        build_trainer(cfg)


def test_finished_run_launched_again(uninterrupted):
    """The same command after the run finished: nothing to train, exit 0, no checkpoint added. A max_duration
    below where the run is: one message with the fix."""
    folder = uninterrupted[0]
    before = sorted(p for p in os.listdir(folder) if p.endswith(".pt"))
    r = run_cli([TINY, *fast(folder), "callbacks.speed_monitor.gpu_flops_available=1e12"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "is already complete: resumed from" in r.stderr and f"at {N}ba = max_duration" in r.stderr
    assert sorted(p for p in os.listdir(folder) if p.endswith(".pt")) == before
    with pytest.raises(TrainError, match=rf"is at {N}ba, past max_duration = 5ba; raise max_duration above {N}ba"):
        train(load_config(TINY, fast(folder, "max_duration=5ba")))
    assert sorted(p for p in os.listdir(folder) if p.endswith(".pt")) == before


def test_finished_checkpoint_as_load_path_of_a_new_run_points_at_load_weights_only(uninterrupted, tmp_path,
                                                                                  caplog):
    """A finished run's checkpoint given as load_path to a shorter new run: the message offers load_weights_only
    (what the user most likely wants), and no warning about a schedule that will never run comes first."""
    ckpt = str(uninterrupted[0] / f"ep0-ba{N}-rank0.pt")
    cfg = load_config(TINY, fast(tmp_path / "new", f"load_path={ckpt}", "max_duration=5ba", "autoresume=false",
                                 "scheduler.t_max=1dur"))
    with pytest.raises(TrainError) as e:
        train(cfg)
    assert str(e.value).endswith("or add load_weights_only=true to start a new run from its weights (step, "
                                 "optimizer and schedule from zero)"), str(e.value)
    assert not [r for r in caplog.records if "schedule is recomputed" in r.getMessage()]


def test_gpu_attention_on_cpu_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for attn in ("triton", "flash"):
        cfg = load_config(TINY, fast(tmp_path / "ck", f"model.attn_config.attn_impl={attn}"))
        with pytest.raises(ConfigError, match=f"attn_impl: {attn} needs a CUDA GPU; on CPU use torch or flex"):
            build_trainer(cfg)

def test_not_enough_disk_stops_before_training(tmp_path, monkeypatch):
    from llmfoundry.train import checks
    monkeypatch.setattr(checks, "checkpoint_bytes", lambda *a, **k: 10 ** 18)
    with pytest.raises(TrainError, match="not enough free disk for a checkpoint"):
        build_trainer(load_config(TINY, fast(tmp_path / "ck")))
    assert not (tmp_path / "ck").exists()  # stopped before any work


def test_wandb_offline(tmp_path, monkeypatch):
    """An offline wandb run is written under WANDB_DIR and gets the full resolved config (the console shows only a
    summary of it)."""
    import wandb
    wandb.teardown()  # wandb keeps its settings (WANDB_DIR) for the process after a first run
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(TINY, fast(tmp_path / "ck", "max_duration=2ba", "eval_loader=null", "autoresume=false",
                                 "loggers.wandb.project=tiny", "save_folder=null"))
    trainer = train(cfg)
    try:
        config = dict(wandb.run.config)
        assert config["optimizer"]["name"] == "lion" and config["model"]["d_model"] == 128
        assert config["train_loader"]["shuffle_algo"] == "py1e" and config["progress_bar"] == "auto"
    finally:
        trainer.close()
        wandb.teardown()
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert runs, os.listdir(tmp_path)


def test_config_without_run_name_saves_where_the_log_says(tmp_path, monkeypatch, caplog):
    """A config built without run_name (and none in the environment): composer's run name, the checkpoint, the
    config copy and resume.save_dir all use the same default ('run'), not a random name beside an empty one."""
    from llmfoundry.train import resume
    monkeypatch.delenv("RUN_NAME", raising=False)
    monkeypatch.delenv("COMPOSER_RUN_NAME", raising=False)
    cfg = load_config(TINY, fast(f"{tmp_path}/{{run_name}}/ck", "max_duration=1ba", "save_interval=1ba",
                                 "eval_loader=null", "autoresume=false"))
    cfg.run_name = None
    trainer = train(cfg)
    trainer.close()
    assert "Run name: run" in caplog.messages and trainer.state.run_name == "run"
    assert resume.save_dir(cfg) == f"{tmp_path}/run/ck"
    assert os.listdir(tmp_path) == ["run"]
    assert sorted(os.listdir(tmp_path / "run" / "ck")) == ["config.yaml", "ep0-ba1-rank0.pt", "latest-rank0.pt"]


@pytest.mark.slow
def test_s3_checkpoints_and_autoresume(s3_bucket, tmp_path):
    """Checkpoints go to s3://, and the same command continues from the newest one there, every time."""
    folder = f"{s3_bucket}/runs/{{run_name}}"
    args = fast(folder, f"scheduler.t_max={N}ba", "eval_loader=null", "save_interval=100ba",  # save at the end
                "save_num_checkpoints_to_keep=1")
    outputs = []
    for batches in (2, 3, 4):  # three launches: each must continue from the previous one's last checkpoint
        r = run_cli([TINY, *args, f"max_duration={batches}ba"], cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        outputs.append(r.stdout + r.stderr)
    assert "autoresume: continuing from" not in outputs[0]
    assert f"autoresume: continuing from {s3_bucket}/runs/tiny-cpu/ep0-ba2-rank0.pt" in outputs[1]
    assert f"autoresume: continuing from {s3_bucket}/runs/tiny-cpu/ep0-ba3-rank0.pt" in outputs[2]
    assert "[batch=4/4]" in outputs[2] and "[batch=3/4]" not in outputs[2]
    assert os.listdir(tmp_path) == []  # nothing copied into the working directory
    import boto3
    s3 = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket[5:])["Contents"]]
    assert {f"runs/tiny-cpu/ep0-ba{b}-rank0.pt" for b in (2, 3, 4)} <= set(keys), keys
    # ... all of them, whatever save_num_checkpoints_to_keep says, and the run says so
    assert all("save_num_checkpoints_to_keep=1 counts the local copies only: every checkpoint uploaded to "
               f"{s3_bucket}/runs/{{run_name}} stays there" in out for out in outputs)


def test_compile_config_reaches_trainer(tmp_path):
    cfg = load_config(TINY, fast(tmp_path / "ck", "compile_config={}", "autoresume=false"))
    assert cfg.compile_config == {}
    trainer = build_trainer(cfg)
    try:
        assert trainer.state.model.forward.__wrapped__.__func__ is ComposerMPT.forward  # wrapped by torch.compile
    finally:
        trainer.close()


def test_profiler_writes_a_trace_and_logs_a_summary(tmp_path):
    """callbacks.profiler: a Chrome trace of batches 2-3 and the summary line on rank 0 (no GPU here: wall only)."""
    r = run_cli([TINY, *fast(tmp_path / "ck", "autoresume=false", "max_duration=5ba", "eval_loader=null",
                             "callbacks.profiler.start_batch=2", f"callbacks.profiler.folder={tmp_path}/tr/{{run_name}}")])
    assert r.returncode == 0, r.stderr[-3000:]
    with gzip.open(tmp_path / "tr" / "tiny-cpu" / "rank0.batch2-3.json.gz", "rt") as f:
        trace = json.load(f)
    assert any(e.get("name", "").startswith("aten::") for e in trace["traceEvents"])  # the model's ops are in it
    assert "profiler: batches 2-3 on rank 0: wall" in r.stderr


def test_trace_summary_merges_overlapping_gpu_intervals():
    from llmfoundry.train.callbacks.profiler import summarize_trace
    ev = [{"ph": "X", "cat": "kernel", "name": "nvjet_gemm", "ts": 0, "dur": 10},
          {"ph": "X", "cat": "kernel", "name": "_fwd_kernel", "ts": 5, "dur": 10},  # overlaps the first (streams)
          {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoD", "ts": 40, "dur": 5},
          {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 100}]  # host events do not count
    s = summarize_trace({"traceEvents": ev})
    assert (s["busy_ms"], s["span_ms"], s["longest_gap_ms"]) == (0.020, 0.045, 0.025)
    assert s["groups"] == {"matmul": 0.010, "attention": 0.010, "copies": 0.005}
    assert s["top"] == {"nvjet_gemm": [0.010, 1], "_fwd_kernel": [0.010, 1], "Memcpy DtoD": [0.005, 1]}


def test_kernel_groups_tell_gelu_norm_and_attention_apart():
    from llmfoundry.train.callbacks.profiler import kernel_group
    assert kernel_group("_gelu_kernel") == kernel_group("_gelu_grad_kernel") == "gelu"  # kernels/gelu.py
    assert kernel_group("triton_poi_fused_gelu_view_7") == "gelu"  # Inductor's
    assert kernel_group("_fwd_kernel") == kernel_group("_bwd_dkdv_kernel") == "attention"
    assert kernel_group("triton_red_fused__unsafe_view_add_native_layer_norm_2") == "norm"  # Inductor's
    assert kernel_group("triton_red_fused_abs_amax_0") == "fp8 scaling"  # torchao's scales, compiled
    assert kernel_group("triton_poi_fused__to_copy_clamp_mul_1") == "fp8 scaling"  # its casts to float8
    # a cast fused ahead of a float8 product is named after it, and is not a product
    assert kernel_group("triton_poi_fused__scaled_mm__to_copy_clamp_clone_mul_reciprocal_t_view_5") == "fp8 scaling"
    assert kernel_group("nvjet_sm90_qqtst_128x256_128x4_2x1_v_bz_coopA_TNN") == "matmul"  # cuBLAS's FP8 products
    assert kernel_group("triton_tem_fused_mm_3") == "matmul"  # Inductor's matmul templates


# AdamW at lr 1e12 (no clipping, no warm-up) turns batch 2's loss into NaN
DIVERGE = ["optimizer.name=adamw", "optimizer.lr=1e12", "max_grad_norm=null", "scheduler.t_warmup=0ba",
           "save_interval=1ba"]


def test_nonfinite_loss_stops_before_its_checkpoint(tmp_path):
    """A NaN loss stops the run with one message naming the batch; the checkpoint of the batch before it is kept and
    nothing after it is written. With the guard off, the same run trains on (and saves NaN weights)."""
    r = run_cli([TINY, *fast(tmp_path / "ck", *DIVERGE)])
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert "error: the training loss is not finite at batch 2 (loss/train/total = nan)" in r.stderr
    assert f"the checkpoints already in {tmp_path / 'ck'} were written before it" in r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in (tmp_path / "ck").glob("ep*.pt")) == ["ep0-ba1-rank0.pt"]
    off = run_cli([TINY, *fast(tmp_path / "off", *DIVERGE), "max_duration=3ba",
                   "callbacks.stop_on_nonfinite_loss=false"])
    assert off.returncode == 0, off.stderr[-2000:]
    weights = final_state(tmp_path / "off", 3)["model"]
    assert any(not torch.isfinite(w).all() for w in weights.values())


def test_cli_user_error_is_one_line(tmp_path):
    r = run_cli([TINY, "optimizer.lrr=1e-3", f"save_folder={tmp_path}"])
    assert r.returncode == 1
    assert r.stderr.strip().startswith("error: unknown config key 'optimizer.lrr'") and "did you mean 'lr'" in r.stderr
    assert "Traceback" not in r.stderr


def test_data_error_from_a_loader_worker_is_one_line(tmp_path):
    """A data error raised in a DataLoader worker (here: 256-token samples read at max_seq_len 512) prints its own
    message, not the worker's traceback that the DataLoader re-raises it with."""
    r = run_cli([TINY, *fast(tmp_path / "ck"), "variables.seq_len=512", "train_loader.num_workers=1",
                 "eval_loader=null"])
    assert r.returncode == 1, r.stderr[-2000:]
    assert "\nerror: stream 'default' (" in r.stderr and "has 256 tokens, fewer than max_seq_len=512" in r.stderr
    assert "Traceback" not in r.stderr and "Caught StreamError" not in r.stderr


@pytest.mark.slow
def test_readme_default_command(tmp_path):
    """The README's command, unchanged except for where the checkpoint goes (about a minute on 2 cores)."""
    r = run_cli([TINY, f"save_folder={tmp_path}/ck"], timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert glob.glob(str(tmp_path / "ck" / "ep*-ba120-rank0.pt"))
    assert "metrics/eval/LanguagePerplexity" in r.stdout + r.stderr


def test_a_resume_with_dropout_is_bit_exact(tmp_path):
    """Dropout draws from torch's RNG: a run stopped after 2 batches and resumed (mid-epoch, the streaming loader
    resuming by its own state) ends with the weights of a run that never stopped (resume.RestoreRNG: composer alone
    restores the saved RNG state only at an epoch's start)."""
    extra = ["model.resid_pdrop=0.1", "model.emb_pdrop=0.1", "eval_loader=null", "save_interval=2ba",
             "scheduler.t_max=4ba"]
    assert run_cli([TINY, *fast(tmp_path / "whole", *extra, "max_duration=4ba")]).returncode == 0
    assert run_cli([TINY, *fast(tmp_path / "parts", *extra, "max_duration=2ba")]).returncode == 0
    r = run_cli([TINY, *fast(tmp_path / "parts", *extra, "max_duration=4ba")])
    assert r.returncode == 0 and "autoresume: continuing from" in r.stdout + r.stderr
    assert_same_weights(checkpoint_state(tmp_path / "parts", 4), checkpoint_state(tmp_path / "whole", 4))
