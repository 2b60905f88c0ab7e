"""``callbacks.stop_on_nonfinite_loss`` (on by default): stop a run whose training loss became NaN or infinite.

Once a batch's loss is not finite, its gradients have already been applied: the weights or the optimizer state in
memory are ruined (with LION, a NaN gradient turns the momentum NaN and sign(NaN) = 0, so every weight it reached
stops changing for good while the run goes on), and each checkpoint written after that point would replace a good
one.
Composer reduces the loss over ranks and copies it to the host after every batch (for logging), so checking it at
``Event.BATCH_END`` costs nothing and every rank sees the same value and stops together. ``BATCH_END`` comes
before ``BATCH_CHECKPOINT``: the batch's checkpoint is never written, and the checkpoints already saved stay as
they are.
"""
from __future__ import annotations

import math

from composer.core import Callback, State
from composer.loggers import Logger

from llmfoundry.train.checks import TrainError


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
