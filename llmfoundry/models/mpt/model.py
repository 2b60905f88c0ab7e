"""The MPT network: a plain ``nn.Module`` whose parameter names match transformers' ``MptForCausalLM``.

    transformer.wte.weight                        token embedding (also the output head when tied)
    transformer.wpe.weight                        learned positions (learned_pos_emb only)
    transformer.blocks.{i}.norm_1 / attn.Wqkv / attn.out_proj / [attn.q_ln / attn.k_ln] / norm_2
    transformer.blocks.{i}.ffn.up_proj / ffn.down_proj
    transformer.norm_f
    lm_head.weight                                only when tie_word_embeddings is false
"""
from __future__ import annotations

import os
from dataclasses import replace
from typing import Any, Mapping, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from llmfoundry.models.mpt.attention import KVCache, MPTAttention, build_attn_context
from llmfoundry.models.mpt.config import MPTConfig
from llmfoundry.models.mpt.init import init_module
from llmfoundry.models.mpt.loss import fused_linear_cross_entropy
from llmfoundry.models.mpt.norm import add_norm, build_norm


class MPTOutput(NamedTuple):
    """A NamedTuple, so that FSDP2 (which walks outputs as pytrees) sees the logits and re-gathers the root's
    parameters (the tied embedding) for backward; a plain dataclass would hide them."""
    logits: Optional[torch.Tensor]
    past_key_values: Optional[KVCache] = None
    hidden_states: Optional[torch.Tensor] = None  # final (post-norm_f) hidden states, with return_hidden=True
    loss: Optional[torch.Tensor] = None  # next-token cross-entropy, when ``labels`` are given


def _gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact GELU: on CUDA our Triton kernels (``llmfoundry/kernels/gelu.py``: the same function, ~20% faster than
    Inductor's on an H200 and accurate in the negative tail), else torch's. ``LLMFOUNDRY_GELU=torch`` forces
    torch's everywhere (to compare)."""
    if x.is_cuda and os.environ.get("LLMFOUNDRY_GELU", "triton") != "torch":
        from llmfoundry.kernels.gelu import gelu
        return gelu(x)
    return F.gelu(x, approximate="none")


class MPTMLP(nn.Module):
    def __init__(self, cfg: MPTConfig):
        super().__init__()
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=not cfg.no_bias)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=not cfg.no_bias)
        self.down_proj._is_residual = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(_gelu(self.up_proj(x)))


