"""One transformer block of the Wan DiT as two pure functions around its attention (`block_pre`, `block_post`:
what `wan/compile.py` compiles and `forward.py` runs), and the per-layer cross-attention K/V of a prompt."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layers import feed
from .rope import apply_rope


@dataclass
class PromptKV:
    """Cross-attention keys/values of one prompt for every layer: kv[i] = (k, v), each [B, Lt, H, D]."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def batch(self) -> int:
        return self.kv[0][0].shape[0]


def modulate(x, shift, scale, frames: int):
    """x [B, F*T, D] * (1 + scale) + shift with per-frame shift/scale [B, F, 1, D]."""
    B, L, D = x.shape
    return (x.float().view(B, frames, L // frames, D) * (1 + scale) + shift).view(B, L, D)


def block_pre(block, x, e0, rope, frames: int, heads: int, dtype):
    """Self-attention inputs of a block. x [B, L, dim] fp32 residual, e0 [B, F, 6, dim], rope (cos, sin)
    [L, head_dim/2] -> q, k, v [B, L, H, head_dim] (RoPE on q, k) and the block's modulation [B, F, 6, dim]."""
    B, L, _ = x.shape
    mod = block.modulation.to(x.device, torch.float32)[None] + e0
    shift1, scale1 = mod[:, :, 0:1], mod[:, :, 1:2]
    m = block.self_attn
    h = modulate(block.norm1(x), shift1, scale1, frames).to(dtype)
    q = apply_rope(m.norm_q(m.q(h)).view(B, L, heads, -1), *rope)
    k = apply_rope(m.norm_k(m.k(h)).view(B, L, heads, -1), *rope)
    v = m.v(h).view(B, L, heads, -1)
    return q, k, v, mod


def block_post(block, x, y, mod, cross_kv, frames: int, heads: int, dtype, attn):
    """The rest of a block after self-attention y [B, L, H, head_dim]: output projection, gated residual,
    cross-attention to the prompt K/V, feed-forward. Returns the new residual x [B, L, dim] fp32."""
    B, L, D = x.shape
    _, _, gate1, shift2, scale2, gate2 = mod.unsqueeze(3).unbind(2)  # each [B, F, 1, D]
    y = block.self_attn.o(y.flatten(2))
    x = x + (y.float().view(B, frames, L // frames, D) * gate1).view(B, L, D)
    c = block.cross_attn
    h = block.norm3(feed(block.norm3, x, torch.float32)).to(dtype)
    q = c.norm_q(c.q(h)).view(B, L, heads, -1)
    x = x + c.o(attn(q, cross_kv[0], cross_kv[1], None).flatten(2)).float()
    y = block.ffn(modulate(block.norm2(x), shift2, scale2, frames).to(dtype))
    return x + (y.float().view(B, frames, L // frames, D) * gate2).view(B, L, D)
