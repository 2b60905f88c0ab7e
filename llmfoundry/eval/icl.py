"""Log-likelihood scoring of in-context-learning (ICL) tasks, and ``evaluate_icl_task``, which evaluates any task.

Scored here, from the model's log-probabilities of each continuation given its few-shot prompt:

* ``language_modeling``: correct when greedy decoding reproduces the whole continuation;
* ``multiple_choice``: the choice with the highest (optionally length-normalized) log-likelihood;
* ``schema``: the context option under which the shared continuation is likeliest.

``generation_task_with_answers`` tasks are handed to ``llmfoundry.eval.icl_generation`` (generated answers).
The task config (``ICLTaskConfig``), the four types' JSONL forms and their validation (``load_task_examples``) and
the few-shot prompts (``build_prompt``) live in ``llmfoundry.eval.icl_tasks``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from llmfoundry.eval.icl_generation import evaluate_generation_task
from llmfoundry.eval.icl_tasks import ICLTaskConfig, build_prompt, load_task_examples, num_evaluated, splits_head

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Requests

def split_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    """Move trailing spaces of the context onto the continuation (BPE tokenizers encode ' word' as one token)."""
    stripped = context.rstrip(" ")
    return stripped, context[len(stripped):] + continuation


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


@dataclass
class Request:
    """One row to score: ``context`` tokens followed by ``continuation`` tokens."""
    example: int
    choice: int
    context: list[int]
    continuation: list[int]
    chars: int  # characters in the continuation text (for 'chars' normalization)
    cut: int = 0  # context tokens dropped from the front to fit max_seq_len


def build_requests(cfg: ICLTaskConfig, examples: Sequence[dict], tokenizer, num_fewshot: int,
                   max_seq_len: int) -> list[Request]:
    """Tokenized rows for every evaluated example: one for language modeling, one per choice for multiple choice,
    one per context option (each followed by the same continuation) for schema."""
    n_eval = num_evaluated(cfg, examples)
    requests = []
    for i in range(n_eval):
        ex = examples[i]
        if cfg.type == "schema":
            rows = [(build_prompt(cfg, examples, i, num_fewshot, option=c), ex["continuation"])
                    for c in range(len(ex["context_options"]))]
        else:
            prompt = build_prompt(cfg, examples, i, num_fewshot)
            conts = ex["choices"] if cfg.type == "multiple_choice" else [ex["continuation"]]
            rows = [(prompt, cont) for cont in conts]
        for c, (prompt, cont) in enumerate(rows):
            ctx_text, cont_text = split_trailing_space(prompt, cont)
            ctx = _encode(tokenizer, ctx_text, special=True)
            cont_ids = _encode(tokenizer, cont_text, special=False)
            if not cont_ids:
                raise ValueError(f"ICL task '{cfg.label}' example {i}: the continuation {cont!r} tokenizes to "
                                 "nothing; every answer needs at least one token")
            if len(cont_ids) >= max_seq_len:
                raise ValueError(f"ICL task '{cfg.label}' example {i}: the continuation is {len(cont_ids)} tokens, "
                                 f"the model's max_seq_len is {max_seq_len}; raise max_seq_len")
            keep = max_seq_len - len(cont_ids)
            if not ctx:  # a continuation must be predicted from something: fall back to the EOS/BOS token
                ctx = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
            requests.append(Request(i, c, ctx[-keep:], cont_ids, len(cont_text), max(0, len(ctx) - keep)))
    return requests


# ----------------------------------------------------------------------------------------------------------------
# Scoring

def model_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits ``(B, S, V)`` from our MPTForCausalLM or any transformers causal LM."""
    out = model(input_ids)
    return out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def score_requests(model, requests: Sequence[Request], batch_size: int, device: torch.device | str,
                   pad_token_id: int = 0) -> list[tuple[float, bool]]:
    """For each request: (sum of continuation log-probs, whether greedy decoding reproduces the continuation).

    Rows are sorted by length and right-padded; padding after a row cannot change its logits (causal attention).
    """
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i].context) + len(requests[i].continuation)))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        rows = [requests[i].context + requests[i].continuation for i in idx]
        width = max(len(r) for r in rows) - 1  # the last token is never an input
        ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, :len(r) - 1] = torch.tensor(r[:-1])
        ids = ids.to(device)
        if splits_head(model):
            hidden, logits = model(ids, return_hidden=True).hidden_states, None
        else:
            hidden, logits = None, model_logits(model, ids)
        for j, i in enumerate(idx):
            req = requests[i]
            lo = len(req.context) - 1
            hi = lo + len(req.continuation)
            rows = model.logits(hidden[j, lo:hi]) if hidden is not None else logits[j, lo:hi]
            logprobs = F.log_softmax(rows.float(), dim=-1)
            target = torch.tensor(req.continuation, device=logprobs.device)
            ll = logprobs.gather(1, target[:, None]).sum().item()
            greedy = bool((logprobs.argmax(-1) == target).all().item())
            results[i] = (ll, greedy)
    return results  # type: ignore[return-value]


