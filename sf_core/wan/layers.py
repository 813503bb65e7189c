"""Layers that compute in their input's dtype whatever dtype their weight is stored in (bf16, fp16, fp8
e4m3fn with an optional per-tensor `scale_weight`), like ComfyUI's manual-cast ops; and `feed`, which
casts an activation for any layer (ours, ComfyUI's casting ops, or a plain torch layer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _cast_weight(module: nn.Module, like: torch.Tensor) -> torch.Tensor:
    w = module.weight
    scale = getattr(module, "scale_weight", None)
    if w.dtype != like.dtype or w.device != like.device:
        w = w.to(device=like.device, dtype=like.dtype)
    if scale is not None:
        w = w * scale.to(device=like.device, dtype=like.dtype)
    return w


def _cast_bias(module: nn.Module, like: torch.Tensor) -> torch.Tensor | None:
    b = module.bias
    return None if b is None else b.to(device=like.device, dtype=like.dtype)


class Linear(nn.Linear):
    """nn.Linear that computes in its input's dtype, whatever dtype its weight is stored in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, _cast_weight(self, x), _cast_bias(self, x))


class Conv3d(nn.Conv3d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, _cast_weight(self, x), _cast_bias(self, x))


class LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            return F.layer_norm(x, self.normalized_shape, None, None, self.eps)
        return F.layer_norm(x, self.normalized_shape, _cast_weight(self, x), _cast_bias(self, x), self.eps)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in fp32 (Wan's WanRMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight.to(device=x.device, dtype=x.dtype)


CASTING = (Linear, Conv3d, LayerNorm, RMSNorm)


def feed(module: nn.Module, x: torch.Tensor, want: torch.dtype) -> torch.Tensor:
    """Cast x for `module`: `want` if the module casts its weights at use (these layers, ComfyUI's
    manual-cast ops), else the dtype of its weight (a plain layer needs matching dtypes)."""
    w = getattr(module, "weight", None)
    if isinstance(module, CASTING) or getattr(module, "comfy_cast_weights", False) or w is None:
        return x.to(want)
    return x.to(w.dtype if w.dtype.is_floating_point and w.element_size() >= 2 else want)
