"""Batched autoregressive decoding with a KV cache: greedy, temperature, top-k, top-p."""
from __future__ import annotations

from typing import Iterator, Optional, Sequence, Union

import torch


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token ids ``(B,)`` from last-position logits ``(B, V)``; temperature 0 is greedy (argmax)."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p  # keep the smallest prefix reaching top_p (at least one)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def stream(model, input_ids: torch.LongTensor, max_new_tokens: int,
           attention_mask: Optional[torch.Tensor] = None, temperature: float = 0.0,
           top_k: Optional[int] = None, top_p: Optional[float] = None,
           eos_token_id: Union[int, Sequence[int], None] = None,
           generator: Optional[torch.Generator] = None, *, use_cache: bool = True,
           pad_token_id: Optional[int] = None) -> Iterator[torch.LongTensor]:
    """The new tokens of ``generate``, one step at a time: yields a ``(B,)`` tensor per step, as soon as it is
    picked (for printing text while it is produced).

    Same arguments and the same tokens as ``generate`` (which is built on it), except that ``do_sample`` is not
    taken: ``temperature`` alone decides (0 = greedy). A row that produced ``eos_token_id`` holds ``pad_token_id``
    (else its eos) afterwards; the stream ends after ``max_new_tokens`` steps or when every row is done. The model
    runs in eval mode until the stream is exhausted or closed (``close()`` it when stopping early)."""
    was_training = model.training
    model.eval()
    try:
        b = input_ids.shape[0]
        eos = None
        if eos_token_id is not None:
            ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
            eos = torch.tensor(ids, device=input_ids.device)
        mask = attention_mask
        out = model(input_ids, attention_mask=mask, use_cache=use_cache)
        cache, logits = out.past_key_values, out.logits[:, -1]
        tokens = [input_ids]
        done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        fill = torch.zeros(b, dtype=input_ids.dtype, device=input_ids.device)
        for step in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, generator).to(input_ids.dtype)
            if eos is not None:
                nxt = torch.where(done, fill, nxt)
                hit = torch.isin(nxt, eos) & ~done
                fill = torch.where(hit, nxt if pad_token_id is None else torch.full_like(nxt, pad_token_id), fill)
                done = done | hit
            tokens.append(nxt[:, None])
            yield nxt
            if step == max_new_tokens - 1 or (eos is not None and bool(done.all())):
                break
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
            if use_cache:
                out = model(nxt[:, None], attention_mask=mask, past_key_values=cache, use_cache=True)
            else:
                out = model(torch.cat(tokens, dim=1), attention_mask=mask)
            cache, logits = out.past_key_values, out.logits[:, -1]
    finally:
        model.train(was_training)


@torch.no_grad()
def generate(model, input_ids: torch.LongTensor, max_new_tokens: int,
             attention_mask: Optional[torch.Tensor] = None, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None,
             eos_token_id: Union[int, Sequence[int], None] = None,
             generator: Optional[torch.Generator] = None, *, do_sample: Optional[bool] = None,
             use_cache: bool = True, pad_token_id: Optional[int] = None) -> torch.LongTensor:
    """Prompt plus up to ``max_new_tokens`` new tokens, ``(B, S + n)``.

    Left-pad batched prompts and pass ``attention_mask`` (0 = padding). A row that produced ``eos_token_id``
    (an id or a list of ids) is filled afterwards with ``pad_token_id`` if given, else with that row's eos;
    decoding stops when every row is done. The model runs in eval mode (restored afterwards). ``stream`` yields
    the same tokens one step at a time.

    transformers' keywords mean what they mean there: ``do_sample=False`` decodes greedily whatever the
    temperature; ``do_sample=True`` samples, at temperature 1.0 unless one above 0 is given; ``do_sample`` left
    out samples when ``temperature > 0``. ``use_cache=False`` runs the whole sequence at every step (same tokens,
    slower).
    """
    if do_sample is False:
        temperature = 0.0
    elif do_sample and temperature <= 0:
        temperature = 1.0
    new = stream(model, input_ids, max_new_tokens, attention_mask, temperature, top_k, top_p, eos_token_id,
                 generator, use_cache=use_cache, pad_token_id=pad_token_id)
    return torch.cat([input_ids] + [t[:, None] for t in new], dim=1)
