"""The toy video autoencoder: the TAEHV architecture (`sf_core.vae.taehv`) at a small width, trained on the world.

16 latent channels, 8x spatial and 4x temporal compression, so every latent rule of the pack holds:
64x64 frames -> 8x8 latents, 1 + 4k frames -> 1 + k latent frames. The latents it produces are the DiT's
(normalised) latents directly. Training shapes the latent space for the DiT that will model it: the first three
channels are held to a thumbnail of the frame (each 8x8 block's mean colour at the latent frame's first video frame),
so where and what colour an object is reads directly off the latents; the other channels keep near zero mean and
unit spread and carry the detail (edges, shape).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from ..vae.taehv import TAEHV, MemBlock, TAEHVConfig
from .world import TRAIN_BACKGROUNDS, render, sample_scene

AE_CONFIG = TAEHVConfig(decoder_channels=(64, 48, 32, 16), encoder_channels=32)
THUMBNAIL_CHANNELS = 3
THUMBNAIL_SCALE = 2.0  # thumbnail values in [-1, 1] times this: about unit spread on the world's frames
CLIP_FRAMES = 5  # training clips: 5 frames = 2 latent frames
CROP = 32  # training crops (the network is convolutional; a quarter of the cost of whole frames)
LATENT_NOISE = 0.1  # the decoder learns to read slightly noisy latents (generated ones are never exact)


def new_autoencoder(seed: int) -> TAEHV:
    """Fresh weights that keep the signal's scale through the deep ReLU stacks (He init; the last conv of each
    memory block starts small so each block starts near its skip path)."""
    torch.manual_seed(seed)
    m = TAEHV(AE_CONFIG)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(mod.weight, nonlinearity="relu" if mod.kernel_size[0] == 3 else "linear")
                if mod.bias is not None:
                    mod.bias.zero_()
        for mod in m.modules():
            if isinstance(mod, MemBlock):
                mod.conv[-1].weight.mul_(0.1)
        m.decoder[-1].weight.mul_(0.1)
        m.decoder[-1].bias.fill_(0.5)  # raw output starts mid-range of [0, 1]
    return m


def thumbnail(video: torch.Tensor, stride: int = 4) -> torch.Tensor:
    """video [B, 3, T, H, W] in [-1, 1] -> [B, 3, ceil(T / stride), H/8, W/8]: the mean colour of each 8x8 block of
    every latent frame's first video frame, scaled (the target of the first latent channels)."""
    first = video[:, :, ::stride]
    b, c, t, h, w = first.shape
    pooled = F.avg_pool2d(first.transpose(1, 2).reshape(b * t, c, h, w), 8)
    return THUMBNAIL_SCALE * pooled.reshape(b, t, c, h // 8, w // 8).transpose(1, 2)


def latent_stats_loss(z: torch.Tensor) -> torch.Tensor:
    """Per-channel mean -> 0 and standard deviation -> 1 over a batch of latents [B, 16, t, h, w]."""
    flat = z.transpose(0, 1).reshape(z.shape[1], -1)
    return flat.mean(1).pow(2).mean() + (flat.std(1) - 1).pow(2).mean()


def autoencoder_loss(model: TAEHV, video: torch.Tensor, generator: torch.Generator,
                     train_encoder: bool = True) -> tuple[torch.Tensor, dict]:
    """Reconstruction (MSE in [-1, 1]) of video [B, 3, T, H, W] through noisy latents, plus the latent statistics."""
    with torch.set_grad_enabled(train_encoder):
        z = model.encode_with_grad(video)
    noisy = z + LATENT_NOISE * torch.randn(z.shape, generator=generator)
    rec = model.decode_with_grad(noisy)
    # object pixels (saturated or bright; every background is a dark or mid grey) weigh 5x: they are few
    sat = video.amax(1, keepdim=True) - video.amin(1, keepdim=True)
    weight = 1.0 + 4.0 * ((sat > 0.3) | (video.amin(1, keepdim=True) > 0.6)).float()
    mse = (weight * (rec - video) ** 2).mean() / weight.mean()
    stats = latent_stats_loss(z[:, THUMBNAIL_CHANNELS:])
    thumb = F.mse_loss(z[:, :THUMBNAIL_CHANNELS], thumbnail(video))
    return mse + 0.1 * stats + 0.5 * thumb, {"mse": float(mse.detach()), "stats": float(stats.detach()),
                                             "thumb": float(thumb.detach())}


def cosine_lr(base: float, step: int, total: int) -> float:
    """Cosine decay from base to base / 10 over total steps."""
    return base * (0.1 + 0.45 * (1 + math.cos(math.pi * min(step, total) / total)))


def train_autoencoder(model: TAEHV, opt: torch.optim.Optimizer, steps: range, batch: int, seed: int, lr: float,
                      on_step: Callable[[int, dict], None] | None = None, full_steps: int = 0,
                      train_encoder: bool = True) -> None:
    """Train on freshly rendered clips; step k always sees the clips of seeds derived from (seed, k). The last
    `full_steps` steps see whole frames (half the batch): crops alone teach features tied to the nearby border.
    train_encoder=False trains the decoder alone (the latents, and whatever was trained on them, stay valid)."""
    model.train()
    for k in steps:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(lr, k, steps.stop)
        full = k >= steps.stop - full_steps
        n = max(1, batch // 2) if full else batch
        scenes = [sample_scene(seed * 1_000_003 + k * batch + i, backgrounds=TRAIN_BACKGROUNDS) for i in range(n)]
        video, _ = render(scenes, CLIP_FRAMES, start=(k * 7) % 40)
        if not full:
            y, x = (k * 8) % (video.shape[-2] - CROP + 1), (k * 24) % (video.shape[-1] - CROP + 1)
            video = video[..., y : y + CROP, x : x + CROP]
        g = torch.Generator().manual_seed(seed + k)
        loss, info = autoencoder_loss(model, video, g, train_encoder)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if on_step is not None:
            on_step(k, info)
    model.eval()


def state_dict_for_file(model: TAEHV) -> dict[str, torch.Tensor]:
    """taew2_1.pth names (encoder and decoder), fp32 contiguous."""
    return {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
