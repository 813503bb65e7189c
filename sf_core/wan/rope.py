"""Wan's 3D rotary position embedding, computed from positions (no table, so no length limit).

A head of size D is split into complex pairs (adjacent elements): D - 4*(D//6) dims rotate with the
latent-frame index, 2*(D//6) with the row and 2*(D//6) with the column (22/21/21 pairs for D = 128).
Attention scores depend only on position differences, so a stream can run past any length: angles are
computed in float64 from absolute frame indices and cast once per forward.
"""

from __future__ import annotations

from typing import Sequence

import torch


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Real dims (frame, row, column) of a head that RoPE rotates."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _inv_freq(dim: int, theta: float, device) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)


def rope_angles(
    frames: Sequence[int] | torch.Tensor,
    height: int,
    width: int,
    head_dim: int,
    theta: float = 10000.0,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [F*height*width, head_dim/2] (fp32) for tokens ordered (frame, row, column).

    `frames` are the absolute latent-frame indices of the input frames.
    """
    dt, dh, dw = axis_dims(head_dim)
    if isinstance(frames, range) and frames.step == 1:  # built on the device: no host-to-device copy
        f = torch.arange(frames.start, frames.stop, dtype=torch.float64, device=device)
    else:
        f = torch.as_tensor(frames, dtype=torch.float64, device=device)
    nf = f.numel()
    af = f[:, None] * _inv_freq(dt, theta, device)  # [F, dt/2]
    ah = torch.arange(height, dtype=torch.float64, device=device)[:, None] * _inv_freq(dh, theta, device)
    aw = torch.arange(width, dtype=torch.float64, device=device)[:, None] * _inv_freq(dw, theta, device)
    angles = torch.cat(
        [
            af[:, None, None, :].expand(nf, height, width, -1),
            ah[None, :, None, :].expand(nf, height, width, -1),
            aw[None, None, :, :].expand(nf, height, width, -1),
        ],
        dim=-1,
    ).reshape(nf * height * width, head_dim // 2)
    return torch.cos(angles).float(), torch.sin(angles).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x [B, L, H, D] by angles cos/sin [L, D/2]; computed in fp32."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)
    return out.to(x.dtype)


def shift_frames(k: torch.Tensor, delta: int, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Move keys k [B, L, H, D], roped at some frame, by `delta` frames: R(p + delta) = R(delta) R(p) on the
    frame pairs only (rows and columns unchanged). Used to place attention-sink frames next to the window."""
    dt, _, _ = axis_dims(head_dim)
    half = head_dim // 2
    angle = torch.zeros(half, dtype=torch.float64, device=k.device)
    angle[: dt // 2] = delta * _inv_freq(dt, theta, k.device)
    cos, sin = torch.cos(angle).float(), torch.sin(angle).float()
    return apply_rope(k, cos[None].expand(k.shape[1], half), sin[None].expand(k.shape[1], half))
