"""Training config: YAML + overrides -> TrainConfig, strict errors, the shipped YAMLs, and the builders."""
from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch

from llmfoundry.train import builders, checks
from llmfoundry.train.config import OptimizerConfig, SchedulerConfig, load_config
from llmfoundry.utils.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "yamls" / "tiny-cpu.yaml"

MPT_SHAPES = {  # name: (d_model, n_layers, n_heads)
    "125m": (768, 12, 12), "350m": (1024, 24, 16), "760m": (1536, 24, 12), "1b": (2048, 24, 16),
    "3b": (2560, 32, 20), "7b": (4096, 32, 32), "13b": (5120, 40, 40), "30b": (7168, 48, 64),
}
MPT_7B_MIX = {"mc4": 0.33, "c4": 0.299, "redpajama_cc": 0.1, "the_stack": 0.1, "wikipedia": 0.04,
              "the_stack_markdown": 0.035, "s2orc": 0.033, "books": 0.03, "arxiv": 0.019, "stackexchange": 0.014}


# ------------------------------------------------------------------------------------------ shipped YAMLs
def test_tiny_cpu_yaml_loads():
    cfg = load_config(TINY)
    assert cfg.run_name == "tiny-cpu"
    assert cfg.tokenizer == "bundled" and cfg.fsdp is None
    assert cfg.model.d_model <= 128 and cfg.model.n_layers == 2 and cfg.model.max_seq_len <= 256
    assert cfg.train_loader.max_seq_len == cfg.model.max_seq_len  # ${variables.seq_len}
    assert Path(cfg.train_loader.local, "train", "index.json").exists()  # ${bundled:mds}
    assert cfg.save_folder and cfg.autoresume and cfg.eval_loader is not None


@pytest.mark.parametrize("name", list(MPT_SHAPES))
def test_mpt_yamls(name):
    cfg = load_config(REPO / "yamls" / f"mpt-{name}.yaml")
    m = cfg.model
    assert (m.d_model, m.n_layers, m.n_heads) == MPT_SHAPES[name]
    assert m.max_seq_len == 2048 and m.vocab_size == 50432
    assert m.attn_config.alibi and m.no_bias and not m.learned_pos_emb
    assert m.norm_type == "low_precision_layernorm" and m.attn_config.attn_impl in ("flex", "triton")
    assert m.init_device == "meta"
    assert cfg.tokenizer == "EleutherAI/gpt-neox-20b"
    assert cfg.optimizer.name == "lion" and cfg.scheduler.name == "cosine" and cfg.scheduler.t_warmup != "0ba"
    assert cfg.fsdp.version == 2 and cfg.precision == "amp_bf16"
    small = name in ("125m", "350m", "760m", "1b")  # one reduce-scatter per optimizer step (fp32 sums)
    assert (cfg.fsdp.sharding_strategy, cfg.fsdp.mixed_precision, cfg.fsdp.reduce_grads_every_microbatch) == (
        ("SHARD_GRAD_OP", "DEFAULT", False) if small else ("FULL_SHARD", "PURE", True))
    assert cfg.train_loader.max_seq_len == 2048
    assert all(s.remote.startswith("s3://") for s in cfg.train_loader.streams.values())
    assert cfg.save_folder.startswith("s3://") and cfg.autoresume
    assert cfg.run_name == f"mpt-{name}"


def test_mpt_7b_data_mix():
    streams = load_config(REPO / "yamls" / "mpt-7b.yaml").train_loader.streams
    assert {k: s.proportion for k, s in streams.items()} == MPT_7B_MIX
    assert sum(MPT_7B_MIX.values()) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------ overrides
