"""The toy DiTs and their first two trainings, on `sf_core`'s Wan modules and forward.

- teacher: a bidirectional Wan DiT (`WanModel`, small config) trained by flow matching on the world's latents,
  with caption dropout so that the empty caption is its unconditional branch (for CFG);
- ODE trajectories: the teacher's deterministic many-step sampler (with CFG), keeping the noisy states at the
  student's few step timesteps and the clean end;
- ODE regression: the causal student (block-causal attention, chunks of 3 latent frames) learns to map each kept
  state of a chunk straight to its clean end, with the earlier chunks clean in its context, as at inference.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..config import WanConfig
from ..schedule import FlowSchedule, frame_sigma, shift_sigma
from ..wan.forward import WanBackbone
from ..wan.modules import WanModel
from ..wan.plans import BlockCausal
from .text import TEXT_DIM

# one head of 128: Wan's head size, which every loader (ours, ComfyUI's) infers the head count from
DIT_CONFIG = WanConfig(dim=128, ffn_dim=512, num_heads=1, num_layers=4, text_dim=TEXT_DIM, freq_dim=256)
SHIFT = 1.0  # small latents (8x8) need no shift towards high noise
STEPS = (1000.0, 750.0, 500.0, 250.0)  # the student's denoising steps
LATENT_FRAMES = 9  # trained length: 33 video frames, 3 chunks of 3 latent frames
FRAMES_PER_CHUNK = 3
GUIDANCE = 2.0  # teacher CFG: cond + g (cond - uncond)
CAPTION_DROPOUT = 0.1


def dit_config(patch: int = 2) -> WanConfig:
    """The toy DiT with a spatial patch of `patch` latent cells (2 as Wan; 1 gives a token per latent cell: 4x the
    tokens, finer geometry on the toy's 8x8 latents)."""
    return dataclasses.replace(DIT_CONFIG, patch_size=(1, patch, patch))


def new_dit(seed: int, patch: int = 2) -> WanModel:
    torch.manual_seed(seed)
    m = WanModel(dit_config(patch))
    with torch.no_grad():
        m.head.head.weight.zero_()
        m.head.head.bias.zero_()
    return m


def flow_matching_loss(backbone: WanBackbone, x0: torch.Tensor, text: torch.Tensor, generator: torch.Generator,
                       schedule: FlowSchedule, plan=None, t: torch.Tensor | None = None) -> torch.Tensor:
    """MSE of the predicted flow v = eps - x0 at a random timestep per sample (shared by its frames).
    x0 [B, 16, F, h, w], text [B, Lt, text_dim]."""
    B, _, Fr = x0.shape[:3]
    if t is None:
        u = torch.rand(B, generator=generator)
        t = (shift_sigma(u, schedule.shift) * 1000.0).clamp(1.0, 1000.0)[:, None].expand(B, Fr)
    eps = torch.randn(x0.shape, generator=generator)
    sigma = frame_sigma(schedule.sigmas_of(t))
    x_t = (1 - sigma) * x0 + sigma * eps
    return F.mse_loss(backbone(x_t, t, text, plan=plan), eps - x0)


def ode_sigmas(schedule: FlowSchedule, student_steps=STEPS, n: int = 20) -> tuple[list[float], list[int]]:
    """A descending sigma list from 1 to 0 of about n steps that contains the student's sigmas exactly.
    Returns (sigmas, positions of the student's sigmas in it)."""
    student = [schedule.sigma_of(t) for t in schedule.warp(student_steps)]
    base = [float(shift_sigma(1 - i / n, schedule.shift)) for i in range(n)] + [0.0]
    sig = sorted(set(round(s, 6) for s in base + student), reverse=True)
    keep = [sig.index(round(s, 6)) for s in student]
    return sig, keep


def guided_flow(teacher: WanBackbone, x: torch.Tensor, sigma: float, cond_kv, uncond_kv,
                guidance: float = GUIDANCE) -> torch.Tensor:
    """The teacher's flow at noise level sigma with CFG: cond + g (cond - uncond). x [B, 16, F, h, w]."""
    t = torch.full((x.shape[0], x.shape[2]), sigma * 1000.0)
    v_c, v_u = teacher(x, t, cond_kv), teacher(x, t, uncond_kv)
    return v_c + guidance * (v_c - v_u)


@torch.no_grad()
def ode_trajectories(teacher: WanBackbone, text: torch.Tensor, uncond: torch.Tensor, generator: torch.Generator,
                     schedule: FlowSchedule, latent_shape: tuple[int, ...], guidance: float = GUIDANCE,
                     n: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Euler steps of the teacher's flow with CFG from noise. text [B, Lt, D], uncond [1, Lt, D].
    Returns (states at the student's step sigmas [B, S, 16, F, h, w], clean end [B, 16, F, h, w])."""
    B = text.shape[0]
    sig, keep = ode_sigmas(schedule, n=n)
    x = torch.randn((B, *latent_shape), generator=generator)
    cond_kv = teacher.encode_text(text)
    uncond_kv = teacher.encode_text(uncond.expand(B, -1, -1))
    states = {}
    for i in range(len(sig) - 1):
        if i in keep:
            states[i] = x.clone()
        x = x + (sig[i + 1] - sig[i]) * guided_flow(teacher, x, sig[i], cond_kv, uncond_kv, guidance)
    return torch.stack([states[i] for i in keep], 1), x


def ode_regression_loss(student: WanBackbone, states: torch.Tensor, clean: torch.Tensor, text: torch.Tensor,
                        generator: torch.Generator, schedule: FlowSchedule, chunk: int | None = None) -> torch.Tensor:
    """One chunk per batch (drawn, or given): input = the clean earlier chunks (t = 0) and this chunk's kept state at
    a random student step (per sample); block-causal attention; MSE of the predicted x0 of this chunk against the
    clean end. states [B, S, 16, F, h, w], clean [B, 16, F, h, w]."""
    B, S = states.shape[:2]
    n = FRAMES_PER_CHUNK
    chunks = clean.shape[2] // n
    j = int(torch.randint(0, chunks, (1,), generator=generator)) if chunk is None else chunk
    a, b = j * n, (j + 1) * n
    step = torch.randint(0, S, (B,), generator=generator)
    timesteps = torch.tensor(schedule.warp(STEPS))[step]  # [B]
    x = torch.cat([clean[:, :, :a], states[torch.arange(B), step][:, :, a:b]], dim=2)
    t = torch.cat([torch.zeros(B, a), timesteps[:, None].expand(B, n)], dim=1)
    plan = BlockCausal([n] * (j + 1), student.config.tokens_per_frame(x.shape[3], x.shape[4]))
    v = student(x, t, text, plan=plan)[:, :, a:b]
    x0 = x[:, :, a:b] - frame_sigma(schedule.sigmas_of(t[:, a:b])) * v
    return F.mse_loss(x0, clean[:, :, a:b])
