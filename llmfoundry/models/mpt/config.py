"""MPT configuration: plain dataclasses with the knobs (and key names) of the Hugging Face MPT ``config.json``.

``MPTConfig.from_dict`` is the strict YAML path; ``MPTConfig.from_hf_dict`` reads a ``config.json`` written by
transformers or by the original MosaicML code (ignoring Hugging Face bookkeeping keys, refusing features this
model does not implement); ``to_hf_dict`` writes one. That mapping (``config_from_hf_dict``,
``config_to_hf_dict``, at the bottom) lives here, below ``llmfoundry.models.mpt.hf`` (weights, directories), which
uses it: this module imports nothing of the model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, List, Literal, Mapping, Optional, Union

from llmfoundry.utils.config import ConfigError, from_dict, to_dict

AttnImpl = Literal["torch", "flex", "flash", "triton"]
NormType = Literal["layernorm", "low_precision_layernorm", "rmsnorm", "low_precision_rmsnorm"]
InitName = Literal["kaiming_normal_", "kaiming_uniform_", "xavier_normal_", "xavier_uniform_", "normal_",
                   "small_init_", "neox_init_", "default_"]


@dataclass
class AttnConfig:
    """Attention knobs (``attn_config`` in MPT's config.json)."""
    attn_impl: AttnImpl = "torch"
    attn_pdrop: float = 0.0
    qk_ln: bool = False                  # LayerNorm over the full q and k projections
    clip_qkv: Optional[float] = None     # clamp the fused qkv projection to [-clip_qkv, clip_qkv]
    softmax_scale: Optional[float] = None  # default 1/sqrt(head_dim)
    alibi: bool = True
    alibi_bias_max: float = 8.0
    kv_n_heads: Optional[int] = None     # grouped-query attention; None = n_heads (multi-head)
    attn_uses_sequence_id: bool = False  # packed documents (sequence_id) do not attend to each other


@dataclass
class InitConfig:
    """MPT's parameter-init schemes (``init_config`` in MPT's config.json)."""
    name: InitName = "kaiming_normal_"
    fan_mode: Literal["fan_in", "fan_out"] = "fan_in"
    init_nonlinearity: Literal["relu", "leaky_relu", "linear", "tanh", "sigmoid"] = "relu"
    init_div_is_residual: Union[bool, float] = True   # True = divide residual projections by sqrt(2*n_layers)
    emb_init_std: Optional[float] = None
    emb_init_uniform_lim: Optional[Union[float, List[float]]] = None
    init_std: Optional[float] = None   # for 'normal_'
    init_gain: float = 0.0             # kaiming: negative slope `a`; xavier: gain


@dataclass
class MPTConfig:
    """A decoder-only MPT. Field names follow mosaicml/mpt-7b's config.json."""
    d_model: int = 2048
    n_heads: int = 16
    n_layers: int = 24
    expansion_ratio: float = 4.0
    max_seq_len: int = 2048
    vocab_size: int = 50368
    resid_pdrop: float = 0.0
    emb_pdrop: float = 0.0
    learned_pos_emb: bool = False       # a position table (wpe), also alongside ALiBi if both are set
    attn_config: AttnConfig = field(default_factory=AttnConfig)
    init_config: InitConfig = field(default_factory=InitConfig)
    init_device: Literal["cpu", "meta", "cuda", "mixed"] = "cpu"
    logit_scale: Optional[Union[float, Literal["inv_sqrt_d_model"]]] = None
    no_bias: bool = True
    embedding_fraction: float = 1.0
    norm_type: NormType = "low_precision_layernorm"
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    use_cache: bool = True              # generate()'s default for use_cache (transformers' habit); no effect on training

    def __post_init__(self):
        a, i = self.attn_config, self.init_config
        if isinstance(a, Mapping):
            a = dict(a)
            if "attn_type" in a:  # llm-foundry's / transformers' spelling of the key-value head count
                apply_attn_type(a, "attn_config")
            self.attn_config = a = from_dict(AttnConfig, a, "attn_config")
        if isinstance(i, Mapping):
            self.init_config = i = from_dict(InitConfig, i, "init_config")
        for name in ("d_model", "n_heads", "n_layers", "max_seq_len", "vocab_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if a.kv_n_heads is not None and (a.kv_n_heads < 1 or self.n_heads % a.kv_n_heads):
            raise ConfigError(f"attn_config.kv_n_heads={a.kv_n_heads} must divide n_heads={self.n_heads}")
        if a.attn_pdrop > 0 and a.attn_impl in ("flex", "triton"):
            raise ConfigError(f"attn_config.attn_pdrop={a.attn_pdrop} is not supported by attn_impl "
                              f"'{a.attn_impl}'; set attn_pdrop: 0 or use attn_impl 'torch' or 'flash'")
        if isinstance(self.logit_scale, str) and self.logit_scale != "inv_sqrt_d_model":
            raise ConfigError(f"logit_scale={self.logit_scale!r} must be a number or 'inv_sqrt_d_model'")
        ffn = self.expansion_ratio * self.d_model
        if ffn != int(ffn):
            raise ConfigError(f"expansion_ratio * d_model = {ffn} must be an integer")
        if i.name == "normal_" and i.init_std is None:
            raise ConfigError("init_config.name 'normal_' needs init_config.init_std (e.g. 0.02)")
        if i.name.startswith("xavier") and i.init_gain == 0:
            raise ConfigError(f"init_config.name '{i.name}' with init_gain 0 would zero every weight; "
                              "set init_config.init_gain (e.g. 1.0)")
        lim = i.emb_init_uniform_lim
        if isinstance(lim, list) and len(lim) != 2:
            raise ConfigError("init_config.emb_init_uniform_lim must be a number or a [low, high] pair")

    # ----- derived sizes -----
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_n_heads(self) -> int:
        return self.attn_config.kv_n_heads or self.n_heads

    @property
    def ffn_hidden(self) -> int:
        return int(self.expansion_ratio * self.d_model)

    @property
    def logit_scale_value(self) -> Optional[float]:
        if self.logit_scale == "inv_sqrt_d_model":
            return 1.0 / math.sqrt(self.d_model)
        return self.logit_scale

    # ----- construction -----
    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "MPTConfig":
        """Strict: unknown or misspelled keys are errors (the YAML ``model:`` section)."""
        return from_dict(cls, d)

    def to_dict(self) -> dict:
        return to_dict(self)

    def replace(self, **overrides) -> "MPTConfig":
        """A copy with ``overrides`` (our key names; ``attn_config``/``init_config`` dicts merge), checked strictly."""
        d = self.to_dict()
        for k, v in overrides.items():
            if k in ("attn_config", "init_config") and isinstance(v, Mapping):
                d[k] = {**d[k], **v}
            else:
                d[k] = v
        return MPTConfig.from_dict(d)

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> "MPTConfig":
        """Read a Hugging Face / MosaicML MPT ``config.json`` dict: bookkeeping keys (architectures, auto_map,
        torch_dtype, transformers_version, ...) are ignored, unsupported features (prefix_lm, rope, ...) refused.
        As in the original MPT code, ``learned_pos_emb`` is ignored when ``attn_config.alibi`` is true
        (``from_pretrained`` keeps it when the checkpoint has a ``transformer.wpe.weight``)."""
        return config_from_hf_dict(d)

    def to_hf_dict(self) -> dict:
        """This config as a transformers ``MptConfig`` ``config.json`` dict (model_type 'mpt')."""
        return config_to_hf_dict(self)

    # ----- accounting -----
    def num_params(self) -> int:
        """Exact parameter count of ``MPTForCausalLM(self)`` (tied head counted once)."""
        d, L, V, f = self.d_model, self.n_layers, self.vocab_size, self.ffn_hidden
        kv = self.kv_n_heads * self.head_dim
        b = 0 if self.no_bias else 1
        nb = 0 if (self.no_bias or "rmsnorm" in self.norm_type) else 1   # norm bias
        norm = lambda n: n * (1 + nb)  # noqa: E731
        block = (norm(d) * 2
                 + d * (d + 2 * kv) + b * (d + 2 * kv)    # Wqkv
                 + d * d + b * d                          # out_proj
                 + d * f + b * f + f * d + b * d)         # up_proj, down_proj
        if self.attn_config.qk_ln:
            block += norm(d) + norm(kv)
        total = V * d + L * block + norm(d)
        if self.learned_pos_emb:
            total += self.max_seq_len * d
        if not self.tie_word_embeddings:
            total += V * d
        return total

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token at sequence length ``seq_len``: ``6 * num_params() + 12 * n_layers * d_model *
        seq_len``.

        The first term is forward (2) + backward (4) multiply-adds over every parameter (embeddings included, as
        the tied embedding is also the output head). The second is attention's QK^T and AV matmuls: 2 matmuls *
        2 FLOPs * seq_len * d_model per layer forward, times 3 for forward + backward. Causal masking is NOT
        discounted (the full seq_len x seq_len score matrix is counted), matching the usual MFU convention.
        """
        return 6 * self.num_params() + 12 * self.n_layers * self.d_model * seq_len


# ----------------------------------------------------------------------------------- HF config.json mapping
# Keys of transformers' PretrainedConfig and of MPT's HF/remote-code configs that carry no architecture.
_BOOKKEEPING = {
    "_name_or_path", "name_or_path", "_commit_hash", "_attn_implementation", "_attn_implementation_autoset",
    "attn_implementation", "architectures", "auto_map", "torch_dtype", "dtype", "transformers_version",
    "model_type", "verbose", "tokenizer_name", "use_cache", "initializer_range", "add_cross_attention",
    "bad_words_ids", "begin_suppress_tokens", "bos_token_id", "chunk_size_feed_forward",
    "cross_attention_hidden_size", "decoder_start_token_id", "diversity_penalty", "do_sample", "early_stopping",
    "encoder_no_repeat_ngram_size", "eos_token_id", "exponential_decay_length_penalty", "finetuning_task",
    "forced_bos_token_id", "forced_eos_token_id", "id2label", "is_decoder", "is_encoder_decoder", "label2id",
    "length_penalty", "max_length", "min_length", "no_repeat_ngram_size", "num_beam_groups", "num_beams",
    "num_return_sequences", "output_attentions", "output_hidden_states", "output_scores", "pad_token_id",
    "prefix", "problem_type", "pruned_heads", "remove_invalid_values", "repetition_penalty", "return_dict",
    "return_dict_in_generate", "sep_token_id", "suppress_tokens", "task_specific_params", "temperature",
    "tf_legacy_loss", "tie_encoder_decoder", "tokenizer_class", "top_k", "top_p", "torchscript", "typical_p",
    "use_bfloat16", "use_pad_tok_in_ffn", "quantization_config",
}
# attention keys accepted only at their neutral values: key -> allowed values
_NEUTRAL_ATTN = {"sliding_window_size": (None, -1), "qk_gn": (False,), "fused_qkv": (True,),
                 "attn_logit_softcapping": (None,), "rope": (False,), "prefix_lm": (False,)}
_NEUTRAL_TOP = {"block_overrides": (None, {}), "final_logit_softcapping": (None,),
                "fc_type": ("torch", {"name": "torch"}), "moe_loss_weight": None, "use_pad_tok_in_ffn": None}


def _hf_bookkeeping() -> set[str]:
    keys = set(_BOOKKEEPING)
    try:  # whatever this transformers version adds to every config
        from transformers import PretrainedConfig
        keys |= set(PretrainedConfig().to_dict())
    except Exception:  # pragma: no cover - transformers missing or changed
        pass
    return keys - {f.name for f in fields(MPTConfig)}


def _refuse(what: str):
    raise ConfigError(f"MPT config.json uses {what}, which this MPT implementation does not support")


def config_from_hf_dict(d: Mapping[str, Any]) -> MPTConfig:
    """``MPTConfig`` from a Hugging Face / MosaicML MPT ``config.json`` dict (see the module docstring)."""
    d = dict(d)
    d.pop("use_cache", None)  # transformers' forward default, written False on export; ours is generate()'s
    attn = dict(d.pop("attn_config", None) or {})
    init = dict(d.pop("init_config", None) or {})
    attn_keys = {f.name for f in fields(AttnConfig)} | {"attn_type"} | set(_NEUTRAL_ATTN)
    top_keys = {f.name for f in fields(MPTConfig)}
    for k in list(d):  # attention keys written at the top level
        if k in attn_keys and k not in top_keys:
            attn.setdefault(k, d.pop(k))
    for k in _hf_bookkeeping():
        d.pop(k, None)
        attn.pop(k, None)
    for k, ok in _NEUTRAL_ATTN.items():
        if k in attn and attn[k] not in ok:
            _refuse(f"attn_config.{k}={attn[k]!r}")
        attn.pop(k, None)
    for k in [k for k in attn if k.startswith("rope_")]:
        attn.pop(k)
    apply_attn_type(attn, "MPT config.json: attn_config")
    for k, ok in _NEUTRAL_TOP.items():
        if k in d:
            v = d.pop(k)
            if ok is not None and v not in ok:
                _refuse(f"{k}={v!r}")
    ffn = d.pop("ffn_config", None)
    if ffn:
        act, fc = ffn.get("ffn_act_fn"), ffn.get("fc_type", "torch")
        if (ffn.get("ffn_type", "mptmlp") != "mptmlp" or ffn.get("ffn_hidden_size") is not None
                or set(ffn) - {"ffn_type", "ffn_act_fn", "fc_type", "ffn_hidden_size"}
                or (act and act != {"name": "gelu", "approximate": "none"}) or fc not in ("torch", {"name": "torch"})):
            _refuse(f"ffn_config={ffn!r} (only the GELU 'mptmlp' FFN is implemented)")
    if "layer_norm_epsilon" in d:
        d.setdefault("norm_eps", d.pop("layer_norm_epsilon"))
    init.pop("verbose", None)
    if init.get("name") == "baseline_":
        init["name"] = "normal_"
    # transformers' default is learned_pos_emb=true; the original MPT code ignored it under ALiBi (no wpe weight).
    d["learned_pos_emb"] = bool(d.get("learned_pos_emb", True)) and not attn.get("alibi", True)
    attn.setdefault("alibi", True)
    try:
        return from_dict(MPTConfig, {**d, "attn_config": attn, "init_config": init})
    except ConfigError as e:
        raise ConfigError(f"MPT config.json: {e}") from e


def _num(x: float):
    return int(x) if float(x).is_integer() else x


def apply_attn_type(attn: dict, where: str) -> None:
    """Replace ``attn_type`` (multihead / multiquery / grouped_query_attention, default multihead) in the attention
    dict ``attn`` with the ``kv_n_heads`` it means here."""
    attn_type = attn.pop("attn_type", "multihead_attention")
    if attn_type == "multihead_attention":
        attn.pop("kv_n_heads", None)  # llm-foundry writes a kv_n_heads default that only GQA reads
    elif attn_type == "multiquery_attention":
        attn["kv_n_heads"] = 1
    elif attn_type == "grouped_query_attention":
        if attn.get("kv_n_heads") is None:
            raise ConfigError(f"{where}: attn_type 'grouped_query_attention' needs kv_n_heads")
    else:
        raise ConfigError(f"{where}: attn_type {attn_type!r} is not one of multihead_attention, "
                          f"multiquery_attention, grouped_query_attention")


def config_to_hf_dict(cfg: MPTConfig) -> dict:
    """``config.json`` dict in transformers' MptConfig format (our extras, e.g. kv_n_heads, included)."""
    a, h, kv = cfg.attn_config, cfg.n_heads, cfg.kv_n_heads
    attn_type = ("multihead_attention" if kv == h else "multiquery_attention" if kv == 1
                 else "grouped_query_attention")
    attn = {"attn_type": attn_type, "attn_pdrop": _num(a.attn_pdrop), "attn_impl": a.attn_impl, "qk_ln": a.qk_ln,
            "clip_qkv": a.clip_qkv, "softmax_scale": a.softmax_scale, "prefix_lm": False,
            "attn_uses_sequence_id": a.attn_uses_sequence_id, "alibi": a.alibi,
            "alibi_bias_max": _num(a.alibi_bias_max)}
    if kv != h:
        attn["kv_n_heads"] = kv
    return {
        "architectures": ["MptForCausalLM"], "model_type": "mpt",
        "d_model": cfg.d_model, "n_heads": h, "n_layers": cfg.n_layers,
        "expansion_ratio": _num(cfg.expansion_ratio), "max_seq_len": cfg.max_seq_len,
        "vocab_size": cfg.vocab_size, "resid_pdrop": cfg.resid_pdrop, "emb_pdrop": cfg.emb_pdrop,
        "learned_pos_emb": cfg.learned_pos_emb, "attn_config": attn, "init_config": to_dict(cfg.init_config),
        "init_device": "cpu", "logit_scale": cfg.logit_scale, "no_bias": cfg.no_bias,
        "embedding_fraction": cfg.embedding_fraction, "norm_type": cfg.norm_type,
        "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": cfg.tie_word_embeddings, "use_cache": False,
    }
