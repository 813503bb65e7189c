"""Wan2.1 latent space facts: the VAE stride, frame counts and the per-channel normalisation.

The DiT works on normalised latents z = (mu - mean) / std; ComfyUI's LATENT and the VAE work on
un-normalised mu. This module is the one place that knows the statistics.
Layout everywhere: [B, C=16, T, H, W].
"""

from __future__ import annotations

import torch

from .errors import SelfForcingError

LATENT_CHANNELS = 16
TIME_STRIDE = 4
SPATIAL_STRIDE = 8

WAN21_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.ndim != 5 or x.shape[1] != LATENT_CHANNELS:
        raise ValueError(f"expected a latent [B, {LATENT_CHANNELS}, T, H, W], got shape {tuple(x.shape)}")
    shape = (1, LATENT_CHANNELS, 1, 1, 1)
    mean = torch.tensor(WAN21_MEAN, device=x.device, dtype=x.dtype).view(shape)
    std = torch.tensor(WAN21_STD, device=x.device, dtype=x.dtype).view(shape)
    return mean, std


def normalize(mu: torch.Tensor) -> torch.Tensor:
    """VAE latent mu [B, 16, T, H, W] -> DiT latent z = (mu - mean) / std."""
    mean, std = _stats(mu)
    return (mu - mean) / std


def denormalize(z: torch.Tensor) -> torch.Tensor:
    """DiT latent z [B, 16, T, H, W] -> VAE latent mu = z * std + mean."""
    mean, std = _stats(z)
    return z * std + mean


def latent_frames_for(video_frames: int) -> int:
    """Video frames (1 + 4k) -> latent frames (1 + k)."""
    if video_frames < 1 or (video_frames - 1) % TIME_STRIDE:
        raise SelfForcingError(
            f"video length {video_frames} is not 1 + {TIME_STRIDE}*k frames; "
            f"use e.g. {1 + TIME_STRIDE * max(0, round((video_frames - 1) / TIME_STRIDE))}"
        )
    return 1 + (video_frames - 1) // TIME_STRIDE


def video_frames_at_least(frames: int) -> int:
    """The shortest valid video length (1 + 4k frames) that holds `frames` frames."""
    return 1 + TIME_STRIDE * max(0, -(-(frames - 1) // TIME_STRIDE))


def video_frames_for(latent_frames: int) -> int:
    """Latent frames -> decoded video frames: the first latent frame gives 1 frame, each later one 4."""
    if latent_frames < 1:
        raise SelfForcingError(f"need at least one latent frame, got {latent_frames}")
    return 1 + TIME_STRIDE * (latent_frames - 1)


def latent_size_for(height: int, width: int, multiple: int = 16) -> tuple[int, int]:
    """Pixel size -> latent (H, W). Pixels must be a multiple of `multiple` (VAE stride 8 x patch 2)."""
    if height % multiple or width % multiple or height <= 0 or width <= 0:
        raise SelfForcingError(
            f"size {width}x{height} is not divisible by {multiple}; "
            f"use e.g. {max(multiple, width // multiple * multiple)}x{max(multiple, height // multiple * multiple)}"
        )
    return height // SPATIAL_STRIDE, width // SPATIAL_STRIDE
