"""Regional compilation of the transformer block (opt-in `compile`).

The block runs as two pure functions around its attention plan (`block.block_pre` / `block_post`): the
plan reads and writes the KV cache with slot offsets that change every chunk, so it stays eager, and
everything else of the block - norms, modulation, projections, RoPE, cross-attention, feed-forward - is
compiled. The blocks are passed in as arguments, so one compiled graph serves all of them; graphs are built
without dynamic shapes (`dynamic=False`), once per distinct token count: every chunk of a stream has the
same shapes, so nothing recompiles after the first chunk (a shorter last chunk, a prefix or a prompt
re-cache add one graph each). Eager is the reference; the compiled block is tested equal to it.
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import SelfForcingError
from .block import block_post, block_pre

RECOMPILE_LIMIT = 16  # distinct token counts a process may compile (chunk, last chunk, prefix, re-caches)


@dataclass(frozen=True)
class BlockKernels:
    """The two pure regions of a block: pre(block, x, e0, rope, frames, heads, dtype) -> (q, k, v, mod) and
    post(block, x, y, mod, cross_kv, frames, heads, dtype, attn) -> x (see `wan.forward`)."""

    pre: Callable
    post: Callable
    compiled: bool = False


EAGER = BlockKernels(block_pre, block_post)


def compile_unavailable(device: torch.device | str) -> str | None:
    """Why torch.compile cannot run on `device` here (None when it can)."""
    device = torch.device(device)
    if not hasattr(torch, "compile"):
        return f"this PyTorch ({torch.__version__}) has no torch.compile"
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "torch.compile on CUDA needs Triton (pip install triton, or use a PyTorch build that ships it)"
    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return "torch.compile on CPU needs a C++ compiler (install g++)"
    if device.type not in ("cuda", "cpu"):
        return f"compile is supported on CUDA and CPU, not {device.type}"
    return None


def block_kernels(compile: bool, device: torch.device | str) -> BlockKernels:
    """Eager block regions, or compiled ones (a clear SelfForcingError when compile cannot run here)."""
    if not compile:
        return EAGER
    reason = compile_unavailable(device)
    if reason:
        raise SelfForcingError(f"compile is on but {reason}; turn compile off to run eager")
    import torch._dynamo

    cfg = torch._dynamo.config
    cfg.recompile_limit = max(getattr(cfg, "recompile_limit", 8), RECOMPILE_LIMIT)
    opts = dict(dynamic=False, fullgraph=False)
    return BlockKernels(torch.compile(block_pre, **opts), torch.compile(block_post, **opts), compiled=True)
