"""Load every published Wan2.1-family DiT layout, normalised to Wan parameter names.

Layouts (key lists with shapes in tests/fixtures/formats/):
- official Self Forcing `.pt`: dicts under `generator_ema` (preferred), `generator`, `model`, keys
  `model.` + Wan names, FSDP / compile / checkpoint wrapper segments anywhere in a key;
- plain Wan safetensors (Wan-AI, ComfyUI repackaged, CausVid, LongLive base, ...), optionally prefixed
  `model.`, `model.diffusion_model.` or `diffusion_model.`;
- the diffusers layout (WanTransformer3DModel).
Weights may be fp32 / bf16 / fp16 / fp8 e4m3fn (with or without a per-tensor `scale_weight`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from .config import WanConfig
from .errors import CheckpointError
from .wan.modules import WanModel
from .weights import (
    FP8_DTYPES,
    SAFETENSORS_SUFFIXES,
    build_on_meta,
    check_strict,
    meta_shapes,
    not_a,
    peek_keys,
    read_state_dict,
    strip_prefix,
    unwrap,
)

NESTED_PREFERENCE = ("generator_ema", "generator", "model", "state_dict", "module")
WRAPPERS = ("_fsdp_wrapped_module.", "_orig_mod.", "_checkpoint_wrapped_module.")
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")

_DIFFUSERS_TOP = {
    "scale_shift_table": "head.modulation",
    "proj_out.": "head.head.",
    "condition_embedder.time_embedder.linear_1.": "time_embedding.0.",
    "condition_embedder.time_embedder.linear_2.": "time_embedding.2.",
    "condition_embedder.time_proj.": "time_projection.1.",
    "condition_embedder.text_embedder.linear_1.": "text_embedding.0.",
    "condition_embedder.text_embedder.linear_2.": "text_embedding.2.",
}
_DIFFUSERS_BLOCK = {
    "scale_shift_table": "modulation",
    "attn1.to_q.": "self_attn.q.", "attn1.to_k.": "self_attn.k.", "attn1.to_v.": "self_attn.v.",
    "attn1.to_out.0.": "self_attn.o.", "attn1.norm_q.": "self_attn.norm_q.", "attn1.norm_k.": "self_attn.norm_k.",
    "attn2.to_q.": "cross_attn.q.", "attn2.to_k.": "cross_attn.k.", "attn2.to_v.": "cross_attn.v.",
    "attn2.to_out.0.": "cross_attn.o.", "attn2.norm_q.": "cross_attn.norm_q.", "attn2.norm_k.": "cross_attn.norm_k.",
    "norm2.": "norm3.",  # diffusers' affine cross-attention norm is Wan's norm3
    "ffn.net.0.proj.": "ffn.0.", "ffn.net.2.": "ffn.2.",
}


@dataclass
class DiTCheckpoint:
    """A DiT state dict in Wan names plus what was detected about the file."""

    state_dict: dict[str, torch.Tensor]
    config: WanConfig
    format: str
    source: str  # nested dict the weights came from, or "" for a flat file
    path: str

    @property
    def dtype(self) -> str:
        counts: dict[str, int] = {}
        for k, v in self.state_dict.items():
            if k.endswith(".weight") and v.ndim >= 2:
                name = str(v.dtype).replace("torch.", "")
                counts[name] = counts.get(name, 0) + v.numel()
        return max(counts, key=counts.get) if counts else "unknown"

    def summary(self) -> dict:
        return {
            "path": self.path,
            "format": self.format,
            "source": self.source,
            "dtype": self.dtype,
            "fp8_scaled": any(k.endswith(".scale_weight") for k in self.state_dict),
            "params": sum(v.numel() for k, v in self.state_dict.items() if not k.endswith("scale_weight")),
            "config": self.config.to_dict(),
        }


def _from_diffusers(key: str) -> str:
    for src, dst in _DIFFUSERS_TOP.items():
        if key.startswith(src):
            return dst + key[len(src):]
    m = re.match(r"blocks\.(\d+)\.(.*)", key)
    if m:
        for src, dst in _DIFFUSERS_BLOCK.items():
            if m.group(2).startswith(src):
                return f"blocks.{m.group(1)}.{dst}{m.group(2)[len(src):]}"
    return key


def normalize_keys(sd: Mapping[str, torch.Tensor], name: str = "state dict") -> tuple[dict, str]:
    """Any family layout -> (Wan-named state dict, format name). Raises CheckpointError for foreign files."""
    keys = list(sd)
    if any(k.startswith("condition_embedder.") or ".attn1.to_q." in k for k in keys):
        fmt = "diffusers"
        out = {_from_diffusers(k): v for k, v in sd.items()}
    else:
        stripped = {strip_prefix(k, PREFIXES, WRAPPERS): v for k, v in sd.items()}
        wrapped = any(w in k for k in keys for w in WRAPPERS)
        prefix = next((p for p in PREFIXES if any(k.startswith(p) for k in keys)), "")
        fmt = "wan" + (f" (prefix {prefix!r})" if prefix else "") + (" with wrapper names" if wrapped else "")
        out = stripped
    out.pop("scaled_fp8", None)
    if "patch_embedding.weight" not in out or not any(k.startswith("blocks.0.self_attn.") for k in out):
        raise not_a(name, "a Wan2.1 DiT", keys, "keys like 'blocks.0.self_attn.q.weight' and 'patch_embedding.weight' "
                    "(a Self Forcing .pt, a Wan2.1 diffusion model .safetensors, or a diffusers transformer)")
    return out, fmt


def load_dit_checkpoint(path: str | os.PathLike) -> DiTCheckpoint:
    """Read a DiT file (or diffusers folder) of any family layout into Wan names, with its config."""
    path = Path(path)
    sd, source = unwrap(read_state_dict(path), NESTED_PREFERENCE, str(path))
    sd, fmt = normalize_keys(sd, str(path))
    if source:
        fmt = f"self-forcing .pt [{source}] " + fmt
    config = WanConfig.from_state_dict(sd, str(path))
    check_strict(sd, meta_shapes(lambda: WanModel(config)), str(path), "Wan DiT", allow_extra=True)
    return DiTCheckpoint(sd, config, fmt, source, str(path))


def dequantize_fp8(sd: dict, dtype: torch.dtype = torch.bfloat16) -> dict:
    """fp8 weights times their per-tensor `scale_weight` -> `dtype`; scale entries dropped; other tensors kept.
    For tools that need plain weights (ComfyUI's loader without the scaled-fp8 marker, `convert`)."""
    out = {}
    for k, v in sd.items():
        if k.endswith((".scale_weight", ".scale_input")) or k == "scaled_fp8":
            continue
        if v.dtype in FP8_DTYPES:
            scale = sd.get(k[: -len("weight")] + "scale_weight") if k.endswith(".weight") else None
            v = (v.float() * (scale.float() if scale is not None else 1.0)).to(dtype)
        out[k] = v
    return out


def _check_quant_keys(sd: dict, name: str) -> None:
    odd = [k for k in sd if k.endswith((".weight_scale", ".comfy_quant", ".input_scale"))]
    if odd:
        raise CheckpointError(
            f"{name}: uses a quantisation layout this loader does not read ({odd[0]}); "
            "use the bf16/fp16 file or a per-tensor scaled fp8 file (scale_weight)"
        )


def build_model(
    ckpt: DiTCheckpoint,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = torch.float32,
    keep_fp8: bool = False,
):
    """Instantiate a WanModel from a checkpoint without allocating weights twice (meta device + assign).

    dtype: storage dtype of floating weights (None keeps the file's). fp8 weights are dequantised
    (times their `scale_weight`) unless keep_fp8, in which case they stay fp8 and layers cast at use.
    """
    _check_quant_keys(ckpt.state_dict, ckpt.path)
    sd = ckpt.state_dict if keep_fp8 else dequantize_fp8(ckpt.state_dict, dtype or torch.float32)
    model = build_on_meta(lambda: WanModel(ckpt.config), sd, device, dtype)
    if keep_fp8:
        for k, v in ckpt.state_dict.items():
            if k.endswith(".scale_weight"):
                module = model.get_submodule(k[: -len(".scale_weight")])
                module.register_buffer("scale_weight", v.to(device, torch.float32).reshape(()))
    return model


def load_dit(path, device="cpu", dtype: torch.dtype | None = torch.float32, keep_fp8: bool = False):
    """Path -> (WanModel, DiTCheckpoint summary)."""
    ckpt = load_dit_checkpoint(path)
    model = build_model(ckpt, device=device, dtype=dtype, keep_fp8=keep_fp8)
    return model, ckpt


def check_dit_file(path: str | os.PathLike) -> str:
    """Cheap check that `path` is a family DiT (header / memory-mapped keys only); returns its format."""
    path = Path(path)
    if path.is_dir() or path.suffix.lower() in SAFETENSORS_SUFFIXES:
        keys = peek_keys(path)
    else:
        keys, _ = unwrap(read_state_dict(path), NESTED_PREFERENCE, str(path))  # zip .pt files are memory-mapped, not read
    return normalize_keys(dict.fromkeys(keys), str(path))[1]


def inspect(path) -> str:
    return json.dumps(load_dit_checkpoint(path).summary(), indent=2)
