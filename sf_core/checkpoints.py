"""Load every published Wan2.1-family DiT layout, normalised to Wan parameter names.

Layouts (key lists with shapes in shared/formats/):
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
from .weights import FP8_DTYPES, SAFETENSORS_SUFFIXES, peek_keys, read_state_dict

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


def _pick_nested(obj: Mapping, name: str) -> tuple[Mapping, str]:
    """Official .pt files nest tensors under generator_ema / generator / model (preference order)."""
    if any(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, ""
    for key in NESTED_PREFERENCE:
        if isinstance(obj.get(key), Mapping):
            inner, src = _pick_nested(obj[key], name)
            return inner, key + ("." + src if src else "")
    raise CheckpointError(
        f"{name}: holds no tensors at the top level and none of {', '.join(NESTED_PREFERENCE)}; "
        f"found keys {sorted(obj)[:8]}"
    )


def _strip(key: str) -> str:
    for w in WRAPPERS:
        key = key.replace(w, "")
    for p in PREFIXES:
        if key.startswith(p):
            return key[len(p):]
    return key


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


def _describe_foreign(keys: list[str]) -> str:
    k = " ".join(keys[:2000])
    if "encoder.conv1" in k or "decoder.conv1" in k or "decoder.middle" in k:
        return "a Wan VAE (encoder/decoder keys)"
    if "input_blocks." in k or "conditioner." in k or "first_stage_model." in k:
        return "a Stable Diffusion / SDXL UNet checkpoint"
    if "encoder.block." in k or "shared.weight" in k or "token_embedding" in k:
        return "a T5/UMT5 text encoder"
    if "lora_" in k:
        return "a LoRA, not a full model (load it with a LoRA loader)"
    return f"{len(keys)} keys such as {', '.join(keys[:4])}"


def normalize_keys(sd: Mapping[str, torch.Tensor], name: str = "state dict") -> tuple[dict, str]:
    """Any family layout -> (Wan-named state dict, format name). Raises CheckpointError for foreign files."""
    keys = list(sd)
    if any(k.startswith("condition_embedder.") or ".attn1.to_q." in k for k in keys):
        fmt = "diffusers"
        out = {_from_diffusers(k): v for k, v in sd.items()}
    else:
        stripped = {_strip(k): v for k, v in sd.items()}
        wrapped = any(w in k for k in keys for w in WRAPPERS)
        prefix = next((p for p in PREFIXES if any(k.startswith(p) for k in keys)), "")
        fmt = "wan" + (f" (prefix {prefix!r})" if prefix else "") + (" with wrapper names" if wrapped else "")
        out = stripped
    out.pop("scaled_fp8", None)
    if "patch_embedding.weight" not in out or not any(k.startswith("blocks.0.self_attn.") for k in out):
        raise CheckpointError(
            f"{name}: this is not a Wan2.1 DiT: found {_describe_foreign(keys)}; expected keys like "
            "'blocks.0.self_attn.q.weight' and 'patch_embedding.weight' (a Self Forcing .pt, a Wan2.1 "
            "diffusion model .safetensors, or a diffusers transformer)"
        )
    return out, fmt


def _read_diffusers_folder(path: Path) -> dict:
    files = sorted(path.glob("*.safetensors"))
    if (path / "transformer").is_dir():
        files = sorted((path / "transformer").glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: folder holds no .safetensors weights (expected a diffusers transformer folder)")
    sd: dict = {}
    for f in files:
        sd.update(read_state_dict(f))
    return sd


def load_dit_checkpoint(path: str | os.PathLike) -> DiTCheckpoint:
    """Read a DiT file (or diffusers folder) of any family layout into Wan names, with its config."""
    path = Path(path)
    raw = _read_diffusers_folder(path) if path.is_dir() else read_state_dict(path)
    sd, source = _pick_nested(raw, str(path))
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    sd, fmt = normalize_keys(sd, str(path))
    if source:
        fmt = f"self-forcing .pt [{source}] " + fmt
    config = WanConfig.from_state_dict(sd, str(path))
    _check_complete(sd, config, str(path))
    return DiTCheckpoint(sd, config, fmt, source, str(path))


def _check_complete(sd: dict, config: WanConfig, name: str) -> None:
    with torch.device("meta"):
        ref = WanModel(config)
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    missing = [k for k in expected if k not in sd]
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {expected[k]})" for k in expected if k in sd and tuple(sd[k].shape) != expected[k]]
    if missing or wrong:
        detail = (f"missing {len(missing)} weights such as {', '.join(missing[:3])}" if missing else "") + (
            f"; wrong shapes: {', '.join(wrong[:3])}" if wrong else ""
        )
        raise CheckpointError(f"{name}: incomplete or mismatched Wan DiT ({detail.strip('; ')}); the file may be truncated")


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
    with torch.device("meta"):
        model = WanModel(ckpt.config)
    if keep_fp8:
        sd = {k: v for k, v in ckpt.state_dict.items() if not k.endswith((".scale_weight", ".scale_input"))}
    else:
        sd = dequantize_fp8(ckpt.state_dict, dtype or torch.float32)
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() and v.dtype not in FP8_DTYPES else v).to(device)
          for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    if keep_fp8:
        for k, v in ckpt.state_dict.items():
            if k.endswith(".scale_weight"):
                module = model.get_submodule(k[: -len(".scale_weight")])
                module.register_buffer("scale_weight", v.to(device, torch.float32).reshape(()))
    return model.eval().requires_grad_(False)


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
        keys, _ = _pick_nested(read_state_dict(path), str(path))  # zip .pt files are memory-mapped, not read
    return normalize_keys(dict.fromkeys(keys), str(path))[1]


def inspect(path) -> str:
    return json.dumps(load_dit_checkpoint(path).summary(), indent=2)
