"""Attention backends. PyTorch SDPA is the reference; flash-attn 2/3 are used when installed.

All take q [B, Lq, H, D], k/v [B, Lk, H, D] and an optional boolean key mask [Lk] (True = attend)
and return [B, Lq, H, D]. A backend is chosen once (`resolve_backend`) and passed down explicitly.
"""

from __future__ import annotations

import importlib.util
from typing import Callable, Optional

import torch
import torch.nn.functional as F

AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
BACKENDS = ("auto", "sdpa", "flash2", "flash3")


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    mask = None if key_mask is None else key_mask.view(1, 1, 1, -1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def _flash(fn) -> AttnFn:
    def attend(q, k, v, key_mask=None):
        if key_mask is not None:  # rare paths (re-cache, training reads); keep them exact
            return sdpa(q, k, v, key_mask)
        dtype = q.dtype
        if dtype not in (torch.float16, torch.bfloat16):
            q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
        out = fn(q, k, v)
        out = out[0] if isinstance(out, tuple) else out
        return out.to(dtype)

    return attend


def available_backends() -> list[str]:
    found = ["sdpa"]
    if torch.cuda.is_available():
        if importlib.util.find_spec("flash_attn") is not None:
            found.append("flash2")
        if importlib.util.find_spec("flash_attn_interface") is not None:
            found.append("flash3")
    return found


def resolve_backend(name: str = "auto", device: torch.device | str = "cpu") -> tuple[str, AttnFn]:
    """Return (backend name, attention function). "auto" prefers flash3, then flash2, on CUDA."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    on_cuda = torch.device(device).type == "cuda"
    have = available_backends() if on_cuda else ["sdpa"]
    if name == "auto":
        name = next((b for b in ("flash3", "flash2") if b in have), "sdpa")
    if name != "sdpa" and name not in have:
        raise ValueError(
            f"attention backend {name!r} is not available on {device} "
            f"(install flash-attn, or use one of {', '.join(have)})"
        )
    if name == "flash3":
        from flash_attn_interface import flash_attn_func

        return name, _flash(flash_attn_func)
    if name == "flash2":
        from flash_attn import flash_attn_func

        return name, _flash(flash_attn_func)
    return name, sdpa
