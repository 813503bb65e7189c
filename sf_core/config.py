"""Wan2.1 DiT configuration: presets and inference from a state dict."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Mapping

import torch

from .errors import CheckpointError, SelfForcingError

HEAD_DIM = 128


@dataclass(frozen=True)
class WanConfig:
    """Shape of a Wan2.1 text-to-video DiT. Presets: `WanConfig.preset("1.3B" | "14B" | "tiny")`."""

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    eps: float = 1e-6
    rope_theta: float = 10000.0

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"head_dim {self.head_dim} must be even and at least 6 for 3D RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def patch_area(self) -> int:
        return self.patch_size[1] * self.patch_size[2]

    def tokens_per_frame(self, latent_height: int, latent_width: int) -> int:
        """Tokens one latent frame becomes after patchifying."""
        ph, pw = self.patch_size[1:]
        if latent_height % ph or latent_width % pw:
            raise SelfForcingError(
                f"latent size {latent_height}x{latent_width} is not divisible by the patch {ph}x{pw}; "
                f"use a pixel size divisible by {8 * ph}"
            )
        return (latent_height // ph) * (latent_width // pw)

    def num_params(self) -> int:
        d, f, L = self.dim, self.ffn_dim, self.num_layers
        block = 8 * (d * d + d) + 2 * d * 2 + 2 * d * 2 + (d * f + f) + (f * d + d) + 6 * d + 2 * d
        p = self.in_dim * d * self.patch_area + d
        p += self.text_dim * d + d + d * d + d + self.freq_dim * d + d + d * d + d + d * 6 * d + 6 * d
        p += 2 * d + d * self.out_dim * self.patch_area + self.out_dim * self.patch_area
        return p + L * block

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def preset(cls, name: str) -> "WanConfig":
        presets = {
            "1.3B": cls(),
            "14B": cls(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
            # Small enough for CPU tests, same head_dim and structure as the real models.
            "tiny": cls(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=64, freq_dim=64),
        }
        if name not in presets:
            raise ValueError(f"unknown config {name!r}; choose one of {', '.join(presets)}")
        return presets[name]

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], name: str = "state dict") -> "WanConfig":
        """Infer the config from Wan-named weights (see `checkpoints.normalize_keys`)."""
        need = ("patch_embedding.weight", "blocks.0.ffn.0.weight", "text_embedding.0.weight",
                "time_embedding.0.weight", "head.head.weight")
        missing = [k for k in need if k not in sd]
        if missing:
            raise CheckpointError(f"{name}: not a Wan DiT state dict, missing {', '.join(missing)}")
        pe = sd["patch_embedding.weight"]
        dim, in_dim = pe.shape[0], pe.shape[1]
        patch = tuple(int(s) for s in pe.shape[2:])
        layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
        out_dim = sd["head.head.weight"].shape[0] // (patch[0] * patch[1] * patch[2])
        if dim % HEAD_DIM:
            raise CheckpointError(f"{name}: model dim {dim} is not a multiple of the Wan head size {HEAD_DIM}")
        return cls(
            dim=dim,
            ffn_dim=sd["blocks.0.ffn.0.weight"].shape[0],
            num_heads=dim // HEAD_DIM,
            num_layers=layers,
            in_dim=in_dim,
            out_dim=out_dim,
            patch_size=patch,
            text_dim=sd["text_embedding.0.weight"].shape[1],
            freq_dim=sd["time_embedding.0.weight"].shape[1],
        )
