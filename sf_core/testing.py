"""Tiny random-weight DiT files in every real layout, for tests and demos (no downloads needed)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .checkpoints import _DIFFUSERS_BLOCK, _DIFFUSERS_TOP
from .config import WanConfig
from .wan.modules import WanModel

LAYOUTS = ("wan", "wan_model_prefix", "comfy_prefix", "diffusion_model_prefix", "official_pt", "diffusers")


def tiny_dit_state_dict(config: WanConfig | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random Wan-named weights (fp32). Modulations are nonzero so every path matters."""
    torch.manual_seed(seed)
    model = WanModel(config or WanConfig.preset("tiny"))
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def to_diffusers(sd: dict) -> dict:
    top = {v: k for k, v in _DIFFUSERS_TOP.items()}
    block = {v: k for k, v in _DIFFUSERS_BLOCK.items()}
    out = {}
    for key, t in sd.items():
        m = re.match(r"blocks\.(\d+)\.(.*)", key)
        new = key
        if m:
            rest = m.group(2)
            for src, dst in block.items():
                if rest.startswith(src):
                    new = f"blocks.{m.group(1)}.{dst}{rest[len(src):]}"
                    break
        else:
            for src, dst in top.items():
                if key.startswith(src):
                    new = dst + key[len(src):]
                    break
        out[new] = t
    return out


def to_layout(sd: dict, layout: str):
    """Wan-named state dict -> the object stored in a file of `layout` (see LAYOUTS)."""
    if layout == "wan":
        return dict(sd)
    if layout == "wan_model_prefix":
        return {"model." + k: v for k, v in sd.items()}
    if layout == "comfy_prefix":
        return {"model.diffusion_model." + k: v for k, v in sd.items()}
    if layout == "diffusion_model_prefix":
        return {"diffusion_model." + k: v for k, v in sd.items()}
    if layout == "official_pt":
        def wrapped(k):  # FSDP-wrapped block names, as in the EMA copies of the official files
            return re.sub(r"^blocks\.(\d+)\.", r"blocks.\1._fsdp_wrapped_module.", k)

        return {
            "generator_ema": {"model." + wrapped(k): v for k, v in sd.items()},
            "generator": {"model." + k: torch.zeros_like(v) for k, v in sd.items()},
        }
    if layout == "diffusers":
        return to_diffusers(sd)
    raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")


def write_dit(path: str | Path, sd: dict, layout: str = "wan") -> Path:
    """Write Wan-named weights in `layout` to `path` (.safetensors, or .pt for official_pt)."""
    path = Path(path)
    obj = to_layout(sd, layout)
    if path.suffix in (".pt", ".pth"):
        torch.save(obj, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in obj.items()}, str(path))
    return path
