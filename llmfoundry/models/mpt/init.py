"""MPT's parameter init schemes, applied to ONE module's own parameters (``init_module``).

This is what FSDP meta-device init calls for every module after ``to_empty`` (see ``MPTForCausalLM.param_init_fn``),
and what a cpu/cuda-built model applies to each module in ``model.apply`` order. Rules (as in MPT):

* Linear: the named init (``init_config.name``); a fused ``Wqkv`` inits q, k and v as three matrices; residual
  output projections (``attn.out_proj``, ``ffn.down_proj``) are then divided by ``init_div_is_residual``
  (True = sqrt(2 * n_layers)); biases are zero.
* Embedding: normal(0, emb_init_std) or uniform(emb_init_uniform_lim), else the named init.
* Norms: weight 1, bias 0.

Works on plain tensors and on FSDP2's DTensors (only whole-tensor in-place ops; per-row scales are distributed
like the weight).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from llmfoundry.models.mpt.config import MPTConfig
from llmfoundry.models.mpt.norm import LayerNorm, RMSNorm


def _fans(rows: int, cols: int) -> tuple[int, int]:
    return cols, rows  # (fan_in, fan_out) of a (rows, cols) weight


def _scale(cfg: MPTConfig, rows: int, cols: int) -> tuple[str, float]:
    """('normal', std) or ('uniform', bound) of the named init for a ``(rows, cols)`` matrix."""
    ic = cfg.init_config
    fan_in, fan_out = _fans(rows, cols)
    name = ic.name
    if name in ("kaiming_normal_", "kaiming_uniform_"):
        fan = fan_in if ic.fan_mode == "fan_in" else fan_out
        std = nn.init.calculate_gain(ic.init_nonlinearity, ic.init_gain) / math.sqrt(fan)
        return ("normal", std) if name == "kaiming_normal_" else ("uniform", math.sqrt(3.0) * std)
    if name in ("xavier_normal_", "xavier_uniform_"):
        std = ic.init_gain * math.sqrt(2.0 / (fan_in + fan_out))
        return ("normal", std) if name == "xavier_normal_" else ("uniform", math.sqrt(3.0) * std)
    if name == "normal_":
        return "normal", ic.init_std
    if name in ("small_init_", "neox_init_"):
        return "normal", math.sqrt(2.0 / (5 * cfg.d_model))
    raise AssertionError(name)


def residual_div(cfg: MPTConfig) -> float:
    """What residual output projections are divided by after init."""
    if cfg.init_config.name == "neox_init_":
        return cfg.n_layers / math.sqrt(10)
    r = cfg.init_config.init_div_is_residual
    if r is True:
        return math.sqrt(2 * cfg.n_layers)
    if r is False:
        return 1.0
    return float(r)


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def _fill(w: torch.Tensor, kind: str, row_scale: list[tuple[int, float]]):
    """Draw ``w`` from a unit normal/uniform then scale each block of rows [(n_rows, scale), ...]."""
    if kind == "normal":
        w.normal_(0.0, 1.0)
    else:
        w.uniform_(-1.0, 1.0)
    scales = {s for _, s in row_scale}
    if len(scales) == 1:
        w.mul_(scales.pop())
        return
    col = torch.cat([torch.full((n, 1), s, dtype=w.dtype) for n, s in row_scale])
    if _is_dtensor(w):
        from torch.distributed.tensor import distribute_tensor
        col = distribute_tensor(col.to(w.device_mesh.device_type), w.device_mesh, w.placements)
    else:
        col = col.to(w.device)
    w.mul_(col)


def _init_matrix(w: torch.Tensor, cfg: MPTConfig, splits=None):
    rows, cols = w.shape
    splits = splits or (rows,)
    kinds = [_scale(cfg, n, cols) for n in splits]
    _fill(w, kinds[0][0], [(n, s) for n, (_, s) in zip(splits, kinds)])


@torch.no_grad()
def init_module(module: nn.Module, cfg: MPTConfig) -> None:
    """Initialize ``module``'s own parameters (not its children's) per ``cfg.init_config``."""
    ic = cfg.init_config
    if isinstance(module, nn.Linear):
        if ic.name == "default_":
            module.reset_parameters()
        else:
            _init_matrix(module.weight, cfg, getattr(module, "_fused", None))
            if getattr(module, "_is_residual", False):
                module.weight.div_(residual_div(cfg))
            if module.bias is not None:
                module.bias.zero_()
    elif isinstance(module, nn.Embedding):
        w = module.weight
        lim = ic.emb_init_uniform_lim
        if ic.emb_init_std is not None:
            w.normal_(0.0, ic.emb_init_std)
        elif lim is not None:
            lo, hi = (lim if isinstance(lim, list) else (-lim, lim))
            w.uniform_(lo, hi)
        elif ic.name == "default_":
            module.reset_parameters()
        else:
            _init_matrix(w, cfg)
    elif isinstance(module, (LayerNorm, RMSNorm, nn.LayerNorm)):
        if module.weight is not None:
            module.weight.fill_(1.0)
        if getattr(module, "bias", None) is not None:
            module.bias.zero_()
    elif next(module.parameters(recurse=False), None) is not None:
        raise TypeError(f"no MPT init rule for {type(module).__name__}")
