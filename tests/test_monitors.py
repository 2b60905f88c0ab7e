"""callbacks.loss_spike / time_limit / optimizer_monitor: real tiny-cpu runs on CPU (scripts/train.py or in-process)."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from composer.core import Callback
from composer.loggers import LoggerDestination

from llmfoundry.train import build_trainer, load_config
from llmfoundry.train.composer_model import ComposerMPT
from llmfoundry.utils.config import ConfigError

from test_train import REPO, TINY, final_state, run_cli

# Lion warming up to lr 0.2 over 40 batches (0.005 more per batch): the loss falls to ~7.5 by batch 7, then the
# learning rate gets too high and it jumps to ~8.9 at batch 8 and stays up (9.15, 9.13, ... 11.9 by batch 16).
SPIKY = ["global_train_batch_size=4", "device_train_microbatch_size=2", "eval_loader=null", "console_log_interval=1ba",
         "callbacks.speed_monitor.window_size=2", "optimizer.lr=0.2", "scheduler.name=constant",
         "scheduler.t_warmup=40ba", "autoresume=false", "save_interval=1ba", "callbacks.loss_spike.window=4",
         "callbacks.loss_spike.threshold=2", "callbacks.loss_spike.patience=3"]


def checkpoints(folder) -> list[str]:
    return sorted((p.name for p in folder.glob("ep*.pt")), key=lambda n: int(n.split("-ba")[1].split("-")[0]))


def same_state(a: dict, b: dict) -> bool:
    opt_a, opt_b = a["optimizers"]["Lion"]["state"], b["optimizers"]["Lion"]["state"]
    return (all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]) and
            all(torch.equal(opt_a[k]["exp_avg"], opt_b[k]["exp_avg"]) for k in opt_a))


# ------------------------------------------------------------------------------------------ loss spikes
def test_loss_spike_stop_keeps_the_checkpoint_from_before_it(tmp_path):
    """Batches 8-10 spike (patience 3): the run stops at batch 10 with one message; with a checkpoint every batch
    and only one kept, the one left is batch 7's: none was written while the loss spiked."""
    r = run_cli([TINY, *SPIKY, f"save_folder={tmp_path}/ck", "max_duration=24ba", "save_num_checkpoints_to_keep=1",
                 "callbacks.loss_spike.action=stop"])
    assert r.returncode == 1, r.stderr[-3000:]
    assert "error: loss spike: the training loss stayed above 8.446 (window of 4 batches: mean 7.824" in r.stderr
    assert "for 3 batches, 8 to 10" in r.stderr
    assert f"the newest checkpoint, {tmp_path}/ck/ep0-ba7-rank0.pt, was written before batch 8" in r.stderr
    assert "Traceback" not in r.stderr
    assert checkpoints(tmp_path / "ck") == ["ep0-ba7-rank0.pt"]


def test_loss_spike_log_warns_once_and_trains_on(tmp_path):
    r = run_cli([TINY, *SPIKY, f"save_folder={tmp_path}/ck", "max_duration=12ba", "save_interval=12ba",
                 "callbacks.loss_spike.action=log"])
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert out.count("loss spike: the training loss stayed above 8.446") == 1  # one warning per spike
    assert "for 3 batches, 8 to 10; training goes on" in out
    assert "loss_spike/sustained: 1.0000" in out and "loss_spike/sustained: 0.0000" in out
    assert checkpoints(tmp_path / "ck") == ["ep0-ba12-rank0.pt"]


def test_loss_spike_skip_leaves_weights_and_optimizer_untouched(tmp_path):
    """action=skip: batches 8, 9, 10 spike (measured before their step) and their steps are skipped, so the
    checkpoints of batches 7, 8 and 9 hold the same weights and LION momentum; 3 in a row stop the run."""
    r = run_cli([TINY, *SPIKY, f"save_folder={tmp_path}/ck", "max_duration=14ba",
                 "save_num_checkpoints_to_keep=-1", "callbacks.loss_spike.action=skip"])
    assert r.returncode == 1, r.stderr[-3000:]
    for b in (8, 9, 10):
        assert f"loss spike: batch {b}'s loss" in r.stderr and "its optimizer step is skipped" in r.stderr
    assert "for 3 batches, 8 to 10" in r.stderr and "skipped the optimizer step of each one" in r.stderr
    ck = tmp_path / "ck"
    assert checkpoints(ck)[-1] == "ep0-ba9-rank0.pt"
    s6, s7, s8, s9 = (final_state(ck, b) for b in (6, 7, 8, 9))
    assert not same_state(s6, s7)  # batch 7 was a normal step
    assert same_state(s7, s8) and same_state(s8, s9)


