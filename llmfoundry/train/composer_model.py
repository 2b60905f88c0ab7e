"""``ComposerMPT``: the MPT network as a composer ``ComposerModel`` (loss, metrics, FLOPs for MFU).

The network is the single child ``self.model`` (an ``MPTForCausalLM``). Composer's FSDP1 and FSDP2 paths wrap each
direct child of the ``ComposerModel`` and ask that child for ``fsdp_wrap_fn`` (which submodules become FSDP
units: the transformer blocks), ``activation_checkpointing_fn`` and ``param_init_fn`` (meta-device init), so those
live on ``MPTForCausalLM`` and nothing else may be a direct child here (metrics are kept in plain dicts).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity, MaskedAccuracy
from composer.models import ComposerModel

from llmfoundry.models.mpt import MPTConfig, MPTForCausalLM, MPTOutput

from llmfoundry.models.mpt.loss import IGNORE_INDEX


def shift_labels(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Position i predicts token i + 1: drop the last logit and the first label."""
    return logits[:, :-1].contiguous(), labels[:, 1:].contiguous()


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labels that are not ``-100`` (the shift happens here)."""
    logits, targets = shift_labels(logits, labels)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=IGNORE_INDEX)


def _metrics() -> dict:
    return {
        "LanguageCrossEntropy": LanguageCrossEntropy(ignore_index=IGNORE_INDEX),
        "LanguagePerplexity": LanguagePerplexity(ignore_index=IGNORE_INDEX),
        "TokenAccuracy": MaskedAccuracy(ignore_index=IGNORE_INDEX),
    }


class ComposerMPT(ComposerModel):
    """``forward(batch)``: logits (eval, or training with ``train_metrics``), else an ``MPTOutput`` carrying the
    loss the model computed in chunks; ``loss`` = shifted cross-entropy; metrics; ``flops_per_batch``.

    ``config.init_device`` decides where the weights are created: ``meta`` creates them without memory and FSDP
    materializes them shard by shard with the model's ``param_init_fn`` (GPU only).
    """

    def __init__(self, config: MPTConfig, train_metrics: bool = False, checkpoint_blocks: int | None = None):
        super().__init__()
        self.config = config
        self.model = MPTForCausalLM(config)
        self.model.checkpoint_blocks = checkpoint_blocks  # fsdp.activation_checkpointing_blocks (None: every block)
        # plain dicts: metrics must not become children (see module docstring). Composer computes train metrics
        # from full logits on every micro-batch; without them training never materializes the fp32 logits.
        self.train_metrics = _metrics() if train_metrics else {}
        self.eval_metrics = _metrics()

    def forward(self, batch: dict) -> torch.Tensor:
        mask = batch.get("attention_mask")
        if mask is not None and bool((mask[:, 1:] <= mask[:, :-1]).all()):
            mask = None  # right padding only: causal attention never reaches it (keeps flash/triton kernels)
        # training without train metrics: the model computes the loss itself, fused with the head (models/mpt/loss.py)
        labels = batch["labels"] if self.training and not self.train_metrics else None
        out = self.model(input_ids=batch["input_ids"], attention_mask=mask, sequence_id=batch.get("sequence_id"),
                         labels=labels)
        return out if labels is not None else out.logits

    def loss(self, outputs, batch: dict) -> torch.Tensor:
        if isinstance(outputs, MPTOutput):
            return outputs.loss
        return causal_lm_loss(outputs, batch["labels"])

    def eval_forward(self, batch: dict, outputs: torch.Tensor | None = None) -> torch.Tensor:
        return outputs if isinstance(outputs, torch.Tensor) else self.forward(batch)

    def get_metrics(self, is_train: bool = False) -> dict:
        return self.train_metrics if is_train else self.eval_metrics

    def update_metric(self, batch: dict, outputs: torch.Tensor, metric) -> None:
        logits, targets = shift_labels(outputs, batch["labels"])
        metric.update(logits, targets)

    def flops_per_batch(self, batch: dict) -> float:
        """Training FLOPs (forward + backward) of this batch, for SpeedMonitor's throughput and MFU.

        ``MPTConfig.flops_per_token(seq_len)`` gives the training FLOPs per token at that sequence length
        (its docstring has the formula); recomputation from activation checkpointing is not counted (MFU).
        """
        bs, seq_len = batch["input_ids"].shape[:2]
        return float(self.config.flops_per_token(seq_len)) * bs * seq_len
