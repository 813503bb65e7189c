"""Tiny random weight files in the real layouts (same names and ranks, small channel counts).

For tests of anything that loads a VAE (CLI end to end, ComfyUI nodes):

    from sf_core.vae.testing import write_tiny_wan_vae, write_tiny_taehv
    vae_path = write_tiny_wan_vae(tmp_path / "wan_2.1_vae.safetensors")
    taehv_path = write_tiny_taehv(tmp_path / "taew2_1.pth")

Both decode 16-channel latents with the real strides (x8 space, x4 time).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..io import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, atomic_path
from .taehv import TAEHVConfig, random_taehv
from .wan_vae import WanVAEConfig, random_wan_vae

TINY_TAEHV_CHANNELS = (32, 16, 8, 8)


def make_tiny_wan_vae_state_dict(
    base_dim: int = 8, seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """A Wan2.1-layout VAE state dict (same 194 names and ranks as Wan2.1_VAE.pth) with base dim
    `base_dim` instead of 96 and deterministic random weights."""
    vae = random_wan_vae(WanVAEConfig(dim=base_dim), seed=seed, dtype=dtype)
    return {k: v.detach().clone().contiguous() for k, v in vae.state_dict().items()}


def make_tiny_taehv_state_dict(
    channels: tuple[int, int, int, int] = TINY_TAEHV_CHANNELS,
    encoder_channels: int = 8,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    wide_first_tgrow: bool = False,
) -> dict[str, torch.Tensor]:
    """A taew2_1-layout state dict (same names and ranks) with small channel counts.

    ``wide_first_tgrow`` stores 'decoder.7.conv.weight' with twice the output channels, as some
    published files do (the loader keeps the last half).
    """
    m = random_taehv(TAEHVConfig(decoder_channels=channels, encoder_channels=encoder_channels), seed=seed, dtype=dtype)
    sd = {k: v.detach().clone().contiguous() for k, v in m.state_dict().items()}
    if wide_first_tgrow:
        w = sd["decoder.7.conv.weight"]
        g = torch.Generator().manual_seed(seed + 1)
        sd["decoder.7.conv.weight"] = torch.cat([torch.randn(w.shape, generator=g).to(w.dtype), w], dim=0)
    return sd


def save_state_dict(sd: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write `sd` as .safetensors or as a torch pickle (.pth/.pt/...), chosen by the suffix."""
    path = Path(path)
    suffix = path.suffix.lower()
    with atomic_path(path) as tmp:
        if suffix in SAFETENSORS_SUFFIXES:
            from safetensors.torch import save_file

            save_file(sd, str(tmp))
        elif suffix in PICKLE_SUFFIXES:
            torch.save(sd, str(tmp))
        else:
            raise ValueError(f"{path}: use a .safetensors or .pth suffix")
    return path


def write_tiny_wan_vae(path: str | os.PathLike, base_dim: int = 8, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Write a tiny Wan2.1-layout VAE file (see `make_tiny_wan_vae_state_dict`)."""
    return save_state_dict(make_tiny_wan_vae_state_dict(base_dim, seed, dtype), path)


def write_tiny_taehv(
    path: str | os.PathLike,
    channels: tuple[int, int, int, int] = TINY_TAEHV_CHANNELS,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    wide_first_tgrow: bool = False,
) -> Path:
    """Write a tiny taew2_1-layout TAEHV file (see `make_tiny_taehv_state_dict`)."""
    sd = make_tiny_taehv_state_dict(channels, seed=seed, dtype=dtype, wide_first_tgrow=wide_first_tgrow)
    return save_state_dict(sd, path)
