"""Text generation helpers around ``MPTForCausalLM.generate``: prompts in, completions out.

Prompts are tokenized, grouped into batches of ``batch_size``, left-padded (so every row's last prompt token sits
at the same position and new tokens are appended in lockstep), and decoded with the model's KV cache. Greedy
decoding is ``temperature: 0``; sampling uses ``temperature`` / ``top_k`` / ``top_p`` with a ``torch.Generator``
seeded from ``seed``, so the same seed and batch give the same text.

Prompts longer than the model's ``max_seq_len`` are refused with a message: an ALiBi model can run longer
sequences than it was trained on once ``max_seq_len`` is raised (``load_model(..., max_seq_len=N)`` or
``scripts/generate.py --max_seq_len N``).

Two mismatches are refused up front with the fix rather than failing (or printing garbage) mid-generation:
``check_attn_impl`` (a GPU-only ``attn_impl`` -- 'flash', 'triton' -- on a CPU, 'flash' without flash-attn or in
fp32) and ``check_tokenizer_fits`` (a tokenizer with more tokens than the model's ``vocab_size``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch


@dataclass
class SamplingConfig:
    """How to pick each new token. ``temperature: 0`` = greedy (argmax); ``top_k: 0`` / ``top_p: 1`` = off."""
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop_at_eos: bool = True

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1 = off)")
        if self.temperature == 0 and (self.top_k or self.top_p < 1.0):
            raise ValueError(f"top_k={self.top_k} / top_p={self.top_p} only shape sampling, and temperature=0 is "
                             f"greedy decoding; set a temperature > 0 (e.g. 0.8) to sample")


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def make_generator(seed: Optional[int], device: torch.device | str) -> Optional[torch.Generator]:
    """A generator on ``device`` seeded with ``seed`` (None: the global RNG)."""
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` with every row right-aligned; padding has mask 0."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask


def max_seq_len_of(model) -> Optional[int]:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "max_seq_len", None)


def check_length(model, prompt_len: int, max_new_tokens: int) -> None:
    """Refuse, with the fix, a prompt + generation that runs past the model's ``max_seq_len``."""
    limit = max_seq_len_of(model)
    if limit is None or prompt_len + max_new_tokens <= limit:
        return
    cfg = model.config
    alibi = getattr(getattr(cfg, "attn_config", None), "alibi", False)
    room = limit - prompt_len
    shorter = f", or lower max_new_tokens to {room}" if room > 0 else ""
    fix = (f"raise max_seq_len to at least {prompt_len + max_new_tokens} (--max_seq_len; this ALiBi model runs "
           f"past its training length){shorter}" if alibi else
           "shorten the prompt or max_new_tokens (a model with learned position embeddings cannot run longer)")
    raise ValueError(f"prompt of {prompt_len} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
                     f"max_seq_len={limit}; {fix}")


def _device_type(device) -> str:
    return device.type if isinstance(device, torch.device) else torch.device(device).type


def _dtype_name(dtype) -> Optional[str]:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        from llmfoundry.checkpoint import to_dtype
        dtype = to_dtype(dtype)
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


def check_attn_impl(attn_impl: Optional[str], device, dtype=None, *, hint: str = "") -> None:
    """Refuse an ``attn_impl`` that cannot run on ``device`` (a ``torch.device`` or 'cpu' / 'cuda') in ``dtype``.

    'flash' and 'triton' are CUDA kernels; 'flash' also needs the flash-attn package and fp16/bf16. ``hint`` is
    appended to the message (e.g. where the setting came from). ``None`` / 'torch' / 'flex' always pass."""
    if attn_impl not in ("flash", "triton"):
        return
    if _device_type(device) != "cuda":
        needs = "a CUDA GPU and the flash-attn package" if attn_impl == "flash" else "a CUDA GPU"
        raise ValueError(f"attn_impl '{attn_impl}' needs {needs}; use torch or flex on CPU{hint}")
    import importlib.util
    if attn_impl == "flash":
        if importlib.util.find_spec("flash_attn") is None:
            raise ValueError("attn_impl 'flash' needs the flash-attn package (pip install 'mpt-forge[flash]'), "
                             f"which is not installed; use torch, flex or triton{hint}")
        name = _dtype_name(dtype)
        if name is not None and name not in ("fp16", "bf16"):
            raise ValueError(f"attn_impl 'flash' runs in fp16/bf16, not {name}; use bf16 or attn_impl torch, flex "
                             f"or triton{hint}")
    elif importlib.util.find_spec("triton") is None:
        raise ValueError(f"attn_impl 'triton' needs the triton package, which is not installed; use torch or "
                         f"flex{hint}")


