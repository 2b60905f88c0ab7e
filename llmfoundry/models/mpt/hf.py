"""Hugging Face interop: saving and loading model directories (the ``config.json`` <-> ``MPTConfig`` mapping,
``config_from_hf_dict`` / ``config_to_hf_dict``, is in ``llmfoundry.models.mpt.config``; this module uses it).

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
from dataclasses import replace
from pathlib import Path
from typing import Mapping

import torch

from llmfoundry.models.mpt.config import MPTConfig, config_from_hf_dict, config_to_hf_dict


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
