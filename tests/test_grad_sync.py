"""``fsdp.reduce_grads_every_microbatch: false``: FSDP2 reduces the gradients once per optimizer step (grad_sync.py).

The training test runs FSDP2 for real on CPU (2 gloo ranks through composer's launcher, as in
test_train_multiprocess.py).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmfoundry.train import builders
from llmfoundry.train.config import load_config
from llmfoundry.train.grad_sync import SyncGradsOnLastMicrobatch, num_samples
from llmfoundry.utils.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "yamls" / "tiny-cpu.yaml")


def test_version_1_is_refused():
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["fsdp.version=1", "fsdp.reduce_grads_every_microbatch=false"])
    msg = str(e.value)
    assert "reduce_grads_every_microbatch: false" in msg and "fsdp.version: 2" in msg, msg
    assert "\n" not in msg


def test_built_only_when_off_with_fsdp2():
    assert builders.build_grad_sync(None, "fp32") == []
    assert builders.build_grad_sync(load_config(TINY, ["fsdp={}"]).fsdp, "fp32") == []  # default: true
    cfg = load_config(TINY, ["fsdp.reduce_grads_every_microbatch=false"]).fsdp
    assert cfg.version == 2
    (cb,) = builders.build_grad_sync(cfg, "fp32")
    assert isinstance(cb, SyncGradsOnLastMicrobatch)


def test_pure_bf16_is_refused():
    """PURE makes the reduce dtype bf16, in which torch would sum the unsharded micro-batch gradients."""
    cfg = load_config(TINY, ["fsdp.reduce_grads_every_microbatch=false"]).fsdp
    assert cfg.mixed_precision == "PURE"
    with pytest.raises(ConfigError) as e:
        builders.build_grad_sync(cfg, "amp_bf16")
    assert "fsdp.mixed_precision: DEFAULT" in str(e.value)
    cfg = load_config(TINY, ["fsdp.reduce_grads_every_microbatch=false", "fsdp.mixed_precision=DEFAULT"]).fsdp
    assert len(builders.build_grad_sync(cfg, "amp_bf16")) == 1


def test_num_samples():
    ids = torch.zeros(5, 7, dtype=torch.long)
    assert num_samples(ids) == 5
    assert num_samples({"input_ids": ids, "labels": ids}) == 5
    assert num_samples({"input_ids": ids[:1], "attention_mask": ids[:1]}) == 1
    assert num_samples([ids[:3], ids[:3]]) == 3


DRIVER = """
import sys
import torch
from composer.core import Callback
from composer.utils import dist
from torch.distributed.tensor import DTensor
from llmfoundry.train import build_trainer, load_config
from llmfoundry.train.grad_sync import SyncGradsOnLastMicrobatch


def full_weights(model):
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


class Probe(Callback):
    # after each backward: are the parameters sharded (DTensors: FSDP2 resharded them), and does any sharded one
    # hold a gradient (FSDP2 sets it when it reduce-scatters)? Gathered parameters are plain tensors.
    def __init__(self):
        self.reduced, self.sharded, self.initial = [], [], None

    def fit_start(self, state, logger):
        self.initial = full_weights(state.model)

    def before_train_batch(self, state, logger):
        self.reduced.append([])
        self.sharded.append([])

    def after_backward(self, state, logger):
        params = list(state.model.parameters())
        self.reduced[-1].append(any(isinstance(p, DTensor) and p.grad is not None for p in params))
        self.sharded[-1].append(all(isinstance(p, DTensor) for p in params))


out, tiny, *overrides = sys.argv[1:]
result = {}
for every in (True, False):
    trainer = build_trainer(load_config(tiny, [*overrides, f"fsdp.reduce_grads_every_microbatch={every}"]))
    probe = Probe()
    trainer.state.callbacks.append(probe)
    trainer.fit()
    (sync,) = [c for c in trainer.state.callbacks if isinstance(c, SyncGradsOnLastMicrobatch)] or [None]
    result[every] = dict(initial=probe.initial, weights=full_weights(trainer.state.model), reduced=probe.reduced,
                         sharded=probe.sharded,
                         counts=None if sync is None else (sync.unsynced, sync.synced))
    trainer.close()
if dist.get_global_rank() == 0:
    torch.save(result, out)
"""


def test_fsdp2_reduce_once_per_step_same_weights(tmp_path):
    """2 ranks, FSDP2 on CPU (fp32), 5 samples per rank per step in micro-batches of 2, 2 and 1, 3 steps of AdamW:
    trained once reducing every micro-batch and once reducing only the last one of each batch. The gradients are
    reduced only in the last backward of each batch (no parameter has its sharded gradient before), the weights stay
    gathered until then, and the final weights agree to fp32 rounding.

    Tolerance: 1e-6 absolute. The runs differ only in the order of fp32 additions (the mean over the ranks of each
    micro-batch's gradient, then the sum over micro-batches, against the other way round): 3e-8 measured. Each step
    moves the weights by up to lr = 1e-3, so a lost or double-counted micro-batch lands far outside it. AdamW, not
    LION: LION's update is the sign of a momentum, equal in both runs almost everywhere, which would hide small
    differences and magnify a few into full steps."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / "result.pt"
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RUN_NAME", None)
    cmd = [sys.executable, "-m", "composer.cli.launcher", "-n", "2", "--stdout", str(logs / "rank{rank}.out"),
           "--stderr", str(logs / "rank{rank}.err"), str(driver), str(out), TINY,
           "save_folder=null", "autoresume=false", "eval_loader=null", "global_train_batch_size=10",
           "device_train_microbatch_size=2", "max_duration=3ba", "scheduler.t_warmup=1ba", "optimizer.name=adamw",
           "optimizer.lr=1e-3", "fsdp.version=2", "fsdp.mixed_precision=FULL", "console_log_interval=1ba"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    logs_text = "".join(f.read_text()[-2000:] for f in sorted(logs.glob("rank*.err")))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:] + logs_text
    result = torch.load(out, weights_only=False)
    every, once = result[True], result[False]
    assert every["counts"] is None and once["counts"] == (6, 3)  # per batch: 2 micro-batches unsynced, 1 synced
    assert every["reduced"] == [[True, True, True]] * 3
    assert once["reduced"] == [[False, False, True]] * 3
    assert every["sharded"] == [[True, True, True]] * 3  # resharded after every backward
    assert once["sharded"] == [[False, False, True]] * 3  # the gathered weights kept until the last backward
    assert "fsdp.reduce_grads_every_microbatch: false: 6 micro-batches ran without gradient reduction" in (
        r.stdout + r.stderr + logs_text)
    for k, w in every["weights"].items():
        assert torch.equal(every["initial"][k], once["initial"][k]), k
        assert torch.allclose(w, once["weights"][k], rtol=0, atol=1e-6), (k, (w - once["weights"][k]).abs().max())
    moved = max((w - every["initial"][k]).abs().max().item() for k, w in every["weights"].items())
    assert moved > 1e-3, moved  # the weights did train
