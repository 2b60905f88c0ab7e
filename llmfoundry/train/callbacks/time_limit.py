"""``callbacks.time_limit`` (off by default): end a launch cleanly, at a checkpoint, before a wall-time limit.

Clusters give a job a wall time (SLURM ``--time``, a cloud reservation); a job still running at its end is killed
and loses every batch since the last checkpoint. With ``max_time`` set to that limit, the run stops after the batch
at whose end the time since this process started, plus the longest batch of this launch so far (a batch's span
includes the evaluation and checkpoint of the one before it), would pass ``max_time - margin_s``. ``margin_s`` is
what the stop itself needs: the checkpoint save (and upload), and the evaluation composer runs when a run ends.

The stop is composer's own end of training (``State.stop_training``: ``max_duration`` becomes the current batch,
and ``max_duration`` is not saved in checkpoints): the usual ``BATCH_CHECKPOINT`` save writes the checkpoint under
its usual name (``latest-rank0.pt`` moved to it, old ones rotated), ``fit`` returns, ``main`` exits with status 0
after printing ``time limit reached: ...``. The same command (``autoresume: true``) continues from that checkpoint
with the configured ``max_duration``; each launch has its own ``max_time``, counted from its process start, and
trains at least one batch. With several ranks, the ranks agree on each batch's decision (one all-reduce of a flag
over a gloo group, as ``preemption.py`` does), so they all stop after the same batch.
"""
from __future__ import annotations

import logging
import sys
import time

from composer.core import Callback, State
from composer.loggers import Logger

log = logging.getLogger(__name__)


def process_start() -> float:
    """When this process started (``time.time()`` scale)."""
    import psutil
    return psutil.Process().create_time()


class TimeLimit(Callback):
    """Stop after the batch that leaves less than ``margin_s`` plus one batch before ``max_time_s``."""

    def __init__(self, max_time_s: float, margin_s: float, save_folder: str | None = None,
                 start: float | None = None):
        self.max_time_s, self.margin_s, self.save_folder = max_time_s, margin_s, save_folder
        self.start = process_start() if start is None else start
        self.group = None
        self.last_end: float | None = None
        self.longest_batch = 0.0
        self.stopped_at: int | None = None

    def fit_start(self, state: State, logger: Logger) -> None:
        from composer.utils import dist

        from llmfoundry.train.preemption import cpu_group
        self.group = cpu_group() if dist.get_world_size() > 1 else None  # every rank calls fit_start
        self.last_end = time.time()

    def batch_end(self, state: State, logger: Logger) -> None:
        from llmfoundry.train.preemption import agreed
        now = time.time()
        self.longest_batch = max(self.longest_batch, now - self.last_end)
        self.last_end = now
        elapsed = now - self.start
        over = elapsed + self.longest_batch > self.max_time_s - self.margin_s
        if not agreed(over, self.group) or state.timestamp >= state.max_duration:
            return
        self.stopped_at = int(state.timestamp.batch)
        log.warning("time limit: %.0f s since the process started, batches take up to %.1f s, max_time is %.0f s "
                    "with a margin of %.0f s: stopping after batch %d and saving a checkpoint", elapsed,
                    self.longest_batch, self.max_time_s, self.margin_s, self.stopped_at)
        state.stop_training()  # the BATCH_CHECKPOINT that follows saves: it is now the last batch

    def fit_end(self, state: State, logger: Logger) -> None:
        if self.stopped_at is None:
            return
        from composer.callbacks import CheckpointSaver
        from composer.utils import dist

        from llmfoundry.train.preemption import checkpoint_name
        savers = [cb for cb in state.callbacks if isinstance(cb, CheckpointSaver)]
        where = checkpoint_name(savers[0], state, self.save_folder or "") if savers else None
        if dist.get_global_rank() != 0:
            return
        saved = (f"saved {where}; run the same command again to continue from it (autoresume)" if where else
                 "no checkpoint was saved (save_folder is not set)")
        message = (f"time limit reached: stopped after batch {self.stopped_at}, {time.time() - self.start:.0f} s "
                   f"after the process started (callbacks.time_limit.max_time = {self.max_time_s:g} s, margin_s = "
                   f"{self.margin_s:g} s); {saved}")
        print(message, file=sys.stderr, flush=True)  # also with python_log_level: null
