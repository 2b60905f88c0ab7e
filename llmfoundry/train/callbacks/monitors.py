"""``callbacks.optimizer_monitor`` (off by default): gradient and weight L2 norms every ``interval`` batches.

Logged metrics (through composer's logger: console, wandb):

- ``optimizer/grad_norm``: the global gradient norm of the batch *before* clipping (what ``max_grad_norm`` is
  compared with), and ``optimizer/weight_norm``: the global norm of the weights the batch was computed with;
- with ``per_layer: true`` also ``optimizer/grad_norm/<param>`` and ``optimizer/weight_norm/<param>`` for every
  parameter (``<param>`` as in the model's state dict, e.g. ``model.transformer.blocks.0.attn.Wqkv.weight``).

When: composer clips gradients (an algorithm) at ``AFTER_TRAIN_BATCH`` before any callback sees that event, so
the norms are taken at the ``AFTER_BACKWARD`` of the batch's last micro-batch (counted by samples, as
``grad_sync.py`` does): every micro-batch's gradient has been accumulated (composer scales each micro-batch's loss
by its share of the batch: the gradient of the batch's mean loss) and, under DDP, averaged over the ranks, which
all-reduce in that backward. With ``amp_fp16`` the gradients are still scaled then; they are divided by the scale.

Several ranks: under DDP every rank holds the whole, identical gradients: nothing is communicated. Under FSDP
(FSDP2: DTensor parameters and gradients) each rank sums the squares of its local shards, one all-reduce adds the
sums of every parameter over the ranks, and a sum is divided by the number of copies of each element (the
mesh dimensions the DTensor is replicated over: HSDP's replicas), then the square root is taken. FSDP1 is treated
alike (each element on one rank; with ``HYBRID_SHARD`` its replicas would be counted more than once).
"""
from __future__ import annotations

import math

import torch
from composer.core import Callback, State
from composer.loggers import Logger


def param_name(name: str) -> str:
    """A parameter's name without the wrappers' prefixes (DDP's ``module.``, FSDP1's)."""
    for prefix in ("module.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
        name = name.replace(prefix, "")
    return name


def _copies(t: torch.Tensor) -> int:
    """How many ranks hold each element of ``t`` (a DTensor replicated over some mesh dimensions), else 1."""
    from torch.distributed.tensor import DTensor
    if not isinstance(t, DTensor):
        return 1
    mesh = t.device_mesh
    return math.prod(mesh.size(i) for i, p in enumerate(t.placements) if p.is_replicate())


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor
    return t.to_local() if isinstance(t, DTensor) else t


def square_sums(tensors: list[torch.Tensor], sharded: bool) -> torch.Tensor:
    """Sum of squares of each tensor (float32, one entry per tensor); ``sharded``: summed over all ranks."""
    if not tensors:
        return torch.zeros(0)
    local = torch.stack([_local(t).detach().float().pow(2).sum() for t in tensors])
    if sharded:
        from composer.utils import dist
        dist.all_reduce(local, reduce_operation="SUM")
        local /= torch.tensor([float(_copies(t)) for t in tensors], device=local.device)
    return local


def norms(named: list[tuple[str, torch.Tensor]], sharded: bool, prefix: str, per_layer: bool,
          scale: float = 1.0) -> dict[str, float]:
    """``{prefix: global norm}`` (and ``{prefix/name: norm}`` with ``per_layer``) of the named tensors / ``scale``."""
    sq = square_sums([t for _, t in named], sharded).cpu() / (scale * scale)
    out = {prefix: math.sqrt(float(sq.sum()))}
    if per_layer:
        out.update({f"{prefix}/{name}": math.sqrt(float(s)) for (name, _), s in zip(named, sq)})
    return out


class OptimizerMonitor(Callback):
    """Log gradient (pre-clipping) and weight norms every ``interval`` batches; see the module docstring."""

    def __init__(self, interval: int, per_layer: bool = False):
        self.interval, self.per_layer = interval, per_layer
        self.batch_samples = self.seen_samples = 0
        self.due = False

    def before_train_batch(self, state: State, logger: Logger) -> None:
        from llmfoundry.train.grad_sync import num_samples
        self.due = (int(state.timestamp.batch) + 1) % self.interval == 0
        self.batch_samples, self.seen_samples = num_samples(state.batch), 0

    def after_backward(self, state: State, logger: Logger) -> None:
        if not self.due:
            return
        from llmfoundry.train.grad_sync import num_samples
        self.seen_samples += num_samples(state.batch)
        if self.seen_samples < self.batch_samples:  # not the last micro-batch yet
            return
        params = [(param_name(n), p) for n, p in state.model.named_parameters() if p.requires_grad]
        # the same list on every rank (the all-reduce below adds them entry by entry): no gradient counts as 0
        grads = [(n, p.grad if p.grad is not None else p.new_zeros(0)) for n, p in params]
        sharded = state.fsdp_enabled
        from composer.core import Precision
        fp16 = state.precision == Precision.AMP_FP16 and state.scaler is not None  # composer scales the loss then
        scale = float(state.scaler.get_scale()) if fp16 else 1.0
        metrics = norms(grads, sharded, "optimizer/grad_norm", self.per_layer, scale)
        metrics.update(norms(params, sharded, "optimizer/weight_norm", self.per_layer))
        logger.log_metrics(metrics)
