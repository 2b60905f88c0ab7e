"""Next-token cross-entropy from final hidden states, without materializing the whole fp32 logits tensor.

At B=8, S=2048 and a 50k vocabulary the logits are 3.3 GB in fp32, with as much again for their gradient. Here the
tokens are cut into chunks; each chunk's logits are computed, reduced to a summed loss and dropped, and recomputed
in backward (activation checkpointing), so at most one chunk's logits exist at a time.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_loss_sum(head: Callable, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_causal_lm_loss(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                           labels: torch.LongTensor, chunk_tokens: int = 8192) -> torch.Tensor:
    """Mean over non-ignored targets of -log p(labels[:, i + 1] | position i); ``head`` maps hidden -> logits.

    Equal to ``F.cross_entropy(head(hidden)[:, :-1], labels[:, 1:], ignore_index=-100)`` (0 when every target
    is ignored).
    """
    h = hidden[:, :-1].reshape(-1, hidden.size(-1))
    t = labels[:, 1:].reshape(-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, t.numel(), chunk_tokens):
        end = start + chunk_tokens
        total = total + checkpoint(_chunk_loss_sum, head, h[start:end], t[start:end], use_reentrant=False)
    return total / (t != IGNORE_INDEX).sum().clamp(min=1)
