"""``fsdp.reduce_grads_every_microbatch: false`` (FSDP2): reduce the gradients once per optimizer step instead of
once per micro-batch, and keep the gathered weights between the micro-batches of a step.

composer 0.32.1 skips the gradient sync of all but the last micro-batch only for ``DistributedDataParallel``
(``ddp_sync_context``); under FSDP2 every micro-batch's backward reduce-scatters its gradients, casts the shard to
fp32 and adds it into the sharded gradient (on one GPU: copies and a cast, nothing to communicate).
``SyncGradsOnLastMicrobatch`` turns FSDP2's gradient sync off (``FSDPModule.set_requires_gradient_sync(False)``)
before the forward of every micro-batch but the last of a batch, and on again before the last one: torch then keeps
adding each backward's gradients into an unsharded accumulator and reduce-scatters the sum once, in the last
backward. The same switch keeps each block's gathered weights after those backwards
(``set_reshard_after_backward(False)``), so the next micro-batch's forward does not gather them again (with
``sharding_strategy: SHARD_GRAD_OP`` nothing is gathered between the first forward and the last backward); the last
backward frees them as usual, before the optimizer changes the shards. What that costs in memory: see
``FSDPConfig`` in config.py.

Which micro-batch is the last: at ``Event.BEFORE_TRAIN_BATCH`` ``state.batch`` is the whole device batch; composer
then splits it into micro-batches of ``device_train_microbatch_size`` samples (the last one may be smaller) and runs
``BEFORE_FORWARD`` ... backward ... ``AFTER_BACKWARD`` for each in order, then ``AFTER_TRAIN_BATCH`` and the
optimizer step. The callback counts the samples of each micro-batch at ``BEFORE_FORWARD``: the one that completes
the batch is the last. At ``AFTER_TRAIN_BATCH`` (all backwards done, before the optimizer step) it checks that the
last backward ran with the sync on, so a miscount cannot leave a step with unreduced gradients.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from composer.core import Callback, State
from composer.loggers import Logger

log = logging.getLogger(__name__)


def num_samples(batch) -> int:
    """Samples in a batch as composer's default ``DataSpec`` counts them: the first dimension of its tensors."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    values = batch.values() if isinstance(batch, Mapping) else batch
    for v in values:
        if isinstance(v, torch.Tensor):
            return v.shape[0]
        if isinstance(v, (list, tuple)):
            return len(v)
    raise ValueError(f"cannot count the samples of a {type(batch).__name__} batch (no tensor in it)")


def fsdp2_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every module ``fully_shard`` was applied to (each holds one FSDP2 parameter group)."""
    from torch.distributed.fsdp import FSDPModule
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


class SyncGradsOnLastMicrobatch(Callback):
    """Gradient sync off for all but the last micro-batch of each batch (FSDP2). ``unsynced`` / ``synced`` count the
    micro-batches run each way (logged at the end of ``fit``)."""

    def __init__(self):
        self.modules: list[torch.nn.Module] | None = None
        self.batch_samples = 0
        self.seen_samples = 0
        self.sync = True
        self.unsynced = 0
        self.synced = 0

    def _set_sync(self, sync: bool) -> None:
        for m in self.modules:
            m.set_requires_gradient_sync(sync, recurse=False)
            m.set_reshard_after_backward(sync, recurse=False)
        self.sync = sync

    def before_train_batch(self, state: State, logger: Logger) -> None:
        if self.modules is None:
            self.modules = fsdp2_modules(state.model)
            if not self.modules:
                raise RuntimeError("fsdp.reduce_grads_every_microbatch: false needs an FSDP2 model (fsdp.version: "
                                   "2), but no module of the model was wrapped by fully_shard")
        self.batch_samples = num_samples(state.batch)
        self.seen_samples = 0

    def before_forward(self, state: State, logger: Logger) -> None:
        self.seen_samples += num_samples(state.batch)
        last = self.seen_samples >= self.batch_samples
        if last != self.sync:
            self._set_sync(last)
        if last:
            self.synced += 1
        else:
            self.unsynced += 1

    def after_train_batch(self, state: State, logger: Logger) -> None:
        if not self.sync:
            raise RuntimeError(f"the last micro-batch of batch {int(state.timestamp.batch) + 1} ran without gradient "
                               f"sync ({self.seen_samples} of {self.batch_samples} samples counted): its gradients "
                               "were never reduced. Set fsdp.reduce_grads_every_microbatch: true")

    def fit_end(self, state: State, logger: Logger) -> None:
        if self.modules and not self.sync:
            self._set_sync(True)
        log.info("fsdp.reduce_grads_every_microbatch: false: %d micro-batches ran without gradient reduction, %d "
                 "(the last of each batch) reduced the accumulated gradients", self.unsynced, self.synced)