def test_dotlist_overrides_and_types():
    cfg = load_config(TINY, ["optimizer.lr=3e-4", "max_duration=7ba", "variables.seq_len=128",
                             "fsdp.version=2", "device_train_microbatch_size=auto", "eval_loader=null"])
    assert cfg.optimizer.lr == pytest.approx(3e-4) and isinstance(cfg.optimizer.lr, float)
    assert cfg.max_duration == "7ba"
    assert cfg.model.max_seq_len == 128 and cfg.train_loader.max_seq_len == 128  # interpolation after merge
    assert cfg.fsdp is not None and cfg.fsdp.version == 2 and cfg.fsdp.sharding_strategy == "FULL_SHARD"
    assert cfg.device_train_microbatch_size == "auto" and cfg.eval_loader is None


def test_run_name_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("RUN_NAME", raising=False)
    monkeypatch.delenv("COMPOSER_RUN_NAME", raising=False)
    assert load_config(TINY).run_name == "tiny-cpu"
    monkeypatch.setenv("RUN_NAME", "from-env")
    assert load_config(TINY).run_name == "from-env"
    assert load_config(TINY, ["run_name=explicit"]).run_name == "explicit"


@pytest.mark.parametrize("overrides, needles", [
    (["optimzer.lr=1e-3"], ["optimzer", "did you mean 'optimizer'"]),
    (["optimizer.lrr=1e-3"], ["optimizer.lrr", "did you mean 'lr'"]),
    (["model.d_modle=64"], ["model.d_modle", "did you mean 'd_model'"]),
    (["train_loader.shufle=false"], ["train_loader.shufle", "did you mean 'shuffle'"]),
    (["global_train_batch_size=abc"], ["global_train_batch_size", "integer"]),
    (["optimizer.lr=fast"], ["optimizer.lr", "number"]),
    (["progress_bar=3"], ["progress_bar", "true or false"]),
    (["optimizer.name=adam"], ["optimizer.name", "did you mean 'adamw'"]),
    (["fsdp.mixed_precision=PUR"], ["fsdp.mixed_precision", "PURE"]),
    (["max_duration=100"], ["max_duration", "string"]),
    (["max_duration=100batches"], ["max_duration", "1000ba"]),
    (["scheduler.t_warmup=ten"], ["t_warmup", "time string"]),
    (["scheduler.t_warmup=1000tok"], ["t_warmup", "same unit"]),
    (["device_train_microbatch_size=0"], ["device_train_microbatch_size"]),
    (["model.n_heads=3"], ["n_heads"]),
    (["optimizer.betas=[0.9]"], ["betas"]),
    (["save_folder=null"], ["autoresume", "save_folder"]),
    (["lr"], ["key=value"]),
    (["model.max_seq_len=${variables.nope}"], ["model.max_seq_len"]),
    # list indexes and values in overrides
    (["optimzer.betas.0=0.8"], ["optimzer", "did you mean 'optimizer'"]),  # misspelled, then an index
    (["optimizer.betaz.0=0.8"], ["optimizer.betaz", "did you mean 'betas'"]),
    (["optimizer.newkey=1"], ["unknown config key 'optimizer.newkey'"]),  # new keys reach the strict conversion
    (["optimizer.betas={a: 1}"], ["optimizer.betas", "must be a list"]),  # was: TypeError from omegaconf
    (["optimizer={betas: {a: 1}}"], ["optimizer.betas", "must be a list"]),
    (["optimizer.betas.0={a: 1}"], ["optimizer.betas[0]", "number"]),
    (["optimizer.lr=[1,2"], ["optimizer.lr=[1,2", "cannot parse the value"]),
    (["optimizer..lr=1"], ["optimizer..lr", "key path"]),
    (["=1"], ["key=value"]),
    (["optimizer.betas=0.9"], ["'optimizer.betas' must be a list, got 0.9 (a list of one: [0.9])"]),
    (["max_duration=4"], ["'max_duration' must be a string, got the number 4", "'4ba' (batches)"]),
    (["fsdp={}", "fsdp.activation_checkpointing_blocks=1"], ["activation_checkpointing_blocks", "needs"]),
    (["fsdp={activation_checkpointing: true}", "fsdp.activation_checkpointing_blocks=-1"], [">= 0"]),
    (["fsdp={activation_checkpointing: true, activation_checkpointing_blocks: 9}"], ["n_layers"]),
])
def test_bad_config_names_the_key(overrides, needles):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, overrides)
    for needle in needles:
        assert needle in str(e.value), str(e.value)
    assert "\n" not in str(e.value)  # one line