def attn_impl_of(model) -> Optional[str]:
    return getattr(getattr(getattr(model, "config", None), "attn_config", None), "attn_impl", None)


def check_tokenizer_fits(tokenizer, vocab_size: Optional[int], name: Optional[str] = None, *,
                         flag: Optional[str] = None) -> None:
    """Refuse a tokenizer with more tokens than the model's ``vocab_size``: it can emit ids that have no
    embedding row. Fewer tokens is fine (vocab sizes are padded, e.g. to a multiple of 64). ``name`` and the
    option that chose the tokenizer (``flag``, e.g. '--tokenizer') are named in the message."""
    n = len(tokenizer)
    if vocab_size is None or n <= vocab_size:
        return
    label = f"tokenizer '{name}'" if name else "the tokenizer"
    raise ValueError(f"{label} has {n} tokens but the model's vocab_size is {vocab_size}, so it can produce ids "
                     "the model has no embedding for; use the tokenizer the model was trained with (it is stored "
                     f"with the checkpoint and used by default{': drop ' + flag if flag else ''})")


@torch.no_grad()
def generate_ids(model, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, *, pad_token_id: int = 0,
                 eos_token_id: Optional[int] = None, generator: Optional[torch.Generator] = None
                 ) -> list[list[int]]:
    """New token ids for one batch of tokenized prompts (left-padded together); EOS and after are cut."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("an empty prompt has nothing to continue from; give every prompt at least one token "
                         "(or prepend the tokenizer's BOS/EOS token)")
    check_length(model, max(len(p) for p in prompts), cfg.max_new_tokens)
    device = model_device(model)
    check_attn_impl(attn_impl_of(model), device, next(model.parameters()).dtype)
    ids, mask = left_pad(prompts, pad_token_id)
    ids, mask = ids.to(device), mask.to(device)
    eos = eos_token_id if cfg.stop_at_eos else None
    out = model.generate(ids, cfg.max_new_tokens, attention_mask=mask, temperature=cfg.temperature,
                         top_k=cfg.top_k or None, top_p=cfg.top_p if cfg.top_p < 1.0 else None,
                         eos_token_id=eos, generator=generator)
    new = out[:, ids.shape[1]:].tolist()
    if eos is not None:
        new = [row[:row.index(eos)] if eos in row else row for row in new]
    return new


def stream_ids(model, prompt: Sequence[int], cfg: SamplingConfig, *, stop_ids: Sequence[int] = (),
               generator: Optional[torch.Generator] = None) -> Iterator[int]:
    """New token ids for one tokenized prompt, yielded one by one as they are picked (KV cache on), for printing
    a reply while it is produced. The stream ends after ``cfg.max_new_tokens`` ids or after an id in
    ``stop_ids`` (that id is yielded last, so the caller sees why it ended; ``cfg.stop_at_eos`` does not apply:
    pass the EOS id in ``stop_ids``). Greedy (``temperature: 0``) gives the ids ``generate_ids`` gives, up to the
    stop id. Refuses, like ``generate_ids``, an empty prompt or one that leaves no room for ``max_new_tokens``."""
    from llmfoundry.models.mpt.generate import stream
    if len(prompt) == 0:
        raise ValueError("an empty prompt has nothing to continue from; give it at least one token")
    check_length(model, len(prompt), cfg.max_new_tokens)
    device = model_device(model)
    check_attn_impl(attn_impl_of(model), device, next(model.parameters()).dtype)
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    steps = stream(model, ids, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None,
                   top_p=cfg.top_p if cfg.top_p < 1.0 else None, eos_token_id=list(stop_ids) or None,
                   generator=generator, use_cache=True)
    try:
        for step in steps:
            yield int(step[0])
    finally:
        steps.close()  # leaves the model's train/eval mode as it was, also when the caller stops early


def generate_texts(model, tokenizer, prompts: Sequence[str], cfg: SamplingConfig | None = None, *,
                   batch_size: int = 8) -> list[str]:
    """Completions (new text only) for ``prompts``, in order, ``batch_size`` prompts per forward."""
    cfg = cfg or SamplingConfig()
    if not prompts:
        raise ValueError("no prompts given; pass at least one prompt")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    check_tokenizer_fits(tokenizer, getattr(getattr(model, "config", None), "vocab_size", None))
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    generator = make_generator(cfg.seed, model_device(model))
    encoded = [list(tokenizer(p)["input_ids"]) for p in prompts]
    outputs: list[str] = []
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start:start + batch_size]
        for row in generate_ids(model, batch, cfg, pad_token_id=pad, eos_token_id=eos, generator=generator):
            outputs.append(tokenizer.decode(row, skip_special_tokens=True))
    return outputs


def load_for_generation(source: str, *, device: str = "auto", dtype: str = "auto", attn_impl: Optional[str] = None,
                        max_seq_len: Optional[int] = None, tokenizer: Optional[str] = None,
                        model_config: Optional[str] = None):
    """``(model, tokenizer, device)`` for a composer checkpoint or HF MPT folder, as scripts/generate.py and
    scripts/chat.py take them: ``device`` auto|cpu|gpu, ``dtype`` auto (bf16 on a GPU, else fp32)|fp32|bf16|fp16,
    ``attn_impl`` / ``max_seq_len`` overriding the model's, ``tokenizer`` (default: the model's own) checked
    against the model's vocabulary. Problems are ``ValueError`` / ``CheckpointError`` naming the flag."""
    from llmfoundry.checkpoint import load_model, require_tokenizer
    if device == "gpu" and not torch.cuda.is_available():
        raise ValueError("--device gpu but no CUDA GPU is visible; use --device auto or cpu")
    on_gpu = device == "gpu" or (device == "auto" and torch.cuda.is_available())
    dtype = dtype if dtype != "auto" else ("bf16" if on_gpu else "fp32")
    device = "cuda" if on_gpu else "cpu"
    check_attn_impl(attn_impl, device, dtype)  # before loading any weights
    overrides: dict = {}
    if max_seq_len:
        overrides["max_seq_len"] = max_seq_len
    if attn_impl:
        overrides["attn_config"] = {"attn_impl": attn_impl}
    model, recorded_tok = load_model(source, model_config=model_config, overrides=overrides, device=device,
                                     dtype=dtype)
    tok = require_tokenizer(tokenizer or recorded_tok)
    check_tokenizer_fits(tok, model.config.vocab_size, tokenizer or recorded_tok,
                         flag="--tokenizer" if tokenizer else None)
    return model, tok, device


def read_prompts(prompts: Sequence[str] | None = None, prompts_file: str | None = None) -> list[str]:
    """Prompts from the command line and/or a file (one per line, or JSONL with a 'prompt' key; blank lines
    skipped; ``\\n`` in a plain line is a newline)."""
    import json
    out = list(prompts or [])
    if prompts_file:
        try:
            with open(prompts_file, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            raise FileNotFoundError(f"prompts file {prompts_file!r} not found; pass an existing text file with one "
                                    "prompt per line") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # not JSON: a plain prompt that starts with '{' (code, say)
                    record = None
                if record is not None:
                    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                        raise ValueError(f"{prompts_file}:{n}: a JSON line must be an object with a 'prompt' "
                                         "string")
                    out.append(record["prompt"])
                    continue
            out.append(line.replace("\\n", "\n"))
    if not out:
        raise ValueError("no prompts: pass --prompts 'text' ... or --prompts_file FILE (one prompt per line)")
    return out


__all__ = ["SamplingConfig", "load_for_generation", "generate_texts", "generate_ids", "stream_ids", "left_pad", "read_prompts",
           "make_generator", "check_length", "check_attn_impl", "check_tokenizer_fits"]