def test_spike_window_rules():
    """Nothing is judged until the window is full; a spiking loss stays out of the window; ratio and threshold must
    both be exceeded when both are set."""
    from llmfoundry.train.callbacks.loss_guard import SpikeWindow
    w = SpikeWindow(size=3, threshold=2.0, ratio=None)
    assert [w.observe(b, x) for b, x in enumerate([9.0, 5.0, 5.0], 1)] == [False, False, False]  # warm-up
    assert w.bound() == pytest.approx(19 / 3 + 2 * math.sqrt(32 / 9))
    assert w.observe(4, 11.0) and w.losses == [9.0, 5.0, 5.0] and w.run == [(4, 11.0)]
    assert not w.observe(5, 5.0) and w.run == [] and w.losses == [5.0, 5.0, 5.0]
    def both():
        return SpikeWindow(size=2, threshold=1.0, ratio=1.5, losses=[4.0, 4.2])  # mean 4.1, std 0.1
    assert not both().observe(3, 5.0)  # above mean + std, not above 1.5 x mean
    assert both().observe(3, 6.2)


def test_callbacks_are_built_when_set(tmp_path):
    from llmfoundry.train import builders
    from llmfoundry.train.callbacks.loss_guard import LossSpike
    from llmfoundry.train.callbacks.monitors import OptimizerMonitor
    from llmfoundry.train.callbacks.time_limit import TimeLimit
    cfg = load_config(TINY, ["callbacks.loss_spike.action=stop", "callbacks.time_limit.max_time=2h",
                             "callbacks.optimizer_monitor.per_layer=true"]).callbacks
    built = builders.build_callbacks(cfg, on_gpu=False, save_folder=str(tmp_path))
    assert {LossSpike, TimeLimit, OptimizerMonitor} <= {type(c) for c in built}
    assert not {LossSpike, TimeLimit, OptimizerMonitor} & {
        type(c) for c in builders.build_callbacks(load_config(TINY).callbacks, on_gpu=False)}
    with pytest.raises(ConfigError, match="callbacks.time_limit .* needs save_folder"):
        builders.build_callbacks(cfg, on_gpu=False, save_folder=None)


def test_loss_spike_keys_are_checked():
    for bad, key in (("window=1", "window"), ("threshold=-1", "threshold"), ("ratio=0.5", "ratio"),
                     ("patience=0", "patience"), ("action=halt", "action")):
        with pytest.raises(ConfigError, match=key):
            load_config(TINY, [f"callbacks.loss_spike.{bad}"])
    with pytest.raises(ConfigError, match="'threshold' and 'ratio' are both null"):
        load_config(TINY, ["callbacks.loss_spike.threshold=null"])


# ------------------------------------------------------------------------------------------ time limit
FAST = ["global_train_batch_size=4", "device_train_microbatch_size=2", "device_eval_batch_size=4",
        "eval_subset_num_batches=1", "eval_interval=4ba", "max_duration=2ba", "save_interval=10ba",
        "callbacks.speed_monitor.window_size=2"]


def test_time_limit_saves_exits_zero_and_the_same_command_resumes(tmp_path):
    """max_time 1 s: the first launch stops after its first batch with a checkpoint and status 0; the same command
    continues and finishes; the result is bit for bit the uninterrupted run's."""
    cmd = [TINY, *FAST, f"save_folder={tmp_path}/ck", "callbacks.time_limit.max_time=1",
           "callbacks.time_limit.margin_s=0"]
    first = run_cli(cmd)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (f"time limit reached: stopped after batch 1" in first.stderr and
            f"saved {tmp_path}/ck/ep0-ba1-rank0.pt; run the same command again" in first.stderr)
    assert checkpoints(tmp_path / "ck") == ["ep0-ba1-rank0.pt"]
    second = run_cli(cmd)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "time limit reached" not in second.stderr  # batch 2 is the last one: the run ends as usual
    assert final_state(tmp_path / "ck", 2)["timestamp"]["Timestamp"]["batch"] == 2
    ref = run_cli([TINY, *FAST, f"save_folder={tmp_path}/ref"])
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert same_state(final_state(tmp_path / "ck", 2), final_state(tmp_path / "ref", 2))