def test_missing_required_key(tmp_path):
    text = TINY.read_text().replace("max_duration: 120ba", "")
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match="missing required config key 'max_duration'"):
        load_config(tmp_path / "c.yaml")


def test_unknown_top_level_yaml_key(tmp_path):
    (tmp_path / "c.yaml").write_text(TINY.read_text() + "\nsave_intervall: 10ba\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'save_intervall'.*did you mean 'save_interval'"):
        load_config(tmp_path / "c.yaml")


def test_missing_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


# ------------------------------------------------------------------------------------------ batch sizes
def test_batch_size_split():
    assert checks.device_batch_size(16, 2) == 8
    with pytest.raises(ConfigError, match=r"global_train_batch_size = 10 is not divisible .* \(4\).* 8 or 12"):
        checks.device_batch_size(10, 4)
    assert checks.check_microbatch(None, 8, on_gpu=False, fsdp_version=None) == 8
    assert checks.check_microbatch(4, 8, on_gpu=False, fsdp_version=None) == 4
    with pytest.raises(ConfigError, match="larger than the per-device batch"):
        checks.check_microbatch(16, 8, on_gpu=False, fsdp_version=None)
    with pytest.raises(ConfigError, match="auto needs a GPU"):
        checks.check_microbatch("auto", 8, on_gpu=False, fsdp_version=None)
    with pytest.raises(ConfigError, match="FSDP2"):
        checks.check_microbatch("auto", 8, on_gpu=True, fsdp_version=2)
    assert checks.check_microbatch("auto", 8, on_gpu=True, fsdp_version=1) == "auto"


# ------------------------------------------------------------------------------------------ optimizer semantics
@pytest.mark.parametrize("name", ["lion", "adamw"])
def test_decoupled_weight_decay(name):
    """w <- w * (1 - weight_decay * lr_t / lr): at peak lr the shrink is weight_decay, at half lr half of it."""
    p = torch.nn.Parameter(torch.ones(4))
    opt = builders.build_optimizer(OptimizerConfig(name=name, lr=1e-3, weight_decay=0.1), [p])
    p.grad = torch.zeros(4)
    opt.step()
    assert torch.allclose(p.detach(), torch.full((4,), 0.9))
    for g in opt.param_groups:
        g["lr"] = 0.5e-3
    opt.step()
    assert torch.allclose(p.detach(), torch.full((4,), 0.9 * 0.95))


def test_lion_update_is_sign_times_lr():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = builders.build_optimizer(OptimizerConfig(name="lion", lr=0.01, betas=[0.9, 0.99]), [p])
    p.grad = torch.tensor([2.0, -0.001, 0.0])
    opt.step()
    assert torch.allclose(p.detach(), torch.tensor([-0.01, 0.01, 0.0]))