def _normalize(ll: float, req: Request, how: str) -> float:
    if how == "tokens":
        return ll / len(req.continuation)
    if how == "chars":
        return ll / max(req.chars, 1)
    return ll


def accuracy_from_scores(cfg: ICLTaskConfig, examples: Sequence[dict], requests: Sequence[Request],
                         scores: Sequence[tuple[float, bool]]) -> tuple[float, list[int]]:
    """Task accuracy and per-example predictions (LM: 1/0 correct; MC: chosen choice; schema: chosen option).
    Schema options share one continuation, so they are compared on its summed log-probs (no normalization)."""
    if cfg.type == "language_modeling":
        preds = [int(greedy) for _, greedy in scores]
        return sum(preds) / len(preds), preds
    how = cfg.length_normalization if cfg.type == "multiple_choice" else "none"
    by_example: dict[int, list[tuple[int, float]]] = {}
    for req, (ll, _) in zip(requests, scores):
        by_example.setdefault(req.example, []).append((req.choice, _normalize(ll, req, how)))
    preds, correct = [], 0
    for i in sorted(by_example):
        choice = max(by_example[i], key=lambda t: t[1])[0]  # ties: the first choice
        preds.append(choice)
        correct += int(choice == examples[i]["gold"])
    return correct / len(preds), preds


def evaluate_icl_task(model, tokenizer, cfg: ICLTaskConfig, *, max_seq_len: int, batch_size: int = 8,
                      device: torch.device | str = "cpu") -> list[dict[str, Any]]:
    """Evaluate one task at every ``num_fewshot``; one result row per shot count (task, type, num_fewshot,
    num_examples, accuracy, predictions, truncated_examples)."""
    examples = load_task_examples(cfg.path, cfg.type)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    if cfg.type == "generation_task_with_answers":
        return evaluate_generation_task(model, tokenizer, cfg, examples, max_seq_len=max_seq_len,
                                        batch_size=cfg.batch_size or batch_size, device=device, pad_token_id=pad)
    rows = []
    for k in cfg.num_fewshot:
        requests = build_requests(cfg, examples, tokenizer, k, max_seq_len)
        scores = score_requests(model, requests, cfg.batch_size or batch_size, device, pad)
        acc, preds = accuracy_from_scores(cfg, examples, requests, scores)
        cut = sorted({r.example for r in requests if r.cut})
        if cut:
            log.warning("ICL task '%s' %d-shot: %d of %d examples are longer than max_seq_len=%d and were scored on "
                        "their last %d tokens (the front of the prompt dropped); fewer shots or a larger max_seq_len "
                        "keep them whole", cfg.label, k, len(cut), len(preds), max_seq_len, max_seq_len)
        rows.append({"task": cfg.label, "type": cfg.type, "num_fewshot": k, "num_examples": len(preds),
                     "accuracy": acc, "predictions": preds, "truncated_examples": len(cut)})
    return rows


__all__ = ["split_trailing_space", "Request", "build_requests", "model_logits", "score_requests",
           "accuracy_from_scores", "evaluate_icl_task"]
