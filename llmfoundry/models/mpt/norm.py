"""Normalization layers: LayerNorm / RMSNorm, each with a low-precision variant that runs in the autocast dtype.

``add_norm(norm, x, branch)`` returns ``(x + branch, norm(x + branch))``: the blocks add each branch to the
residual stream through it, so that the add and the norm after it sit in one compiled graph and Inductor fuses
them into one pass (``MPTBlock``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    dev = x.device.type
    if dev in ("cuda", "cpu", "xpu") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm``; with ``low_precision`` it runs in the autocast dtype (e.g. bf16) instead of fp32."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True, low_precision: bool = False):
        super().__init__(dim, eps=eps, bias=bias)
        self.low_precision = low_precision

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = _autocast_dtype(x) if self.low_precision else None
        if dt is None:
            return super().forward(x)
        w = self.weight.to(dt)
        b = self.bias.to(dt) if self.bias is not None else None
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x.to(dt), self.normalized_shape, w, b, self.eps)


class RMSNorm(nn.Module):
    """RMSNorm with a weight and no bias; computed in fp32 (or in the autocast dtype with ``low_precision``)."""

    def __init__(self, dim: int, eps: float = 1e-5, low_precision: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.low_precision = low_precision

    def reset_parameters(self):
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = _autocast_dtype(x) if self.low_precision else None
        with torch.autocast(x.device.type, enabled=False):
            y = x.to(dt) if dt is not None else x.float()
            y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
            y = y * self.weight.to(y.dtype)
        return y if dt is not None else y.to(x.dtype)


def add_norm(norm: nn.Module, x: torch.Tensor, branch: Optional[torch.Tensor] = None):
    """``(r, norm(r))`` with ``r = x + branch`` (``x`` itself when branch is None)."""
    r = x if branch is None else x + branch
    return r, norm(r)


def build_norm(norm_type: str, dim: int, eps: float, bias: bool) -> nn.Module:
    """The norm named by MPT's ``norm_type`` (bias only for LayerNorms, and only when ``bias``)."""
    low = norm_type.startswith("low_precision_")
    if norm_type.endswith("layernorm"):
        return LayerNorm(dim, eps=eps, bias=bias, low_precision=low)
    return RMSNorm(dim, eps=eps, low_precision=low)