class MPTBlock(nn.Module):
    """Pre-norm block: x + drop(attn(norm_1(x))), then + drop(ffn(norm_2(x))).

    The last residual add is left to the next norm: ``forward(x, ..., branch)`` takes the stream as ``x + branch``
    (the previous block's MLP output, None for the first block) and returns it the same way, so every add sits
    in one graph with the norm after it (``add_norm``) and a compiled model fuses the two into one pass, also
    across the blocks' graph breaks (FSDP wraps each block); ``norm_f`` takes the last block's pair."""

    def __init__(self, cfg: MPTConfig, index: int = 0):
        super().__init__()
        self.index = index  # position in the stack (activation_checkpointing_fn; FSDP1 wraps the list's items)
        self.norm_1 = build_norm(cfg.norm_type, cfg.d_model, cfg.norm_eps, bias=not cfg.no_bias)
        self.attn = MPTAttention(cfg)
        self.norm_2 = build_norm(cfg.norm_type, cfg.d_model, cfg.norm_eps, bias=not cfg.no_bias)
        self.ffn = MPTMLP(cfg)
        self.resid_dropout = nn.Dropout(cfg.resid_pdrop)

    def forward(self, x: torch.Tensor, ctx, cache: Optional[KVCache] = None, layer_idx: int = 0,
                branch: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        x, h = add_norm(self.norm_1, x, branch)
        x, h = add_norm(self.norm_2, x, self.resid_dropout(self.attn(h, ctx, cache, layer_idx)))
        return x, self.resid_dropout(self.ffn(h))


def _positions(input_ids, past_len, attention_mask, sequence_id) -> torch.Tensor:
    """Position ids: restart at each packed document, skip left padding, else past_len + arange."""
    b, s = input_ids.shape
    ar = torch.arange(s, device=input_ids.device)
    if sequence_id is not None:
        starts = torch.ones_like(sequence_id, dtype=torch.bool)
        starts[:, 1:] = sequence_id[:, 1:] != sequence_id[:, :-1]
        first = torch.where(starts, ar[None, :], torch.zeros_like(ar)[None, :]).cummax(dim=1).values
        return ar[None, :] - first
    if attention_mask is not None:
        pos = attention_mask.long().cumsum(dim=1) - 1
        return pos.clamp(min=0)[:, past_len:]
    return (ar + past_len)[None, :].expand(b, s)


class MPTModel(nn.Module):
    """Embeddings + blocks + final norm. ``forward`` returns the final (post-``norm_f``) hidden states."""

    def __init__(self, cfg: MPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.learned_pos_emb:
            self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.emb_drop = nn.Dropout(cfg.emb_pdrop)
        self.blocks = nn.ModuleList([MPTBlock(cfg, i) for i in range(cfg.n_layers)])
        self.norm_f = build_norm(cfg.norm_type, cfg.d_model, cfg.norm_eps, bias=not cfg.no_bias)

    def forward(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None,
                sequence_id: Optional[torch.LongTensor] = None,
                past_key_values: Optional[KVCache] = None) -> torch.Tensor:
        """``attention_mask`` ``(B, past + S)`` marks real tokens (1) vs padding (0); ``sequence_id`` ``(B, S)``
        (used when ``attn_config.attn_uses_sequence_id``) keeps packed documents apart; ``past_key_values`` is
        a ``KVCache`` updated in place."""
        cfg = self.config
        b, s = input_ids.shape
        past = past_key_values.seq_len if past_key_values is not None else 0
        if not cfg.attn_config.attn_uses_sequence_id:
            sequence_id = None
        elif sequence_id is None and self.training:
            raise ValueError("attn_config.attn_uses_sequence_id is true but no sequence_id was passed: have the "
                             "data loader emit sequence_id, or set attn_uses_sequence_id: false")
        if sequence_id is not None and past:
            raise ValueError("sequence_id cannot be combined with a KV cache (it is for packed training batches)")
        if cfg.learned_pos_emb and past + s > cfg.max_seq_len:
            raise ValueError(f"sequence length {past + s} exceeds max_seq_len={cfg.max_seq_len} of a model with "
                             "learned positional embeddings (learned_pos_emb: true); shorten the input (only models "
                             "without a position table, e.g. ALiBi ones, run past the length they were built for)")
        x = self.wte(input_ids)
        if cfg.learned_pos_emb:
            x = x + self.wpe(_positions(input_ids, past, attention_mask, sequence_id))
        if cfg.embedding_fraction != 1.0:
            x = x * cfg.embedding_fraction + x.detach() * (1 - cfg.embedding_fraction)
        x = self.emb_drop(x)
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        ctx = build_attn_context(cfg, b, s, past, x.device, dtype, attention_mask, sequence_id)
        branch = None
        for i, block in enumerate(self.blocks):
            x, branch = block(x, ctx, past_key_values, i, branch)
        return add_norm(self.norm_f, x, branch)[1]


def _init_device(name: str) -> str:
    if name == "mixed":  # rank 0 of each node materializes, the others stay on meta (for sync_module_states)
        return "cpu" if int(os.environ.get("LOCAL_RANK", "0")) == 0 else "meta"
    return name


class MPTForCausalLM(nn.Module):
    """MPT decoder with an LM head (tied to ``transformer.wte`` unless ``tie_word_embeddings`` is false)."""

    def __init__(self, config: Union[MPTConfig, Mapping[str, Any]]):
        super().__init__()
        if not isinstance(config, MPTConfig):
            config = MPTConfig.from_dict(config)
        self.config = config
        self.checkpoint_blocks: Optional[int] = None  # set by the trainer from fsdp.activation_checkpointing_blocks
        with torch.device("meta"):  # build without memory, then materialize once and run MPT's init
            self.transformer = MPTModel(config)
            if not config.tie_word_embeddings:
                self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        device = _init_device(config.init_device)
        if device != "meta":
            self.to_empty(device=device)
            self.apply(self.param_init_fn)

    # ----- forward -----
    def head_weight(self) -> torch.Tensor:
        """The output head's (V, d) weight: the tied embedding or ``lm_head``."""
        return self.transformer.wte.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Output head (tied embedding or ``lm_head``) and ``logit_scale`` applied to hidden states."""
        out = F.linear(hidden, self.head_weight())
        scale = self.config.logit_scale_value
        return out * scale if scale is not None else out

    def forward(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None,
                sequence_id: Optional[torch.LongTensor] = None, past_key_values=None, use_cache: bool = False,
                return_hidden: bool = False, labels: Optional[torch.LongTensor] = None) -> MPTOutput:
        """Logits ``(B, S, vocab)``. With ``use_cache`` a ``KVCache`` is created (or the given one extended in
        place) and returned. ``return_hidden`` returns ``hidden_states`` and no logits. With ``labels`` (B, S)
        it returns the shifted cross-entropy as ``loss`` and no logits: the loss is computed here, inside the
        forward (so FSDP still holds the tied embedding), fused with the output head chunk by chunk
        (``loss.fused_linear_cross_entropy``: no fp32 logits, no recomputation in backward)."""
        if past_key_values is not None:
            past_key_values = KVCache.from_legacy(past_key_values)
        elif use_cache:
            past_key_values = KVCache(self.config.n_layers)
        h = self.transformer(input_ids, attention_mask, sequence_id, past_key_values)
        cache = past_key_values if use_cache else None
        if labels is not None:
            loss = fused_linear_cross_entropy(h, self.head_weight(), labels, self.config.logit_scale_value)
            return MPTOutput(logits=None, past_key_values=cache, loss=loss)
        if return_hidden:
            return MPTOutput(logits=None, past_key_values=cache, hidden_states=h)
        return MPTOutput(logits=self.logits(h), past_key_values=cache)

    # ----- hooks used by composer (FSDP wrapping, activation checkpointing, meta init) -----
    def param_init_fn(self, module: nn.Module) -> None:
        """Initialize ``module``'s own parameters per ``config.init_config`` (FSDP meta-device init)."""
        init_module(module, self.config)

    def fsdp_wrap_fn(self, module: nn.Module) -> bool:
        return isinstance(module, MPTBlock)

    def activation_checkpointing_fn(self, module: nn.Module) -> bool:
        """Recompute a block in backward: every block, or the first ``checkpoint_blocks`` of them when set."""
        if not isinstance(module, MPTBlock):
            return False
        return self.checkpoint_blocks is None or module.index < self.checkpoint_blocks

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ----- generation and Hugging Face files -----
    @torch.no_grad()
    def generate(self, input_ids: torch.LongTensor, max_new_tokens: int = 20, attention_mask=None,
                 temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 eos_token_id=None, generator: Optional[torch.Generator] = None, *,
                 do_sample: Optional[bool] = None, use_cache: Optional[bool] = None,
                 pad_token_id: Optional[int] = None) -> torch.LongTensor:
        """Batched decoding with a KV cache, with transformers' keywords (``do_sample``, ``use_cache``,
        ``pad_token_id``, ``eos_token_id``, ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``) meaning what
        they mean there (``use_cache`` defaults to ``config.use_cache``); see
        ``llmfoundry.models.mpt.generate.generate``."""
        from llmfoundry.models.mpt.generate import generate
        return generate(self, input_ids, max_new_tokens, attention_mask=attention_mask, temperature=temperature,
                        top_k=top_k, top_p=top_p, eos_token_id=eos_token_id, generator=generator,
                        do_sample=do_sample, use_cache=self.config.use_cache if use_cache is None else use_cache,
                        pad_token_id=pad_token_id)

    def save_pretrained(self, path: str, strict_hf: bool = True) -> None:
        """Write ``config.json`` + ``model.safetensors`` loadable by transformers' ``MptForCausalLM``; features it
        lacks are refused unless ``strict_hf=False`` (then only ``from_pretrained`` here can read it)."""
        from llmfoundry.models.mpt.hf import save_hf
        save_hf(self.config, self.state_dict(), path, strict_hf=strict_hf)

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: Union[torch.dtype, str, None] = torch.float32,
                        device: Union[str, torch.device, None] = None, **overrides) -> "MPTForCausalLM":
        """Load a directory written by transformers' ``MptForCausalLM.save_pretrained`` (or ours). ``overrides``
        are config keys, e.g. ``max_seq_len=4096`` or ``attn_config={'attn_impl': 'flex'}``; ``dtype='auto'``
        keeps the checkpoint's dtype."""
        from llmfoundry.models.mpt.hf import load_hf
        return load_hf(cls, path, dtype=dtype, device=device, **overrides)


def build_meta(config: MPTConfig) -> MPTForCausalLM:
    """The model on the meta device (no memory, no init): for counting parameters or FSDP init."""
    return MPTForCausalLM(replace(config, init_device="meta"))
