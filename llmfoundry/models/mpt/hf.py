"""Hugging Face interop: MPT ``config.json`` <-> ``MPTConfig``, and saving/loading model directories.

A directory holds ``config.json`` and the weights (``model.safetensors`` or ``pytorch_model.bin``, possibly sharded
with an ``*.index.json``), with transformers' ``MptForCausalLM`` parameter names.

transformers' MptForCausalLM implements less than MPT does: it always applies ALiBi (with alibi_bias_max 8), has
no biases (it ignores no_bias=false, even for LayerNorms), no learned positions, no logit_scale, no qk_ln, no
grouped-query attention, a 4x GELU MLP and LayerNorm only. ``save_hf`` refuses configs using any of those
(naming each) unless ``strict_hf=False``; loading resolves what transformers ignores: a checkpoint with no bias
tensors loads as no_bias=true, and ``learned_pos_emb`` is ignored under ALiBi (as in the original MPT code)
unless the checkpoint holds a ``transformer.wpe.weight`` (llm-foundry builds one whenever learned_pos_emb).
"""
from __future__ import annotations

import json
import os
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Mapping

import torch

from llmfoundry.models.mpt.config import AttnConfig, MPTConfig
from llmfoundry.utils.config import ConfigError, from_dict, to_dict

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
    attn_type = attn.pop("attn_type", "multihead_attention")
    if attn_type == "multihead_attention":
        attn.pop("kv_n_heads", None)  # llm-foundry writes a kv_n_heads default that only GQA reads
    elif attn_type == "multiquery_attention":
        attn["kv_n_heads"] = 1
    elif attn_type == "grouped_query_attention":
        if "kv_n_heads" not in attn:
            raise ConfigError("MPT config.json: attn_type 'grouped_query_attention' needs attn_config.kv_n_heads")
    else:
        _refuse(f"attn_config.attn_type={attn_type!r}")
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


def hf_export_problems(cfg: MPTConfig) -> list[str]:
    """Features of ``cfg`` that transformers' MptForCausalLM cannot represent (empty = exportable)."""
    a, p = cfg.attn_config, []
    if cfg.kv_n_heads != cfg.n_heads:
        p.append(f"grouped-query attention (attn_config.kv_n_heads={cfg.kv_n_heads} != n_heads={cfg.n_heads})")
    if a.qk_ln:
        p.append("attn_config.qk_ln=true")
    if not a.alibi:
        p.append("attn_config.alibi=false (transformers' MPT always applies ALiBi)")
    elif a.alibi_bias_max != 8:
        p.append(f"attn_config.alibi_bias_max={a.alibi_bias_max} (transformers' MPT always uses 8)")
    if cfg.learned_pos_emb:
        p.append("learned_pos_emb=true (no position table in transformers' MPT)")
    if not cfg.no_bias:
        p.append("no_bias=false (transformers' MPT has no bias parameters)")
    if cfg.logit_scale is not None:
        p.append(f"logit_scale={cfg.logit_scale!r} (ignored by transformers' MPT)")
    if cfg.expansion_ratio != 4:
        p.append(f"expansion_ratio={cfg.expansion_ratio} (transformers' MPT hard-codes 4)")
    if "rmsnorm" in cfg.norm_type:
        p.append(f"norm_type={cfg.norm_type!r} (transformers' MPT uses LayerNorm)")
    return p


