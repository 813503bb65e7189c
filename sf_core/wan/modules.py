"""The Wan2.1 DiT as a module tree with Wan parameter names.

The tree is a plain container: the computation lives in `wan/forward.py` and runs on any module tree
with these names (this one, or ComfyUI's loaded WanModel). Weights may be stored in a lower precision
than the compute dtype; the layers (`wan/layers.py`) cast them at use.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import WanConfig
from .forward import WanBackbone
from .layers import Conv3d, LayerNorm, Linear, RMSNorm


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
        return WanBackbone(self).forward(x, t, text, **kwargs)