def test_lion_matches_lion_pytorch_over_steps():
    """Our multi-tensor LION = lion-pytorch's per-parameter one (decoupled decay), with the lr changing per step,
    mixed dtypes and a parameter without gradient; its state dict loads into lion-pytorch and back."""
    from lion_pytorch import Lion as RefLion
    torch.manual_seed(0)
    shapes = [(5, 3), (7,), (2, 2, 2)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes] + [torch.nn.Parameter(torch.randn(4).double())]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    kw = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    opt = builders.build_optimizer(OptimizerConfig(name="lion", lr=kw["lr"], betas=[0.9, 0.95],
                                                   weight_decay=0.1), ours + [torch.nn.Parameter(torch.ones(2))])
    ref_opt = RefLion(ref + [torch.nn.Parameter(torch.ones(2))], decoupled_weight_decay=True, **kw)
    for step in range(6):
        for a, b in zip(ours, ref):
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.clone()
        for o in (opt, ref_opt):
            for group in o.param_groups:
                group["lr"] = kw["lr"] * (1.0 - step / 10)
        opt.step()
        ref_opt.step()
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-6)
    moms = [opt.state[p]["exp_avg"] for p in ours]
    for m, p in zip(moms, ref):
        torch.testing.assert_close(m, ref_opt.state[p]["exp_avg"], rtol=0, atol=1e-6)
    ref_opt.load_state_dict(opt.state_dict())  # the momentum is named as lion-pytorch names it
    opt.load_state_dict(RefLion(ref + [torch.nn.Parameter(torch.ones(2))], **kw).state_dict())  # no peak_lr in lion-pytorch's groups: still steps
    opt.step()


_DTENSOR_LION = """
import os, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from llmfoundry.train.lion import Lion
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,))
p = torch.nn.Parameter(distribute_tensor(torch.zeros(4, 3), mesh, [Shard(0)]))
p.grad = distribute_tensor(torch.ones(4, 3), mesh, [Shard(0)])
opt = Lion([p], lr=0.1)
opt.step()
assert type(opt.state[p]["exp_avg"]).__name__ == "DTensor"  # sharded like the parameter (DCP saves it so)
print(p.to_local().sum().item(), opt.state[p]["exp_avg"].to_local().sum().item())
"""


