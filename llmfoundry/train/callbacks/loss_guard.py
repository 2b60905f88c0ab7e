"""``callbacks.stop_on_nonfinite_loss`` (on by default): stop a run whose training loss became NaN or infinite.

Once a batch's loss is not finite, its gradients have already been applied: the weights or the optimizer state in
memory are ruined (with LION, a NaN gradient turns the momentum NaN and sign(NaN) = 0, so every weight it reached
stops changing for good while the run goes on), and each checkpoint written after that point would replace a good
one.
Composer reduces the loss over ranks and copies it to the host after every batch (for logging), so checking it at
``Event.BATCH_END`` costs nothing and every rank sees the same value and stops together. ``BATCH_END`` comes
before ``BATCH_CHECKPOINT``: the batch's checkpoint is never written, and the checkpoints already saved stay as
they are.

``callbacks.loss_spike`` (off by default): ``LossSpike`` below, for a finite loss that jumps and stays up.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from composer.core import Callback, State
from composer.loggers import Logger

from llmfoundry.train.checks import TrainError

log = logging.getLogger(__name__)


class NonFiniteLossError(TrainError):
    """The training loss became NaN or infinite."""


class StopOnNonFiniteLoss(Callback):
    """Raise ``NonFiniteLossError`` at the end of the first batch whose training loss is not finite."""

    def __init__(self, save_folder: str | None = None):
        self.save_folder = save_folder

    def batch_end(self, state: State, logger: Logger) -> None:
        bad = {k: v for k, v in (state.total_loss_dict or {}).items() if not math.isfinite(v)}
        if bad:
            raise NonFiniteLossError(nonfinite_message(bad, int(state.timestamp.batch), self.save_folder))


def nonfinite_message(bad: dict[str, float], batch: int, save_folder: str | None) -> str:
    losses = ", ".join(f"{k} = {v}" for k, v in bad.items())
    kept = (f"the checkpoints already in {save_folder} were written before it and are unchanged"
            if save_folder else "no checkpoints are being saved (save_folder is not set)")
    return (f"the training loss is not finite at batch {batch} ({losses}); stopped before saving it: {kept}. "
            f"Fix: lower optimizer.lr, lengthen scheduler.t_warmup or set max_grad_norm, and check this batch's "
            f"data; then run the same command again (autoresume continues from the latest checkpoint) or start "
            f"from a chosen one with load_path=... Set callbacks.stop_on_nonfinite_loss=false to train on anyway")


# ---------------------------------------------------------------------------------------------------- loss spikes
class LossSpikeError(TrainError):
    """The training loss stayed above its running window for ``patience`` batches."""


@dataclass
class SpikeWindow:
    """The last ``size`` normal losses and the current run of spiking batches (plain numbers: saved in checkpoints)."""
    size: int
    threshold: float | None
    ratio: float | None
    losses: list[float] = field(default_factory=list)
    run: list[tuple[int, float]] = field(default_factory=list)  # (batch, loss) of the consecutive spiking batches

    def stats(self) -> tuple[float, float]:
        n = len(self.losses)
        mean = sum(self.losses) / n
        return mean, math.sqrt(sum((x - mean) ** 2 for x in self.losses) / n)

    def bound(self) -> float | None:
        """The loss above which a batch spikes (None during the warm-up)."""
        if len(self.losses) < self.size:
            return None
        mean, std = self.stats()
        bounds = [mean + self.threshold * std] if self.threshold is not None else []
        bounds += [self.ratio * mean] if self.ratio is not None else []
        return max(bounds)

    def observe(self, batch: int, loss: float) -> bool:
        """Record ``loss`` of ``batch``; True when it spikes (it then joins ``run``, not the window)."""
        bound = self.bound()
        if bound is not None and (loss > bound or not math.isfinite(loss)):
            self.run.append((batch, loss))
            return True
        self.run.clear()
        self.losses = (self.losses + [loss])[-self.size:]
        return False


def spike_message(window: SpikeWindow, action: str, last_checkpoint: str | None, save_folder: str | None) -> str:
    mean, std = window.stats()
    first, last = window.run[0][0], window.run[-1][0]
    losses = ", ".join(f"{v:.4g}" for _, v in window.run[-5:])
    what = "skipped the optimizer step of each" if action == "skip" else "stopped before saving the last"
    if action == "skip":
        kept = (f"none of these batches changed the weights or the optimizer state, so the newest checkpoint"
                f"{', ' + last_checkpoint + ',' if last_checkpoint else ''} holds those from before batch {first}")
    elif last_checkpoint:
        kept = (f"the newest checkpoint, {last_checkpoint}, was written before batch {first}; resume from it with the "
                f"same command (autoresume) or load_path={last_checkpoint}")
    else:
        kept = (f"the checkpoints in {save_folder} predate batch {first}" if save_folder else
                "no checkpoints are being saved (save_folder is not set)")
    return (f"loss spike: the training loss stayed above {window.bound():.4g} (window of {window.size} batches: "
            f"mean {mean:.4g}, std {std:.4g}) for {len(window.run)} batches, {first} to {last} (last losses: "
            f"{losses}); {what} one: {kept}. Fix: lower optimizer.lr or lengthen scheduler.t_warmup, check the data "
            f"of these batches; callbacks.loss_spike.action=log only reports spikes")


def _grads_off(state: State) -> None:
    for p in state.model.parameters():
        p.grad = None


class LossSpike(Callback):
    """``callbacks.loss_spike`` (off by default): a training loss that stays far above its recent values.

    Each batch's loss is compared with the window of the last ``window`` normal losses (a spiking loss never enters the
    window). A batch spikes when its loss is above ``mean + threshold * std`` of the window and, when ``ratio`` is set,
    also above ``ratio * mean``. Nothing is judged until the window is full (the warm-up). ``patience`` consecutive
    spiking batches make a sustained spike, and then:

    - ``log``: one warning line per spike and the metric ``loss_spike/sustained`` = 1 (0 otherwise), with
      ``loss_spike/window_mean`` and ``loss_spike/window_std`` every batch;
    - ``stop``: ``LossSpikeError`` (``main`` prints ``error: loss spike ...``, exit status 1) at ``BATCH_END``, before
      that batch's checkpoint. While a batch spikes (from its first spiking batch on) no checkpoint is written:
      composer's ``CheckpointSaver`` asks its ``save_interval`` at ``BATCH_CHECKPOINT``, which this callback wraps at
      ``FIT_START`` (a save due during the suspicion is made at the first normal batch after it). So the newest
      checkpoint, the one the message names, was written at a batch before the spike's first batch, and rotation
      (``save_num_checkpoints_to_keep``) cannot have removed it. As with the NaN guard, the spike's first loss was
      computed with that checkpoint's weights: when the spike comes from an update (a learning rate too high) rather
      than from data, restart from an earlier one. A preemption save (``preemption.py``) is not held back;
    - ``skip``: the optimizer step of every spiking batch is skipped (from its first spiking batch on, before the step):
      at ``AFTER_TRAIN_BATCH`` (after backward and clipping, before ``optimizer.step``) the batch's loss is averaged
      over its micro-batches and all ranks (one all-reduce of two numbers, so every rank decides alike) and, when it
      spikes, every gradient is set to ``None``: torch's optimizers, LION and composer's DecoupledAdamW leave a
      parameter without a gradient untouched (weights, moments, step counts). The scheduler still advances and the
      batch's data is consumed. ``patience`` consecutive skipped batches stop the run as ``stop`` does (its checkpoints
      hold the weights from before the spike, since none of the spiking batches changed them).
    """

    def __init__(self, window: int, threshold: float | None, ratio: float | None, patience: int, action: str,
                 save_folder: str | None = None):
        self.window = SpikeWindow(window, threshold, ratio)
        self.patience, self.action, self.save_folder = patience, action, save_folder
        self.reported = False  # the warning of the current sustained spike was logged
        self.pending_save = False  # a periodic save was held back during a suspicion
        self.loss_sum = self.samples = None  # pre-step loss of the batch (``skip``)

    # --- checkpoints are held back while a batch spikes (``stop``) ---------------------------------------------
    def fit_start(self, state: State, logger: Logger) -> None:
        if self.action != "stop":
            return
        from composer.callbacks import CheckpointSaver
        for saver in (cb for cb in state.callbacks if isinstance(cb, CheckpointSaver)):
            saver.save_interval = self._hold_back(saver.save_interval)

    def _hold_back(self, due):
        def save_interval(state: State, event) -> bool:
            is_due = due(state, event)
            if self.window.run and state.timestamp < state.max_duration:
                self.pending_save = self.pending_save or is_due
                return False
            if self.pending_save:
                self.pending_save = False
                return True
            return is_due
        return save_interval

    # --- ``skip``: the loss before the optimizer step -------------------------------------------------------
    def before_train_batch(self, state: State, logger: Logger) -> None:
        self.loss_sum, self.samples = 0.0, 0

    def after_loss(self, state: State, logger: Logger) -> None:
        if self.action != "skip":
            return
        from llmfoundry.train.grad_sync import num_samples
        n = num_samples(state.batch)
        loss = state.loss["total"] if isinstance(state.loss, dict) else state.loss
        self.loss_sum = self.loss_sum + loss.detach().float().mean() * n
        self.samples += n

    def after_train_batch(self, state: State, logger: Logger) -> None:
        if self.action != "skip":
            return
        import torch
        from composer.utils import dist
        total = state.device.tensor_to_device(torch.tensor([0.0, float(self.samples)]))
        total[0] += self.loss_sum
        dist.all_reduce(total, reduce_operation="SUM")
        loss = (total[0] / total[1]).item()
        batch = int(state.timestamp.batch) + 1
        if self.window.observe(batch, loss):
            _grads_off(state)
            log.warning("loss spike: batch %d's loss %.4g is above %.4g; its optimizer step is skipped", batch, loss,
                        self.window.bound())

    # --- the decision, at the end of each batch ------------------------------------------------------------
    def batch_end(self, state: State, logger: Logger) -> None:
        if self.action != "skip":
            loss = (state.total_loss_dict or {}).get("loss/train/total")
            if loss is None:
                return
            self.window.observe(int(state.timestamp.batch), loss)
        w = self.window
        sustained = len(w.run) >= self.patience
        metrics = {"loss_spike/sustained": float(sustained), "loss_spike/spiking": float(bool(w.run))}
        if w.losses:
            metrics["loss_spike/window_mean"], metrics["loss_spike/window_std"] = w.stats()
        logger.log_metrics(metrics)
        if not sustained:
            self.reported = False
            return
        if self.action == "log":
            if not self.reported:
                mean, std = w.stats()
                log.warning("loss spike: the training loss stayed above %.4g (window mean %.4g, std %.4g) for %d "
                            "batches, %d to %d; training goes on (callbacks.loss_spike.action=log)", w.bound(), mean,
                            std, len(w.run), w.run[0][0], w.run[-1][0])
                self.reported = True
            return
        raise LossSpikeError(spike_message(w, self.action, self._last_checkpoint(state), self.save_folder))

    def _last_checkpoint(self, state: State) -> str | None:
        from composer.callbacks import CheckpointSaver

        from llmfoundry.train.preemption import checkpoint_name
        for saver in (cb for cb in state.callbacks if isinstance(cb, CheckpointSaver)):
            return checkpoint_name(saver, state, self.save_folder or "")
        return None

    # --- the window travels in the checkpoint --------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"losses": list(self.window.losses)}

    def load_state_dict(self, state: dict) -> None:
        self.window.losses = list(state.get("losses", []))[-self.window.size:]
