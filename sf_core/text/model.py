"""The UMT5 encoder stack (Wan2.1's text encoder), named by its own internal names.

  ids [B, L] -> embedding [B, L, dim]
  -> N blocks, each: x += Attn(RMSNorm(x)) with its OWN relative position bias (that is the "U" in
     UMT5; T5 v1.1 shares the bias of block 0), unscaled dot-product attention, padded keys masked;
     x += W_down(gelu_tanh(W_gate x) * W_up x)   (gated GELU)
  -> final RMSNorm -> padded positions set to zero.  Out: [B, L, dim].

Weights may stay in their storage dtype (fp8 with a per-tensor or per-row `scale`); each layer casts them
to the compute dtype when it runs. The file layouts that map onto these names live in `layouts`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..weights import FP8_DTYPES


@dataclass(frozen=True)
class UMT5Config:
    """Defaults are UMT5-XXL (google/umt5-xxl, Wan2.1's text encoder, ~5.7B parameters)."""

    vocab_size: int = 256384
    dim: int = 4096
    ffn_dim: int = 10240
    num_heads: int = 64
    head_dim: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128  # not stored in the weights; 128 for every UMT5
    eps: float = 1e-6

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.head_dim

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Internal parameter name -> shape, for every tensor the encoder needs."""
        d, inner, f = self.dim, self.inner_dim, self.ffn_dim
        out: dict[str, tuple[int, ...]] = {"embed.weight": (self.vocab_size, d), "final_norm.weight": (d,)}
        for i in range(self.num_layers):
            b = f"blocks.{i}."
            out.update({
                b + "attn_norm.weight": (d,),
                b + "attn.q.weight": (inner, d),
                b + "attn.k.weight": (inner, d),
                b + "attn.v.weight": (inner, d),
                b + "attn.o.weight": (d, inner),
                b + "attn.rel_bias": (self.num_buckets, self.num_heads),
                b + "ffn_norm.weight": (d,),
                b + "ffn.gate.weight": (f, d),
                b + "ffn.up.weight": (f, d),
                b + "ffn.down.weight": (d, f),
            })
        return out

    def num_params(self) -> int:
        return sum(math.prod(s) for s in self.shapes().values())



def dequantize(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    w = weight.to(dtype)
    if scale is not None:
        w = w * scale.to(dtype)
    return w


class Linear(nn.Module):
    """y = x W^T, no bias. W in any storage dtype (fp8 with an optional per-tensor/per-row `scale`),
    cast to the input's dtype when it runs."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.register_buffer("scale", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize(self.weight, self.scale, x.dtype))


class TokenEmbedding(nn.Module):
    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, dim), requires_grad=False)
        self.register_buffer("scale", None)

    def forward(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        w = self.weight
        if w.dtype in FP8_DTYPES:  # gather the rows as bytes: indexing fp8 is not supported everywhere
            rows = w.view(torch.uint8)[ids].view(w.dtype).to(dtype)
        else:
            rows = F.embedding(ids, w).to(dtype)
        if self.scale is not None:
            s = self.scale.to(dtype)
            rows = rows * (s if s.ndim == 0 else s.reshape(-1)[ids].unsqueeze(-1))
        return rows


class RMSNorm(nn.Module):
    """T5 layer norm: no mean subtraction, no bias; statistics in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight.to(x.dtype)


def relative_position_buckets(length: int, num_buckets: int, max_distance: int, device=None) -> torch.Tensor:
    """Bidirectional T5 bucketing of (key position - query position) -> [length, length] int64.

    Half the buckets for keys before the query, half for keys after; in each half the first
    half of the buckets are exact distances, the rest log-spaced up to max_distance (further
    distances share the last bucket)."""
    pos = torch.arange(length, device=device)
    rel = pos[None, :] - pos[:, None]  # [q, k]
    half = num_buckets // 2
    exact = half // 2
    dist = rel.abs()
    log_steps = torch.log(dist.clamp(min=1).float() / exact) / math.log(max_distance / exact) * (half - exact)
    far = (exact + log_steps.to(torch.long)).clamp(max=half - 1)
    return (rel > 0).long() * half + torch.where(dist < exact, dist, far)


class Attention(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q = Linear(cfg.dim, cfg.inner_dim)
        self.k = Linear(cfg.dim, cfg.inner_dim)
        self.v = Linear(cfg.dim, cfg.inner_dim)
        self.o = Linear(cfg.inner_dim, cfg.dim)
        self.rel_bias = nn.Parameter(torch.empty(cfg.num_buckets, cfg.num_heads), requires_grad=False)

    def forward(self, x: torch.Tensor, buckets: torch.Tensor, pad_keys: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (lin(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2) for lin in (self.q, self.k, self.v))
        bias = self.rel_bias.to(x.dtype)[buckets].permute(2, 0, 1).unsqueeze(0)  # [1, H, n, n]
        bias = bias.masked_fill(pad_keys, torch.finfo(x.dtype).min)  # [B, H, n, n]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # T5: no 1/sqrt(d)
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


class GatedFFN(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.gate = Linear(cfg.dim, cfg.ffn_dim)
        self.up = Linear(cfg.dim, cfg.ffn_dim)
        self.down = Linear(cfg.ffn_dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.gate(x), approximate="tanh") * self.up(x))


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.float16:
        big = torch.finfo(torch.float16).max - 1000
        x = x.clamp(-big, big)
    return x


class Block(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.eps)
        self.ffn = GatedFFN(cfg)

    def forward(self, x: torch.Tensor, buckets: torch.Tensor, pad_keys: torch.Tensor) -> torch.Tensor:
        x = _clamp_fp16(x + self.attn(self.attn_norm(x), buckets, pad_keys))
        return _clamp_fp16(x + self.ffn(self.ffn_norm(x)))


class UMT5Encoder(nn.Module):
    """The encoder stack. Parameters are inference-only (requires_grad=False)."""

    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.cfg = cfg
        self.embed = TokenEmbedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.final_norm = RMSNorm(cfg.dim, cfg.eps)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ids [B, L] int64, mask [B, L] (True = real token) -> [B, L, dim] in `dtype`, padded rows zero."""
        mask = mask.to(device=ids.device, dtype=torch.bool)
        x = self.embed(ids, dtype)  # [B, L, dim]
        buckets = relative_position_buckets(ids.shape[1], self.cfg.num_buckets, self.cfg.max_distance, ids.device)
        pad_keys = ~mask[:, None, None, :]  # [B, 1, 1, L]
        for block in self.blocks:
            x = block(x, buckets, pad_keys)
        x = self.final_norm(x)
        return torch.where(mask[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))

