"""The Wan2.1 DiT as a module tree with Wan parameter names.

The tree is a plain container: the computation lives in `wan/forward.py` and runs on any module tree
with these names (this one, or ComfyUI's loaded WanModel). Weights may be stored in a lower precision
than the compute dtype (bf16, fp16, fp8 e4m3fn with an optional per-tensor `scale_weight`); layers
cast them at use, like ComfyUI's manual-cast ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import WanConfig


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


class Attention(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.q, self.k, self.v, self.o = (Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)


class Block(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        d = cfg.dim
        self.norm1 = LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = Attention(d, cfg.eps)
        self.norm3 = LayerNorm(d, eps=cfg.eps, elementwise_affine=True)
        self.cross_attn = Attention(d, cfg.eps)
        self.norm2 = LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), Linear(cfg.ffn_dim, d))
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d**0.5)


class Head(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        d = cfg.dim
        self.norm = LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.head = Linear(d, cfg.out_dim * cfg.patch_size[0] * cfg.patch_area)
        self.modulation = nn.Parameter(torch.randn(1, 2, d) / d**0.5)


class WanModel(nn.Module):
    """Wan2.1 DiT parameters. `forward` is the bidirectional forward (see `wan.forward` for the rest)."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.config = cfg
        d = cfg.dim
        self.patch_embedding = Conv3d(cfg.in_dim, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), Linear(d, d))
        self.time_embedding = nn.Sequential(Linear(cfg.freq_dim, d), nn.SiLU(), Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), Linear(d, 6 * d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, **kwargs) -> torch.Tensor:
        """Bidirectional flow prediction. x [B, C, F, H, W], t [B] or [B, F], text [B, L, text_dim]."""
        from .forward import WanBackbone

        return WanBackbone(self).forward(x, t, text, **kwargs)