def test_time_limit_keys_are_checked(tmp_path):
    assert load_config(TINY, ["callbacks.time_limit.max_time=2h30m"]).callbacks.time_limit.max_time_s == 9000
    assert load_config(TINY, ["callbacks.time_limit.max_time=5400"]).callbacks.time_limit.max_time_s == 5400
    with pytest.raises(ConfigError, match="max_time"):
        load_config(TINY, ["callbacks.time_limit.max_time=soon"])
    with pytest.raises(ConfigError, match="missing required config key 'callbacks.time_limit.max_time'"):
        load_config(TINY, ["callbacks.time_limit.margin_s=5"])
    with pytest.raises(ConfigError, match="margin_s"):
        load_config(TINY, ["callbacks.time_limit.max_time=60", "callbacks.time_limit.margin_s=60"])
    r = run_cli([TINY, "save_folder=null", "autoresume=false", "callbacks.time_limit.max_time=1h"])
    assert r.returncode == 1 and "callbacks.time_limit" in r.stderr and "needs save_folder" in r.stderr


# ------------------------------------------------------------------------------------------ optimizer monitor
class Metrics(LoggerDestination):
    def __init__(self):
        self.logged = {}

    def log_metrics(self, metrics, step=None):
        self.logged.update(metrics)


class Before(Callback):
    """Keeps the device batch and the weights that batch ``batch`` (1-based) is computed with."""

    def __init__(self, batch: int):
        self.batch, self.data, self.weights = batch, None, None

    def before_train_batch(self, state, logger):
        if int(state.timestamp.batch) + 1 == self.batch:
            self.data = {k: v.clone() for k, v in state.batch.items()}
            self.weights = {k: v.detach().clone() for k, v in state.model.state_dict().items()}


def test_optimizer_monitor_logs_the_real_norms(tmp_path):
    """Batch 2's logged gradient norms (before clipping to 0.01) and weight norms equal a direct computation: the
    weights before batch 2, its 4 samples in 2 micro-batches, the mean loss's gradient."""
    cfg = load_config(TINY, [*FAST, f"save_folder={tmp_path}/ck", "max_duration=3ba", "eval_loader=null",
                             "max_grad_norm=0.01", "callbacks.optimizer_monitor.interval=2",
                             "callbacks.optimizer_monitor.per_layer=true"])
    trainer = build_trainer(cfg)
    metrics, before = Metrics(), Before(2)
    trainer.logger.destinations = (*trainer.logger.destinations, metrics)
    trainer.state.callbacks.append(before)
    trainer.fit()
    trainer.close()
    logged = metrics.logged

    model = ComposerMPT(cfg.model)
    model.load_state_dict(before.weights)
    model.train()
    n = before.data["input_ids"].shape[0]
    for i in range(0, n, 2):
        mb = {k: v[i:i + 2] for k, v in before.data.items()}
        (model.loss(model(mb), mb) * (2 / n)).backward()
    params = dict(model.named_parameters())
    grad = {k: p.grad.double().norm().item() for k, p in params.items()}  # float64: exact enough
    weight = {k: p.detach().double().norm().item() for k, p in params.items()}
    assert logged["optimizer/grad_norm"] == pytest.approx(math.sqrt(sum(g * g for g in grad.values())), rel=1e-4)
    assert logged["optimizer/grad_norm"] > 0.1  # before clipping to 0.01
    assert logged["optimizer/weight_norm"] == pytest.approx(math.sqrt(sum(w * w for w in weight.values())), rel=1e-5)
    for k in params:
        assert logged[f"optimizer/grad_norm/{k}"] == pytest.approx(grad[k], rel=1e-4, abs=1e-7), k
        assert logged[f"optimizer/weight_norm/{k}"] == pytest.approx(weight[k], rel=1e-5), k
    assert len([k for k in logged if k.startswith("optimizer/grad_norm/")]) == len(params)


def test_optimizer_monitor_keys_are_checked():
    with pytest.raises(ConfigError, match="interval"):
        load_config(TINY, ["callbacks.optimizer_monitor.interval=0"])
    with pytest.raises(ConfigError, match="per_layer"):
        load_config(TINY, ["callbacks.optimizer_monitor.per_layer=maybe"])


