"""Loss and perplexity of a causal LM over MDS token streams.

``perplexity = exp(total next-token cross-entropy / number of predicted tokens)``, where every position but
the last of each sample predicts the next token (labels of ``-100`` are skipped), i.e. the token-weighted mean
over the whole stream, not a mean of per-batch means.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _accepts_sequence_id(model) -> bool:
    try:
        return "sequence_id" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


@torch.no_grad()
def token_losses(model, input_ids: torch.Tensor, labels: torch.Tensor,
                 sequence_id: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropies, number of predicted tokens) for one batch, in fp32."""
    from llmfoundry.eval.icl_tasks import splits_head
    kwargs = {"sequence_id": sequence_id} if sequence_id is not None and _accepts_sequence_id(model) else {}
    targets = labels[:, 1:]
    if splits_head(model):  # logits one row at a time: (S, vocab) fp32 instead of (B, S, vocab)
        hidden = model(input_ids, return_hidden=True, **kwargs).hidden_states
        loss = sum(F.cross_entropy(model.logits(hidden[i, :-1]).float(), targets[i], ignore_index=IGNORE_INDEX,
                                   reduction="sum") for i in range(hidden.shape[0]))
    else:
        out = model(input_ids, **kwargs)
        logits = (out.logits if hasattr(out, "logits") else out)[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (targets != IGNORE_INDEX).sum()


@torch.no_grad()
def evaluate_perplexity(model, batches: Iterable[dict], device: torch.device | str = "cpu",
                        max_batches: Optional[int] = None, max_seq_len: Optional[int] = None) -> dict[str, Any]:
    """``{'loss', 'perplexity', 'tokens', 'batches'}`` over ``batches`` (dicts with ``input_ids``, ``labels`` and
    optionally ``sequence_id``, as ``build_text_dataloader`` yields them). ``max_seq_len``: score only the first
    that many tokens of each sample (the model's context, when the samples are longer)."""
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    n = 0
    for batch in batches:
        if max_batches is not None and n >= max_batches:
            break
        ids = batch["input_ids"][:, :max_seq_len].to(device)
        labels = batch.get("labels", batch["input_ids"])[:, :max_seq_len].to(device)
        seq = batch.get("sequence_id")
        loss, tokens = token_losses(model, ids, labels, seq[:, :max_seq_len].to(device) if seq is not None else None)
        total += loss.double().cpu()
        count += int(tokens)
        n += 1
    if count == 0:
        raise ValueError("the eval stream produced no tokens to score; check its path/split, and that it has at "
                         "least one full batch (or set drop_last: false)")
    loss = float(total) / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count, "batches": n}


def build_eval_batches(loader_cfg, batch_size: int, eos_token_id: Optional[int] = None,
                       vocab_size: Optional[int] = None, tokenizer=None):
    """A dataloader over ``loader_cfg`` (a ``TextLoaderConfig``); ``eos_token_id`` adds ``sequence_id``;
    ``vocab_size`` makes token ids outside the model's vocabulary an error naming the stream; ``tokenizer``
    tokenizes streams of raw text (a ``text`` column; padding is not scored)."""
    from llmfoundry.data.text_loader import build_text_dataloader
    return build_text_dataloader(loader_cfg, batch_size, eos_token_id, vocab_size=vocab_size, tokenizer=tokenizer)


__all__ = ["evaluate_perplexity", "token_losses", "build_eval_batches"]