def follow_umask(path: str | os.PathLike) -> None:
    """Give ``path`` the mode a plain ``open(path, 'w')`` would (0666 less the umask): safetensors and
    ``tempfile`` create their files 0600."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _save_safetensors(tensors: Mapping[str, torch.Tensor], file: Path) -> None:
    from safetensors.torch import save_file
    save_file(dict(tensors), str(file), metadata={"format": "pt"})
    follow_umask(file)


def save_hf(cfg: MPTConfig, state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, *,
            strict_hf: bool = True, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write ``config.json`` + safetensors weights (sharded above ``max_shard_bytes``) to ``path``.

    ``state_dict`` uses this model's names (strip any wrapper prefix such as composer's ``model.`` first);
    DTensors are gathered with ``full_tensor()``.
    """
    if strict_hf:
        problems = hf_export_problems(cfg)
        if problems:
            raise ValueError("cannot export to transformers' MptForCausalLM, which lacks: " + "; ".join(problems)
                             + ". Change the config, or save_pretrained(path, strict_hf=False) to write a "
                             "directory only MPTForCausalLM.from_pretrained can read")
    sd = {}
    for k, v in state_dict.items():
        if cfg.tie_word_embeddings and k == "lm_head.weight":
            continue
        if hasattr(v, "full_tensor"):
            v = v.full_tensor()
        sd[k] = v.detach().cpu().contiguous()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf = config_to_hf_dict(cfg)
    wte = sd.get("transformer.wte.weight")
    if wte is not None:
        hf["torch_dtype"] = str(wte.dtype).replace("torch.", "")
    (path / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    shards, cur, size = [], {}, 0
    for k in sorted(sd):
        n = sd[k].numel() * sd[k].element_size()
        if cur and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = sd[k], size + n
    shards.append(cur)
    if len(shards) == 1:
        _save_safetensors(shards[0], path / "model.safetensors")
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _save_safetensors(shard, path / name)
        for k, v in shard.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a HF model directory (safetensors or pytorch_model.bin, single or sharded), on CPU."""
    from safetensors.torch import load_file
    path = Path(path)

    def load_one(f: Path):
        if f.suffix == ".safetensors":
            return load_file(str(f))
        return torch.load(f, map_location="cpu", weights_only=True)

    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (path / single).exists():
            return load_one(path / single)
        if (path / index).exists():
            files = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
            sd = {}
            for f in files:
                sd.update(load_one(path / f))
            return sd
    raise FileNotFoundError(f"no weights in {path}: expected model.safetensors, pytorch_model.bin or a sharded "
                            "*.index.json (a directory written by save_pretrained)")


def _check_weights(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], path) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    mismatched = [f"{k}: checkpoint {tuple(sd[k].shape)} vs config {expected[k]}"
                  for k in sorted(set(sd) & set(expected)) if tuple(sd[k].shape) != expected[k]]
    if not (missing or unexpected or mismatched):
        return

    def show(names):
        return ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
    lines = [f"weights in {path} do not match its config.json (and overrides):"]
    if missing:
        lines.append(f"  missing from the checkpoint: {show(missing)}")
    if unexpected:
        lines.append(f"  unexpected in the checkpoint: {show(unexpected)}")
    if mismatched:
        lines.append(f"  shape mismatch: {show(mismatched)}")
    raise ValueError("\n".join(lines))


def load_hf(cls, path: str | os.PathLike, *, dtype=torch.float32, device=None, **overrides):
    """``cls`` (MPTForCausalLM) from a HF MPT directory, with config ``overrides`` (our key names)."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no config.json in {path}: expected a directory written by save_pretrained")
    raw = json.loads((path / "config.json").read_text())
    cfg = config_from_hf_dict(raw)
    sd = load_weights(path)
    if not cfg.no_bias and not any(k.endswith(".bias") for k in sd):
        cfg = replace(cfg, no_bias=True)  # transformers' MPT saves no biases whatever no_bias says
    if raw.get("learned_pos_emb", True) and not cfg.learned_pos_emb and "transformer.wpe.weight" in sd:
        cfg = replace(cfg, learned_pos_emb=True)  # llm-foundry-style ALiBi + position table
    if overrides:
        cfg = cfg.replace(**overrides)
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    model = cls(replace(cfg, init_device="meta"))
    _check_weights(model, sd, path)
    for k in list(sd):  # one tensor at a time, so peak memory stays ~ one copy of the model
        sd[k] = sd[k].to(device=device, dtype=None if dtype == "auto" else dtype)
    model.load_state_dict(sd, assign=True)
    model.config = model.transformer.config = cfg
    return model
