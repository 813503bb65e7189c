"""Flow-matching schedule of Wan / Self Forcing.

Grid: s = linspace(1, 0, 1001)[:-1]; sigma = shift*s / (1 + (shift-1)*s); t = 1000*sigma.
x_t = (1 - sigma) * x0 + sigma * eps; the model predicts the flow v = eps - x0.
"""

from __future__ import annotations

from typing import Sequence

import torch

NUM_TRAIN_TIMESTEPS = 1000
SELF_FORCING_STEPS = (1000, 750, 500, 250)


def shift_sigma(s, shift: float):
    """Time shift: s in [0, 1] -> shift*s / (1 + (shift-1)*s). Works on floats and tensors."""
    return shift * s / (1 + (shift - 1) * s)


class FlowSchedule:
    def __init__(self, shift: float = 5.0, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
        if shift <= 0:
            raise ValueError(f"shift must be positive, got {shift}")
        self.shift = shift
        self.num_train_timesteps = num_train_timesteps
        s = torch.linspace(1.0, 0.0, num_train_timesteps + 1, dtype=torch.float64)[:-1]
        self.sigmas = shift_sigma(s, shift)  # [1000], float64, descending
        self.timesteps = self.sigmas * num_train_timesteps
        self._grids: dict = {}  # device -> (timesteps, sigmas) as fp32 tensors there

    def warp(self, steps: Sequence[float]) -> list[float]:
        """Warp a step list like [1000, 750, 500, 250] onto the shifted grid -> timesteps (host floats)."""
        n = self.num_train_timesteps
        out = []
        for step in steps:
            if not 0 < step <= n:
                raise ValueError(f"denoising steps must lie in (0, {n}], got {step}")
            out.append(float(self.timesteps[n - int(round(step))]))
        return out

    def sigma_of(self, t: float) -> float:
        """Sigma of the grid timestep nearest to t (host float; t = 0 gives 0)."""
        if t <= 0:
            return 0.0
        i = int(torch.argmin((self.timesteps - t).abs()))
        return float(self.sigmas[i])

    def sigmas_of(self, t: torch.Tensor) -> torch.Tensor:
        """Device version of sigma_of for a tensor of timesteps (no host sync; the grid is copied once)."""
        if t.device not in self._grids:
            self._grids[t.device] = (self.timesteps.to(t.device, torch.float32), self.sigmas.to(t.device, torch.float32))
        timesteps, sigmas = self._grids[t.device]
        idx = torch.argmin((timesteps[None] - t.float().reshape(-1, 1)).abs(), dim=1)
        return sigmas[idx].view(t.shape)


def add_noise(x0: torch.Tensor, eps: torch.Tensor, sigma) -> torch.Tensor:
    """x_t = (1 - sigma) x0 + sigma eps; sigma a float or a tensor broadcastable to x0."""
    return (1 - sigma) * x0 + sigma * eps


def flow_to_x0(x_t: torch.Tensor, flow: torch.Tensor, sigma) -> torch.Tensor:
    """x0 = x_t - sigma * v."""
    return x_t - sigma * flow


def x0_to_flow(x_t: torch.Tensor, x0: torch.Tensor, sigma) -> torch.Tensor:
    """v = (x_t - x0) / sigma (sigma > 0)."""
    return (x_t - x0) / sigma


def frame_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """Per-frame sigmas [B, F] -> [B, 1, F, 1, 1] to broadcast against latents [B, C, F, H, W]."""
    return sigma[:, None, :, None, None]


def restyle_steps(steps: Sequence[float], strength: float | None = None, start_step: int | None = None) -> tuple[float, ...]:
    """The denoising steps of a video-to-video chunk (before warping), SDEdit style.

    start_step k: begin at the k-th step of `steps` (0: all of them, len(steps): none, the input is kept).
    strength s in [0, 1]: begin at step level round(1000 s) on the same scale as `steps`, then the steps of the
    list below it; 1 gives `steps` itself (text-to-video: the chunk starts from pure noise), 0 gives no step.
    """
    if start_step is not None:
        if not 0 <= start_step <= len(steps):
            raise ValueError(f"start step {start_step} is outside 0..{len(steps)} (the step list has {len(steps)} steps)")
        return tuple(steps[start_step:])
    s = 1.0 if strength is None else float(strength)
    if not 0.0 <= s <= 1.0:
        raise ValueError(f"strength must lie in [0, 1], got {strength}")
    if s == 1.0:
        return tuple(float(x) for x in steps)
    level = round(s * NUM_TRAIN_TIMESTEPS)
    if level <= 0:
        return ()
    return (float(level),) + tuple(float(x) for x in steps if x < level)
