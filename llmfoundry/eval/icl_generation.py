"""Scoring for ``generation_task_with_answers`` ICL tasks (TriviaQA / GSM8K-style question answering).

For each question the model writes an answer greedily, batched with a KV cache: at most ``max_new_tokens`` tokens,
stopping early at EOS or once one of ``stop_sequences`` has been written. The answer is the generated text cut at
the first stop sequence (with ``cot_delimiter``: only the text after its last occurrence, for chain-of-thought
prompts). It is correct when ``normalize_answer`` (``llmfoundry.eval.icl_tasks``) makes it equal to the line's
``answer`` or one of its ``aliases``.

The prompt is built as for the other task types (``icl_tasks.build_prompt``: shots show ``context`` +
``continuation_delimiter`` + ``answer``) with trailing spaces removed, so that the model writes the space before
its answer itself (BPE tokenizers encode ' word' as one token).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence

import torch

from llmfoundry.eval.icl_tasks import ICLTaskConfig, build_prompt, normalize_answer, num_evaluated, splits_head

log = logging.getLogger(__name__)


def extract_answer(generated: str, stop_sequences: Sequence[str] = ("\n",), cot_delimiter: str = "") -> str:
    """The answer in a generation: cut at the first stop sequence; with ``cot_delimiter``, the text after its last
    occurrence (all of it when the delimiter was never written); surrounding whitespace stripped."""
    cut = min((i for i in (generated.find(s) for s in stop_sequences) if i >= 0), default=len(generated))
    answer = generated[:cut]
    if cot_delimiter:
        answer = answer.rsplit(cot_delimiter, 1)[-1]
    return answer.strip()


def accepted_answers(example: dict) -> list[str]:
    """The line's ``answer`` followed by its ``aliases``."""
    return [example["answer"], *example.get("aliases", [])]


def is_correct(prediction: str, answers: Sequence[str]) -> bool:
    """Whether the normalised prediction equals one of the normalised answers."""
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(a) for a in answers)


def _next_logits(model, ids: torch.Tensor, mask: torch.Tensor, cache) -> tuple[torch.Tensor, Any]:
    """Last-position logits ``(B, V)`` and the extended KV cache, from our MPTForCausalLM or a transformers LM."""
    if splits_head(model):  # our model: the output head on the last position only
        out = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True, return_hidden=True)
        return model.logits(out.hidden_states[:, -1]), out.past_key_values
    out = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    return out.logits[:, -1], out.past_key_values


@torch.no_grad()
def greedy_generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, pad_token_id: int = 0,
                    eos_token_id: Optional[int] = None, device: torch.device | str = "cpu",
                    finished: Optional[Callable[[list[int]], bool]] = None) -> list[list[int]]:
    """New token ids for each prompt (one batch, left-padded, decoded with a KV cache), argmax at every step.

    A row ends at ``eos_token_id`` (not included), after ``max_new_tokens`` tokens, or once ``finished(row)``
    says so (e.g. a stop sequence was written); decoding ends when every row has ended."""
    from llmfoundry.generate import left_pad
    ids, mask = left_pad(prompts, pad_token_id)
    ids, mask = ids.to(device), mask.to(device)
    new: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    logits, cache = _next_logits(model, ids, mask, None)
    for step in range(max_new_tokens):
        nxt = logits.float().argmax(dim=-1)
        for j, token in enumerate(nxt.tolist()):
            if done[j]:
                continue
            if token == eos_token_id:
                done[j] = True
                continue
            new[j].append(token)
            done[j] = finished is not None and finished(new[j])
        if all(done) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
        logits, cache = _next_logits(model, nxt[:, None], mask, cache)
    return new


def generation_prompts(cfg: ICLTaskConfig, examples: Sequence[dict], tokenizer, num_fewshot: int,
                       max_seq_len: int) -> tuple[list[list[int]], list[int]]:
    """Token ids of each evaluated example's prompt (trailing spaces removed), left-truncated so that the prompt
    and ``max_new_tokens`` fit in ``max_seq_len``; and the indices of the examples that were truncated."""
    room = max_seq_len - cfg.max_new_tokens
    if room < 1:
        raise ValueError(f"ICL task '{cfg.label}': max_new_tokens={cfg.max_new_tokens} leaves no room for the prompt "
                         f"in the model's max_seq_len={max_seq_len}; lower max_new_tokens")
    prompts, cut = [], []
    for i in range(num_evaluated(cfg, examples)):
        text = build_prompt(cfg, examples, i, num_fewshot).rstrip(" ")
        ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
        if not ids:  # nothing to continue from: start from the BOS/EOS token
            ids = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
        if len(ids) > room:
            cut.append(i)
        prompts.append(ids[-room:])
    return prompts, cut


def generate_answers(model, tokenizer, cfg: ICLTaskConfig, prompts: Sequence[Sequence[int]], *, batch_size: int,
                     device: torch.device | str = "cpu", pad_token_id: int = 0) -> list[str]:
    """The decoded generation for every prompt, in order; prompts of similar length are batched together."""
    def finished(row: list[int]) -> bool:
        text = tokenizer.decode(row, skip_special_tokens=True)
        return any(s in text for s in cfg.stop_sequences)

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        rows = greedy_generate(model, [prompts[i] for i in idx], cfg.max_new_tokens, pad_token_id=pad_token_id,
                               eos_token_id=tokenizer.eos_token_id, device=device,
                               finished=finished if cfg.stop_sequences else None)
        for i, row in zip(idx, rows):
            texts[i] = tokenizer.decode(row, skip_special_tokens=True)
    return texts


def evaluate_generation_task(model, tokenizer, cfg: ICLTaskConfig, examples: Sequence[dict], *, max_seq_len: int,
                             batch_size: int = 8, device: torch.device | str = "cpu",
                             pad_token_id: int = 0) -> list[dict[str, Any]]:
    """One result row per ``num_fewshot``, as ``icl.evaluate_icl_task``; ``predictions`` are the extracted answers."""
    results = []
    for k in cfg.num_fewshot:
        prompts, cut = generation_prompts(cfg, examples, tokenizer, k, max_seq_len)
        texts = generate_answers(model, tokenizer, cfg, prompts, batch_size=batch_size, device=device,
                                 pad_token_id=pad_token_id)
        preds = [extract_answer(t, cfg.stop_sequences, cfg.cot_delimiter) for t in texts]
        correct = sum(is_correct(p, accepted_answers(ex)) for p, ex in zip(preds, examples))
        if cut:
            log.warning("ICL task '%s' %d-shot: %d of %d prompts are longer than max_seq_len=%d minus "
                        "max_new_tokens=%d and were answered from their last %d tokens (the front of the prompt "
                        "dropped); fewer shots or a larger max_seq_len keep them whole", cfg.label, k, len(cut),
                        len(preds), max_seq_len, cfg.max_new_tokens, max_seq_len - cfg.max_new_tokens)
        results.append({"task": cfg.label, "type": cfg.type, "num_fewshot": k, "num_examples": len(preds),
                        "accuracy": correct / len(preds), "predictions": preds, "truncated_examples": len(cut)})
    return results


__all__ = ["extract_answer", "accepted_answers", "is_correct", "greedy_generate", "generation_prompts",
           "generate_answers", "evaluate_generation_task"]
