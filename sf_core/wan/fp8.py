"""fp8 linear layers: float8 e4m3 weights with one scale per tensor, matmul in fp8 where the GPU has it.

`quantize_linears(dit)` turns the Linear layers of every transformer block (self/cross-attention q, k, v, o
and the feed-forward) into `Fp8Linear`: weight [out, in] in float8_e4m3fn and `scale_weight` (fp32 scalar)
with W ~ weight * scale_weight - ComfyUI's "scaled fp8" naming, so fp8 files load as they are. Layers
whose weight is already fp8 (from such a file) keep it; others are quantised at load. Embeddings and the
head stay in the compute dtype. The matmul is either
- "scaled_mm": the input is quantised per tensor on the fly and `torch._scaled_mm` multiplies in fp8 with
  fp32 accumulation (GPUs of compute capability 8.9+: Ada, Hopper, Blackwell); or
- "dequant": W * scale in the input's dtype, then a plain matmul (the reference; CPU emulation).
The bf16 model stays the reference; fp8 is opt-in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SelfForcingError
from .modules import Linear

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
MATMULS = ("auto", "scaled_mm", "dequant")
BLOCK_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                 "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


def quantize(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor e4m3 quantisation: t [...] -> (t8 [...] float8_e4m3fn, scale [] fp32) with t ~ t8 * scale.
    No host sync (the scale stays on t's device)."""
    scale = t.detach().abs().amax().float().clamp(min=1e-12) / FP8_MAX
    return (t.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize(t8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(t8, scale) -> t8 * scale in `dtype`."""
    return (t8.float() * scale.float()).to(dtype)


def fp8_matmul_unavailable(device: torch.device | str) -> str | None:
    """Why this device has no fp8 matmul (None when torch._scaled_mm runs there)."""
    device = torch.device(device)
    if not hasattr(torch, "_scaled_mm"):
        return f"this PyTorch ({torch.__version__}) has no torch._scaled_mm"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            name = torch.cuda.get_device_name(device)
            return (f"{name} (compute capability {major}.{minor}) has no fp8 matmul; it needs 8.9 or newer "
                    "(Ada, Hopper, Blackwell)")
        return None
    if device.type == "cpu":
        return None
    return f"fp8 matmul is not available on {device.type}"


def resolve_matmul(matmul: str, device: torch.device | str) -> str:
    """"auto" -> "scaled_mm" on a GPU that has it, "dequant" (emulation) on CPU; a clear error on GPUs without."""
    if matmul not in MATMULS:
        raise SelfForcingError(f"fp8 matmul must be one of {MATMULS}, got {matmul!r}")
    device = torch.device(device)
    if matmul == "dequant":
        return matmul
    reason = fp8_matmul_unavailable(device)
    if reason:
        raise SelfForcingError(f"fp8 is on but {reason}; run without fp8 (bf16)")
    return "dequant" if matmul == "auto" and device.type == "cpu" else "scaled_mm"


class Fp8Linear(Linear):
    """y = x W^T + b with W stored in e4m3 ([out, in], `weight`) times `scale_weight` (fp32 scalar).

    x [..., in] in the compute dtype -> [..., out] in the same dtype. matmul: "scaled_mm" or "dequant".
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, matmul: str = "dequant"):
        with torch.device("meta"):
            super().__init__(in_features, out_features, bias=bias)
        self.matmul = matmul

    @classmethod
    def from_linear(cls, lin: nn.Linear, matmul: str) -> "Fp8Linear":
        """Quantise a Linear (or keep an fp8 weight and its `scale_weight`, as read from a scaled fp8 file)."""
        new = cls(lin.in_features, lin.out_features, bias=lin.bias is not None, matmul=matmul)
        w, scale = lin.weight.detach(), getattr(lin, "scale_weight", None)
        if w.dtype == FP8:
            scale = torch.ones((), device=w.device) if scale is None else scale.float().reshape(())
        else:
            if scale is not None:  # another scaled storage: back to real values first
                w = w.float() * scale.float()
            w, scale = quantize(w)
        new.weight = nn.Parameter(w, requires_grad=False)
        new.register_buffer("scale_weight", scale)
        if lin.bias is not None:
            new.bias = nn.Parameter(lin.bias.detach(), requires_grad=False)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.matmul != "scaled_mm":
            return F.linear(x, dequantize(self.weight, self.scale_weight, x.dtype), bias)
        lead = x.shape[:-1]
        x8, x_scale = quantize(x.reshape(-1, self.in_features))
        y = torch._scaled_mm(x8, self.weight.t(), scale_a=x_scale, scale_b=self.scale_weight, bias=bias,
                             out_dtype=x.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8 e4m3, matmul={self.matmul}"


def quantize_linears(dit: nn.Module, matmul: str = "auto") -> int:
    """Turn the Linear layers of every block of `dit` (Wan names) into Fp8Linear in place; returns how many.

    Call it on sf_core's own WanModel (e.g. after `load_dit(..., keep_fp8=True)`); inside ComfyUI, use its
    own fp8 weight dtypes instead (they run through ComfyUI's ops).
    """
    device = dit.blocks[0].self_attn.q.weight.device
    matmul = resolve_matmul(matmul, device)
    count = 0
    for block in dit.blocks:
        for name in BLOCK_LINEARS:
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name)
            lin = getattr(parent, child) if not child.isdigit() else parent[int(child)]
            if isinstance(lin, Fp8Linear):
                lin.matmul = matmul
                continue
            new = Fp8Linear.from_linear(lin, matmul)
            if child.isdigit():
                parent[int(child)] = new
            else:
                setattr(parent, child, new)
            count += 1
    return count