PROBE_DRIVER = '''
import math, sys
from composer.core import Callback
from composer.loggers import LoggerDestination
from llmfoundry.train import build_trainer, load_config

class Probe(Callback):
    """The global gradient norm from whole gradients (FSDP2: gathered shards) before the step (no clipping)."""
    def after_train_batch(self, state, logger):
        from torch.distributed.tensor import DTensor
        sq = sum((p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).double().pow(2).sum().item()
                 for p in state.model.parameters())
        print(f"PROBE {math.sqrt(sq)!r}", flush=True)

class Logged(LoggerDestination):
    def log_metrics(self, metrics, step=None):
        if "optimizer/grad_norm" in metrics:
            print(f"LOGGED {metrics['optimizer/grad_norm']!r} {metrics['optimizer/weight_norm']!r}", flush=True)

trainer = build_trainer(load_config(sys.argv[1], sys.argv[2:]))
trainer.logger.destinations = (*trainer.logger.destinations, Logged())
trainer.state.callbacks.append(Probe())
trainer.fit()
trainer.close()
'''


@pytest.mark.parametrize("parallel", [["fsdp=null"], ["fsdp.version=2", "fsdp.mixed_precision=FULL"]],
                         ids=["ddp", "fsdp2"])
def test_optimizer_monitor_on_two_ranks(tmp_path, parallel):
    """2 ranks (gloo): the logged global gradient norm equals the norm of the whole gradients (FSDP2: each rank's
    shard square sums, all-reduced), and the weight norm is the single-process one (the same initial weights)."""
    from test_train_multiprocess import explain
    driver = tmp_path / "probe.py"
    driver.write_text(PROBE_DRIVER)
    args = [TINY, f"save_folder={tmp_path}/ck", "global_train_batch_size=4", "device_train_microbatch_size=1",
            "eval_loader=null", "max_duration=1ba", "max_grad_norm=null", "log_to_console=false",
            "callbacks.optimizer_monitor.interval=1", *parallel]
    r = subprocess.run([sys.executable, "-m", "composer.cli.launcher", "-n", "2", "--stdout",
                        str(tmp_path / "rank{rank}.out"), "--stderr", str(tmp_path / "rank{rank}.err"),
                        str(driver), *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, explain(r, tmp_path)
    out = r.stdout + (tmp_path / "rank1.out").read_text()
    probes = [float(line.split()[1]) for line in out.splitlines() if line.startswith("PROBE")]
    logged = [tuple(map(float, line.split()[1:])) for line in out.splitlines() if line.startswith("LOGGED")]
    assert len(probes) == 2 and len(logged) == 2, out[-2000:]  # one batch on each rank
    for (grad, weight), probe in zip(logged, probes):
        assert grad == pytest.approx(probe, rel=1e-6)
        assert weight == pytest.approx(112.7242, abs=1e-4)  # tiny-cpu's initial weights (seed 17)


def test_loss_spike_skip_on_two_ranks(tmp_path):
    """2 ranks (DDP, gloo): the pre-step loss is averaged over the ranks, so both skip the same batches (8, 9, 10, as
    in one process) and stop together; the weights of batches 7 to 9 are the same."""
    from test_train_multiprocess import explain, launch
    r = launch(2, [TINY, *SPIKY, f"save_folder={tmp_path}/ck", "max_duration=14ba", "device_train_microbatch_size=1",
                   "save_num_checkpoints_to_keep=-1", "callbacks.loss_spike.action=skip"], tmp_path / "logs")
    assert r.returncode == 1, explain(r, tmp_path / "logs")
    assert "error: loss spike: the training loss stayed above 8.446" in r.stderr and "8 to 10" in r.stderr
    # the launcher may end rank 1 as soon as rank 0 stops at batch 10, before rank 1 logs that batch
    rank1 = (tmp_path / "logs" / "rank1.err").read_text()
    for b in (8, 9):
        assert "rank1[" in rank1 and f"loss spike: batch {b}'s loss" in rank1, rank1[-2000:]
    s7, s8, s9 = (final_state(tmp_path / "ck", b) for b in (7, 8, 9))
    assert same_state(s7, s8) and same_state(s8, s9)
