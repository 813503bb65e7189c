"""Distribution-matching losses of Self Forcing (the reference recipe, REFERENCE section 9).

DMD on a whole generated video x [B, C, F, H, W] (normalised latents):
    t ~ U[0, 1000), shifted (shift 5), clamped to [20, 980];  x_t = add_noise(x, eps, t)
    real = teacher_cond(x_t) + g * (teacher_cond(x_t) - teacher_uncond(x_t))     (x0 predictions, g = 3)
    fake = critic(x_t)
    grad = (fake - real) / mean|x - real|        (per sample)
    loss = 0.5 * mse(x, stopgrad(x - grad))      -> d loss / dx is proportional to grad
The loss is computed as 0.5 * mean(((x - stopgrad(x)) + grad)^2): the same value and gradient, without
subtracting two nearly equal numbers (x and x - grad), so the gradient is exact in any dtype.
The critic (fake score) learns the generator's distribution with a flow-matching loss on no-grad rollouts.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .. import noise
from ..noise import Generators
from ..schedule import FlowSchedule, add_noise, frame_sigma, shift_sigma

# f(x_t [B,C,F,H,W], t [B,F]) -> x0 prediction [B,C,F,H,W]
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

MIN_T, MAX_T = 20.0, 980.0


def sample_timesteps(batch: int, frames: int, generator: Generators, shift: float = 5.0,
                     device="cpu") -> torch.Tensor:
    """One timestep per sample, shared by its frames: uniform in [0, 1000), shifted, clamped. -> [B, F].
    generator: one, or one per sample."""
    u = noise.randint(1000, batch, generator).float() / 1000.0
    t = (shift_sigma(u, shift) * 1000.0).clamp(MIN_T, MAX_T)
    return t[:, None].expand(batch, frames).to(device)


def noisy(x: torch.Tensor, t: torch.Tensor, generator: Generators, schedule: FlowSchedule):
    """x_t, eps, sigma [B,1,F,1,1] for timesteps t [B, F] (sigma of the nearest grid timestep)."""
    eps = noise.randn(x.shape, generator).to(x.device)
    sigma = frame_sigma(schedule.sigmas_of(t))
    return add_noise(x, eps, sigma), eps, sigma


def dmd_gradient(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> torch.Tensor:
    """(fake - real) / mean|x - real|, the normaliser taken per sample over all other dims."""
    dims = tuple(range(1, x.ndim))
    norm = (x - real_x0).abs().mean(dim=dims, keepdim=True).clamp_min(1e-8)
    return (fake_x0 - real_x0) / norm


def dmd_loss(
    x: torch.Tensor,
    teacher_cond: Denoiser,
    teacher_uncond: Denoiser,
    critic: Denoiser,
    generator: Generators,
    schedule: FlowSchedule,
    guidance: float = 3.0,
) -> tuple[torch.Tensor, dict]:
    """Generator loss on a rolled-out video x (with grad). guidance g: real = cond + g (cond - uncond)."""
    B, _, Fr = x.shape[:3]
    t = sample_timesteps(B, Fr, generator, schedule.shift, x.device)
    with torch.no_grad():
        x_t, _, _ = noisy(x.detach(), t, generator, schedule)
        cond = teacher_cond(x_t, t)
        uncond = teacher_uncond(x_t, t)
        real = cond + guidance * (cond - uncond)
        fake = critic(x_t, t)
        grad = dmd_gradient(x.detach(), real, fake)
    loss = 0.5 * ((x - x.detach()).float() + grad.float()).square().mean()
    return loss, {"dmd_t": t[:, 0].detach(), "dmd_grad_norm": grad.norm().detach()}


def critic_loss(
    x: torch.Tensor,
    critic_flow: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    generator: Generators,
    schedule: FlowSchedule,
) -> torch.Tensor:
    """Flow-matching loss of the critic on a generated video x (no grad into x): mse(v, eps - x)."""
    x = x.detach()
    t = sample_timesteps(x.shape[0], x.shape[2], generator, schedule.shift, x.device)
    x_t, eps, _ = noisy(x, t, generator, schedule)
    return F.mse_loss(critic_flow(x_t, t).float(), (eps - x).float())
