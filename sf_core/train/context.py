"""What the cache holds during a training rollout: the paper's three paradigms (Table 2).

- "self" (Self Forcing): the generator's own chunks, as at inference (the Stream's default);
- "teacher" (Teacher Forcing): the ground-truth clean latents of the same frames;
- "diffusion" (Diffusion Forcing): the ground truth noised to a random level per chunk, written at that level.

Each builds a `sf_core.stream.ContextSource` for `Stream(context_source=...)`.
"""

from __future__ import annotations

import torch

from ..errors import SelfForcingError
from ..schedule import FlowSchedule, add_noise, frame_sigma, shift_sigma

CONTEXTS = ("self", "teacher", "diffusion")


def teacher_forcing(video: torch.Tensor):
    """Ground truth video [B, C, F, h, w] (normalised latents) -> a source that writes its frames at t = 0."""

    def source(start: int, generated: torch.Tensor):
        n = generated.shape[2]
        gt = video[:, :, start : start + n].to(generated.device, generated.dtype)
        return gt, torch.zeros(gt.shape[0], n, device=generated.device)

    return source


def diffusion_forcing(video: torch.Tensor, generator: torch.Generator, schedule: FlowSchedule):
    """Ground truth [B, C, F, h, w] -> a source that writes each chunk noised to its own random timestep
    (uniform, shifted like the training timesteps), at that timestep."""

    def source(start: int, generated: torch.Tensor):
        B, C, n = generated.shape[:3]
        gt = video[:, :, start : start + n].to(generated.device, torch.float32)
        u = torch.rand(B, generator=generator, device=generator.device)
        t = (shift_sigma(u, schedule.shift) * schedule.num_train_timesteps).to(generated.device)
        t = t[:, None].expand(B, n)
        eps = torch.randn(gt.shape, generator=generator, device=generator.device).to(gt.device)
        return add_noise(gt, eps, frame_sigma(schedule.sigmas_of(t))).to(generated.dtype), t

    return source


def context_source(kind: str, video: torch.Tensor | None, generator: torch.Generator, schedule: FlowSchedule):
    """The source for a paradigm name; None for Self Forcing (the Stream's own chunks)."""
    if kind not in CONTEXTS:
        raise SelfForcingError(f"unknown rollout context {kind!r}; choose one of {', '.join(CONTEXTS)}")
    if kind == "self":
        return None
    if video is None:
        raise SelfForcingError(f"{kind} forcing needs ground-truth latents for the prompts (videos=...)")
    return teacher_forcing(video) if kind == "teacher" else diffusion_forcing(video, generator, schedule)