def test_lion_updates_fsdp2_dtensor_shards_in_place():
    """FSDP2 parameters are DTensors: the multi-tensor step works on their local shards, and the update must land
    in the parameter (not in a copy). One gloo process, in a subprocess to keep this one free of a process group."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", _DTENSOR_LION], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    p_sum, m_sum = map(float, r.stdout.split())
    assert p_sum == pytest.approx(-0.1 * 12) and m_sum == pytest.approx(0.01 * 12)


def test_schedulers():
    from composer.optim import (ConstantWithWarmupScheduler, CosineAnnealingWithWarmupScheduler,
                                LinearWithWarmupScheduler)
    assert isinstance(builders.build_scheduler(SchedulerConfig("cosine", "10ba")), CosineAnnealingWithWarmupScheduler)
    assert isinstance(builders.build_scheduler(SchedulerConfig("linear", "1000tok", t_max="1dur")),
                      LinearWithWarmupScheduler)
    assert isinstance(builders.build_scheduler(SchedulerConfig("constant", "0.1dur")), ConstantWithWarmupScheduler)
    assert builders.build_grad_clipping(None) == []
    (clip,) = builders.build_grad_clipping(0.5)
    assert clip.clipping_type == "norm" and clip.clipping_threshold == 0.5


# ------------------------------------------------------------------------------------------ FSDP config
def test_fsdp2_is_the_default():
    from composer.utils.parallelism import FSDP2Config
    cfg = load_config(TINY, ["fsdp={}", "fsdp.activation_checkpointing=true"]).fsdp
    par = builders.build_parallelism(cfg, world_size=8, local_world_size=8)
    assert par.fsdp is None and isinstance(par.fsdp2, FSDP2Config)
    assert par.fsdp2.mixed_precision == "PURE" and par.fsdp2.activation_checkpointing
    assert par.fsdp2.state_dict_type == "sharded" and par.fsdp2.reshard_after_forward is True
    assert (par.fsdp2.data_parallel_replicate_degree, par.fsdp2.data_parallel_shard_degree) == (None, -1)
    grad_op = builders.build_parallelism(load_config(TINY, ["fsdp.sharding_strategy=SHARD_GRAD_OP"]).fsdp, 8, 8)
    assert grad_op.fsdp2.reshard_after_forward is False


def test_fsdp2_hybrid_shard_mesh():
    from composer.utils.parallelism import FSDP2Config
    cfg = load_config(TINY, ["fsdp.sharding_strategy=HYBRID_SHARD", "fsdp.mixed_precision=DEFAULT"]).fsdp
    par = builders.build_parallelism(cfg, world_size=16, local_world_size=8)
    assert isinstance(par.fsdp2, FSDP2Config) and par.fsdp2.mixed_precision == "DEFAULT"
    # composer builds its device mesh from these two: 2 replicas (nodes) x 8-way shards
    assert (par.fsdp2.data_parallel_replicate_degree, par.fsdp2.data_parallel_shard_degree) == (2, 8)
    cfg.shard_degree = 4
    par = builders.build_parallelism(cfg, world_size=16, local_world_size=8)
    assert (par.fsdp2.data_parallel_replicate_degree, par.fsdp2.data_parallel_shard_degree) == (4, 4)
    cfg.shard_degree = 3
    with pytest.raises(ConfigError, match="shard_degree = 3 must divide"):
        builders.build_parallelism(cfg, world_size=16, local_world_size=8)


def test_fsdp1_selectable():
    from composer.utils.parallelism import FSDPConfig
    cfg = load_config(TINY, ["fsdp.version=1", "fsdp.sharding_strategy=HYBRID_SHARD", "fsdp.sync_module_states=true",
                             "fsdp.state_dict_type=full", "fsdp.activation_checkpointing=true"]).fsdp
    par = builders.build_parallelism(cfg, world_size=16, local_world_size=8)
    assert par.fsdp2 is None and isinstance(par.fsdp, FSDPConfig)
    f = par.fsdp
    assert (f.sharding_strategy, f.mixed_precision, f.state_dict_type) == ("HYBRID_SHARD", "PURE", "full")
    assert f.sync_module_states and f.activation_checkpointing and f.use_orig_params
    assert (f.data_parallel_replicate_degree, f.data_parallel_shard_degree) == (2, 8)
    assert builders.build_parallelism(None, 2, 2) is None
    # one GPU per node: FSDP1 would replicate without averaging gradients, so the config is refused
    with pytest.raises(ConfigError, match="would not average gradients"):
        builders.build_parallelism(cfg, world_size=4, local_world_size=1)


def test_callbacks_and_loggers():
    from composer.callbacks import LRMonitor, MemoryMonitor, RuntimeEstimator, SpeedMonitor
    cfg = load_config(TINY, ["callbacks.speed_monitor.gpu_flops_available=1e12"])
    from llmfoundry.train.callbacks.loss_guard import StopOnNonFiniteLoss
    cpu = builders.build_callbacks(cfg.callbacks, on_gpu=False)
    assert [type(c) for c in cpu] == [SpeedMonitor, LRMonitor, RuntimeEstimator, StopOnNonFiniteLoss]
    assert builders.peak_flops_used(cpu) == 1e12
    gpu = builders.build_callbacks(cfg.callbacks, on_gpu=True)
    assert MemoryMonitor in [type(c) for c in gpu]
    off = load_config(TINY, ["callbacks.speed_monitor=null", "callbacks.lr_monitor=false"]).callbacks
    assert SpeedMonitor not in [type(c) for c in builders.build_callbacks(off, on_gpu=False)]
    unguarded = load_config(TINY, ["callbacks.stop_on_nonfinite_loss=false"]).callbacks
    assert StopOnNonFiniteLoss not in [type(c) for c in builders.build_callbacks(unguarded, on_gpu=False)]
    assert builders.build_loggers(cfg.loggers, "r") == []


# ------------------------------------------------------------------------------------------ error translation
def test_shape_mismatch_message():
    err = RuntimeError("Error(s) in loading state_dict for ComposerMPT:\n\tsize mismatch for "
                       "model.transformer.wte.weight: copying a param with shape torch.Size([4096, 64]) from "
                       "checkpoint, the shape in current model is torch.Size([4096, 128]).")
    assert checks.is_shape_mismatch(err)
    msg = checks.shape_mismatch_message(err, "/ck/ep0-ba4-rank0.pt", "d_model=128")
    assert "model.transformer.wte.weight" in msg and "[4096, 64]" in msg and "[4096, 128]" in msg
    assert "/ck/ep0-ba4-rank0.pt" in msg and "Fix" in msg


def test_no_space_detection(tmp_path):
    assert checks.is_no_space(OSError(errno.ENOSPC, "No space left on device"))
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert checks.is_no_space(wrapped)
    assert not checks.is_no_space(OSError(errno.EACCES, "Permission denied"))
    msg = checks.no_space_message(str(tmp_path / "ck"), 10 * checks.GB)
    assert "no space left" in msg and str(tmp_path) in msg and "autoresume" in msg


def test_free_disk_check(tmp_path):
    assert checks.check_free_disk(str(tmp_path / "a" / "b"), 1) is None
    msg = checks.check_free_disk(str(tmp_path / "a" / "b"), 10 ** 18)
    assert "not enough free disk" in msg and str(tmp_path) in msg
    # LION keeps one fp32 state per weight, AdamW two
    assert checks.checkpoint_bytes(10 ** 9, "lion") < checks.checkpoint_bytes(10 ** 9, "adamw")


def test_unreachable_bucket_message(monkeypatch):
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    msg = checks.check_remote("s3://no-such-bucket/ckpt", "save_folder", write=True)
    assert "save_folder" in msg and "no-such-bucket" in msg and "127.0.0.1:9" in msg and "Fix" in msg


def test_missing_bucket_message(s3_server):
    msg = checks.check_remote("s3://missing-bucket-xyz/ck", "load_path", write=False)
    assert "load_path" in msg and "missing-bucket-xyz" in msg
    bucket = s3_server.make_bucket()
    assert checks.check_remote(f"s3://{bucket}/runs/x", "save_folder", write=True) is None
    assert s3_server.client().list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0  # probe removed


# ------------------------------------------------------------------------------------------ overrides into lists
def test_override_indexes_a_list():
    base = load_config(TINY)
    cfg = load_config(TINY, ["optimizer.betas.0=0.8"])
    assert cfg.optimizer.betas == [0.8, 0.95]
    assert cfg.optimizer.lr == base.optimizer.lr and cfg.optimizer.name == base.optimizer.name
    assert load_config(TINY, ["optimizer.betas[1]=0.5"]).optimizer.betas == [0.9, 0.5]  # bracket form
    assert load_config(TINY, ["optimizer.betas=[0.8,0.9]"]).optimizer.betas == [0.8, 0.9]  # whole list
    # applied in order: a whole-list override, then an index into the new list
    assert load_config(TINY, ["optimizer.betas=[0.5,0.6]", "optimizer.betas.1=0.7"]).optimizer.betas == [0.5, 0.7]


def test_override_values_keep_their_dotlist_meaning():
    base = load_config(TINY)
    cfg = load_config(TINY, ["optimizer={lr: 0.001}", "scheduler.t_warmup=5ba", "eval_loader=null",
                             "max_grad_norm=1e-4"])
    assert cfg.optimizer.lr == pytest.approx(0.001) and cfg.optimizer.name == base.optimizer.name  # merged
    assert cfg.optimizer.betas == base.optimizer.betas
    assert cfg.scheduler.t_warmup == "5ba" and cfg.eval_loader is None
    assert cfg.max_grad_norm == pytest.approx(1e-4) and isinstance(cfg.max_grad_norm, float)
    # a mapping merged into a nested mapping keeps the keys it does not name
    cfg = load_config(TINY, ["model={attn_config: {alibi: false}}"])
    assert cfg.model.attn_config.alibi is False
    assert cfg.model.attn_config.attn_impl == base.model.attn_config.attn_impl and cfg.model.d_model == base.model.d_model


def test_override_through_an_interpolated_list_changes_only_that_key(tmp_path):
    text = TINY.read_text() + "\n"
    from omegaconf import OmegaConf
    raw = OmegaConf.create(text)
    raw.variables.betas = [0.9, 0.95]
    raw.optimizer.betas = "${variables.betas}"
    (tmp_path / "c.yaml").write_text(OmegaConf.to_yaml(raw))
    cfg = load_config(tmp_path / "c.yaml", ["optimizer.betas.0=0.8"])
    assert cfg.optimizer.betas == [0.8, 0.95]
    assert cfg.variables["betas"] == [0.9, 0.95]  # the interpolation target is untouched


@pytest.mark.parametrize("overrides, message", [
    (["optimizer.betas.5=0.1"], "config key 'optimizer.betas.5': the list has 2 items (0..1)"),
    (["optimizer.betas.2=0.1"], "config key 'optimizer.betas.2': the list has 2 items (0..1)"),
    (["optimizer.betas.first=0.1"], "config key 'optimizer.betas.first': 'optimizer.betas' is a list; index it "
                                    "with a number 0..1"),
    (["optimizer.lr.0=0.1"], "config key 'optimizer.lr.0': 'optimizer.lr' is 0.002, not a list"),
    (["optimizer.betas=[]", "optimizer.betas.0=0.1"], "config key 'optimizer.betas.0': the list 'optimizer.betas' "
                                                     "is empty"),
])
def test_override_bad_list_index(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, overrides)
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_config_file_errors_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping of keys at the top level"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="cannot parse config file") as e:
        load_config(tmp_path / "bad.yaml")
    assert "\n" not in str(e.value)
    (tmp_path / "indent.yaml").write_text("a: 1\nb:\n  c: 2\n   d: 3\n")  # a mis-indented key: where it is
    with pytest.raises(ConfigError, match="indent.yaml' at line 4, column 5: mapping values are not allowed"):
        load_config(tmp_path / "indent.yaml")


def test_train_cli_bad_list_index_is_one_line(capsys):
    from llmfoundry.train.train import main
    assert main([str(TINY), "optimizer.betas.5=0.8"]) == 1
    err = capsys.readouterr().err
    assert "error: config key 'optimizer.betas.5': the list has 2 items (0..1)" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert main([str(TINY), "max_duration"]) == 1  # an override without '='
    err = capsys.readouterr().err
    assert err.startswith("error: command-line override 'max_duration' must look like key=value"), err


def test_loader_raises_only_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="n_heads=0 must be at least 1"):
        load_config(TINY, ["model.n_heads=0"])
    (tmp_path / "c.yaml").write_text(TINY.read_text() + "\n1: a\n")  # a non-string key
    with pytest.raises(ConfigError, match="unknown config key '1' at the top level"):
        load_config(tmp_path / "c.yaml")


def test_every_problem_of_a_config_in_one_message(tmp_path):
    """Misspelled keys at two levels, a wrong type and an unknown section: one ConfigError names all four."""
    from llmfoundry.train.config import load_config
    from llmfoundry.utils.config import ConfigError
    with pytest.raises(ConfigError) as e:
        load_config(str(REPO / "yamls/tiny-cpu.yaml"),
                    ["max_duratio=3ba", "optimizer.lrr=1e-3", "model.n_layers=two", "colbacks={}"])
    msg = str(e.value)
    assert msg.startswith("4 problems in the config:"), msg
    assert "'max_duratio' at the top level (did you mean 'max_duration'?)" in msg
    assert "'optimizer.lrr' in 'optimizer' (did you mean 'lr'?)" in msg
    assert "config key 'model.n_layers' must be an integer, got 'two'" in msg
    assert "'colbacks' at the top level (did you mean 'callbacks'?)" in msg
    assert len(e.value.problems) == 4
