"""Attention plans: which keys each query attends to, for forwards without a KV cache.

A plan's `attend(layer, q, k, v, attn)` receives the input tokens' q/k/v [B, L, H, D] (RoPE applied)
and returns the attention output [B, L, H, D]. The cache plans live in `sf_core/cache.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .rope import shift_frames


class Bidirectional:
    """Every token attends to every token of the input (the teacher / critic forward)."""

    def attend(self, layer, q, k, v, attn):
        return attn(q, k, v, None)


@dataclass(frozen=True)
class BlockCausal:
    """Block-causal attention over a whole video (training path, and the reference for the cache).

    Frames are split into consecutive blocks (chunks) of `block_sizes` latent frames. A query in a block
    that ends at frame e sees every frame before e; with a `window` of L frames and a `sink` of S frames it
    sees only frames [0, S) and [e - (L - S), e) - exactly what the rolling KV cache keeps. With
    sink_positions "adjacent" the sink keys are moved to sit right before the window (see sf_core.cache).
    """

    block_sizes: Sequence[int]
    tokens_per_frame: int
    window: int | None = None
    sink: int = 0
    sink_positions: str = "adjacent"
    rope_theta: float = 10000.0

    def key_ranges(self, end: int) -> list[tuple[int, int]]:
        """Frame ranges [a, b) visible to the block ending at frame `end`."""
        if self.window is None:
            return [(0, end)]
        lo = max(self.sink, end - (self.window - self.sink))
        sink = min(self.sink, end)
        return [(0, end)] if lo <= sink else [(0, sink), (lo, end)]

    def attend(self, layer, q, k, v, attn):
        tpf = self.tokens_per_frame
        outs, start = [], 0
        for size in self.block_sizes:
            end = start + size
            ranges = self.key_ranges(end)
            if len(ranges) == 1:  # a prefix of the input: a view, no copy
                kk, vv = k[:, : end * tpf], v[:, : end * tpf]
            else:
                (_, s), (lo, _) = ranges
                sink_k = k[:, : s * tpf]
                if self.sink_positions == "adjacent":
                    sink_k = shift_frames(sink_k, lo - self.sink, k.shape[-1], self.rope_theta)
                kk = torch.cat([sink_k, k[:, lo * tpf : end * tpf]], dim=1)
                vv = torch.cat([v[:, : s * tpf], v[:, lo * tpf : end * tpf]], dim=1)
            outs.append(attn(q[:, start * tpf : end * tpf], kk, vv, None))
            start = end
        if start * tpf != q.shape[1]:
            raise ValueError(f"block sizes {list(self.block_sizes)} cover {start} frames, the input has {q.shape[1] // tpf}")
        return torch.cat(outs, dim=1)
