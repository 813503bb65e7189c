"""TAEHV: the tiny video autoencoder for Wan2.1 latents (``taew2_1.pth``), an own implementation
with the published parameter names.

It reads NORMALISED latents z = (mu - mean) / std (see `sf_core.latents`).

Decoder: per latent frame, 2D convs plus "memory blocks" that also see the previous frame's
input at that block (zeros before the first frame); two "time grow" 1x1 convs each turn a frame
into two, so each latent frame becomes 4 frames. The published code trims the first 3 frames
of the video, so latent frame 0 yields 1 frame and each later one 4 -- the same count and the
same causal alignment as the Wan VAE: t latent frames -> 1 + 4(t - 1) frames, and latent frame
k >= 1 only affects frames 4k - 3 onwards.

Shapes: decode(mu) / decode_normalized(z): [B, 16, t, h, w] -> [B, 3, 1 + 4(t - 1), 8h, 8w] in
[-1, 1]. encode_normalized(video [B, 3, T, H, W] in [-1, 1]) -> z [B, 16, ceil(T / 4), H/8, W/8]
(frames padded at the end by repeating the last one, as the published code does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, SelfForcingError
from ..latents import denormalize
from ..weights import not_a
from .common import (
    VideoAutoencoder,
    StreamDecoderBase,
    StreamEncoderBase,
    check_latent,
    to_normalized,
)


@dataclass(frozen=True)
class TAEHVConfig:
    """Architecture of a TAEHV. Defaults: ``taew2_1.pth``."""

    latent_channels: int = 16
    patch_size: int = 1
    decoder_channels: tuple[int, int, int, int] = (256, 128, 64, 64)
    encoder_channels: int = 64
    decoder_time_upscale: tuple[bool, bool, bool] = (False, True, True)
    encoder_time_downscale: tuple[bool, bool, bool] = (True, True, False)
    has_encoder: bool = True

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(self.decoder_time_upscale)

    @property
    def spatial_stride(self) -> int:
        return 8 * self.patch_size


def _conv(n_in: int, n_out: int, bias: bool = True, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias, stride=stride)


class Clamp(nn.Module):
    """Soft clamp of the input latent to about [-3, 3]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """relu(conv([x, past]) + skip(x)), `past` being this block's input at the previous frame."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = nn.Sequential(
            _conv(n_in * 2, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out)
        )
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(torch.cat([x, past], dim=1)) + self.skip(x))


class TPool(nn.Module):
    """Merges `stride` consecutive frames (stacked on channels) with a 1x1 conv."""

    def __init__(self, n_f: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f * stride, n_f, 1, bias=False)


class TGrow(nn.Module):
    """A 1x1 conv to `stride` x channels, split into `stride` consecutive frames."""

    def __init__(self, n_f: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f, n_f * stride, 1, bias=False)


class Upsample2x(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")


def _build_decoder(cfg: TAEHVConfig) -> nn.Sequential:
    n = cfg.decoder_channels
    layers: list[nn.Module] = [Clamp(), _conv(cfg.latent_channels, n[0]), nn.ReLU()]
    for level in range(3):
        c, c_next = n[level], n[level + 1]
        layers += [MemBlock(c, c), MemBlock(c, c), MemBlock(c, c), Upsample2x()]
        layers += [TGrow(c, 2 if cfg.decoder_time_upscale[level] else 1), _conv(c, c_next, bias=False)]
    layers += [nn.ReLU(), _conv(n[3], 3 * cfg.patch_size**2)]
    return nn.Sequential(*layers)


def _build_encoder(cfg: TAEHVConfig) -> nn.Sequential:
    c = cfg.encoder_channels
    layers: list[nn.Module] = [_conv(3 * cfg.patch_size**2, c), nn.ReLU()]
    for level in range(3):
        layers += [TPool(c, 2 if cfg.encoder_time_downscale[level] else 1), _conv(c, c, bias=False, stride=2)]
        layers += [MemBlock(c, c), MemBlock(c, c), MemBlock(c, c)]
    layers += [_conv(c, cfg.latent_channels)]
    return nn.Sequential(*layers)


def _apply(seq: nn.Sequential, x: torch.Tensor, b: int, memory: list | None) -> torch.Tensor:
    """Run `seq` on frames x [b * t, C, H, W] (frame-major within each sample).

    MemBlocks see the previous frame's input: from `memory` (updated in place) for the first
    frame of this call, zeros when `memory` is None or holds nothing yet.
    """
    for i, layer in enumerate(seq):
        if isinstance(layer, MemBlock):
            bt, c, h, w = x.shape
            xs = x.reshape(b, bt // b, c, h, w)
            prev = memory[i] if memory is not None and memory[i] is not None else x.new_zeros(b, 1, c, h, w)
            past = torch.cat([prev, xs[:, :-1]], dim=1).reshape(bt, c, h, w)
            if memory is not None:
                memory[i] = xs[:, -1:].clone()
            x = layer(x, past)
        elif isinstance(layer, TGrow):
            bt, c, h, w = x.shape
            x = layer.conv(x).reshape(bt * layer.stride, c, h, w)
        elif isinstance(layer, TPool):
            bt, c, h, w = x.shape
            x = layer.conv(x.reshape(bt // layer.stride, c * layer.stride, h, w))
        else:
            x = layer(x)
    return x


class TAEHV(VideoAutoencoder):
    """The TAEHV tiny autoencoder; the decoder follows the `VideoDecoder` interface."""

    kind = "taehv"

    def __init__(self, config: TAEHVConfig = TAEHVConfig()):
        super().__init__()
        self.config = config
        if config.has_encoder:
            self.encoder = _build_encoder(config)
        self.decoder = _build_decoder(config)

    @property
    def frames_to_trim(self) -> int:
        """Leading frames the raw decoder output has beyond the Wan VAE's (3 for Wan2.1)."""
        return self.temporal_stride - 1

    @property
    def _anchor(self) -> torch.Tensor:
        return self.decoder[1].weight

    # -- decode --------------------------------------------------------------------------
    def stream_decoder(self, latents_per_step: int | None = 1) -> "TAEHVStreamDecoder":
        """A new stream (chunks of any size). `latents_per_step` latent frames go through the
        network together (None: the whole chunk; faster on a GPU, more memory)."""
        return TAEHVStreamDecoder(self, latents_per_step)

    def decode(self, mu: torch.Tensor) -> torch.Tensor:
        """Un-normalised mu [B, 16, t, h, w] -> [B, 3, 1 + 4(t - 1), 8h, 8w] in [-1, 1]."""
        return self.stream_decoder().decode(mu)

    def decode_normalized(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised z [B, 16, t, h, w] -> [B, 3, 1 + 4(t - 1), 8h, 8w] in [-1, 1]."""
        return self.stream_decoder().decode_normalized(z)

    def decode_all_at_once(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised z, all latent frames through the network together (the published
        'parallel' mode): same result as `decode_normalized`, more memory."""
        check_latent(z, self.latent_channels, "decode_all_at_once(z)")
        with torch.no_grad():
            y = self._decode_raw(z.to(self.device, self.dtype), None)
            return _to_pixels(y[:, self.frames_to_trim :])

    def _decode_raw(self, z: torch.Tensor, memory: list | None) -> torch.Tensor:
        """z [B, C, t, h, w] -> raw frames [B, 4t, 3, 8h, 8w] in ~[0, 1], before trimming."""
        b, c, t, h, w = z.shape
        y = _apply(self.decoder, z.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w), b, memory)
        if self.config.patch_size > 1:
            y = F.pixel_shuffle(y, self.config.patch_size)
        return y.reshape(b, -1, *y.shape[1:])

    # -- encode --------------------------------------------------------------------------
    def encode_normalized(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, 3, T, H, W] in [-1, 1] -> normalised z [B, 16, ceil(T / 4), H/8, W/8]."""
        if not self.config.has_encoder:
            raise SelfForcingError("this TAEHV was loaded without its encoder")
        if not isinstance(video, torch.Tensor) or video.ndim != 5 or video.shape[1] != 3:
            shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise SelfForcingError(f"encode: expected video [B, 3, T, H, W] in [-1, 1], got {shape}")
        b, _, t, h, w = video.shape
        ss = self.spatial_stride
        if h % ss or w % ss:
            raise SelfForcingError(f"encode: frame size {w}x{h} (WxH) must be a multiple of {ss}")
        stride = self.encoder_time_stride
        with torch.no_grad():
            x = video.to(self.device, self.dtype)
            if t % stride:
                x = torch.cat([x, x[:, :, -1:].expand(-1, -1, stride - t % stride, -1, -1)], dim=2)
            return self._encode_frames(x, None)

    @property
    def encoder_time_stride(self) -> int:
        """Video frames per latent frame of the encoder (4 for Wan2.1)."""
        return 2 ** sum(self.config.encoder_time_downscale)

    def _encode_frames(self, x: torch.Tensor, memory: list | None) -> torch.Tensor:
        """Frames [B, 3, T, H, W] in [-1, 1] on the model's device/dtype, T a multiple of the time stride ->
        normalised z [B, 16, T / stride, H/8, W/8]; `memory` carries the memory blocks' last inputs."""
        b, _, t, h, w = x.shape
        x = ((x + 1) / 2).permute(0, 2, 1, 3, 4).reshape(b * t, 3, h, w)
        if self.config.patch_size > 1:
            x = F.pixel_unshuffle(x, self.config.patch_size)
        y = _apply(self.encoder, x, b, memory)
        _, c, lh, lw = y.shape
        return y.reshape(b, -1, c, lh, lw).permute(0, 2, 1, 3, 4)

    def encode_with_grad(self, video: torch.Tensor) -> torch.Tensor:
        """`encode_normalized` without its no-grad guard and checks (training the encoder)."""
        stride, t = self.encoder_time_stride, video.shape[2]
        x = video.to(self.device, self.dtype)
        if t % stride:
            x = torch.cat([x, x[:, :, -1:].expand(-1, -1, stride - t % stride, -1, -1)], dim=2)
        return self._encode_frames(x, None)

    def decode_with_grad(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised z [B, 16, t, h, w] -> [B, 3, 1 + 4(t - 1), 8h, 8w] in ~[-1, 1], differentiable (training)."""
        y = self._decode_raw(z, None)[:, self.frames_to_trim :]
        return (y * 2.0 - 1.0).permute(0, 2, 1, 3, 4)

    def stream_encoder(self) -> "TAEHVStreamEncoder":
        """A new encoding stream: feed frames as they arrive; see `TAEHVStreamEncoder`."""
        if not self.config.has_encoder:
            raise SelfForcingError("this TAEHV was loaded without its encoder")
        return TAEHVStreamEncoder(self)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, 3, T, H, W] in [-1, 1] -> un-normalised mu (Wan VAE convention)."""
        z = self.encode_normalized(video)
        return denormalize(z.float()).to(z.dtype)

    # -- loading -------------------------------------------------------------------------
    file_label = "TAEHV (taew2_1)"

    @classmethod
    def infer_config(cls, sd, source):
        return infer_taehv_config(sd, source)

    @classmethod
    def prepare_state_dict(cls, sd, config):
        return patch_tgrow(sd, config)


class TAEHVStreamDecoder(StreamDecoderBase):
    """Decodes one video chunk by chunk with TAEHV; see `StreamDecoder`.

    State: each memory block's input at the last frame, and how many leading frames are still
    to be trimmed.
    """

    def __init__(self, model: TAEHV, latents_per_step: int | None = 1):
        if latents_per_step is not None and latents_per_step < 1:
            raise ValueError("latents_per_step must be >= 1 or None")
        self.model = model
        self.latents_per_step = latents_per_step
        super().__init__(model, model.latent_channels)

    def _reset_state(self) -> None:
        self._memory: list = [None] * len(self.model.decoder)
        self._to_trim = self.model.frames_to_trim

    def _decode_chunk(self, x: torch.Tensor, normalized: bool) -> torch.Tensor:
        m = self.model
        z = to_normalized(x, normalized, m.dtype, m.device)
        t = z.shape[2]
        step = t if self.latents_per_step is None else self.latents_per_step
        outs = []
        for s in range(0, t, step):
            y = m._decode_raw(z[:, :, s : s + step], self._memory)
            if self._to_trim:
                cut = min(self._to_trim, y.shape[1])
                y = y[:, cut:]
                self._to_trim -= cut
            outs.append(y)
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return _to_pixels(y)


class TAEHVStreamEncoder(StreamEncoderBase):
    """Encodes one video as its frames arrive with TAEHV; see `StreamEncoderBase`.

    Latent frame k comes from frames 4k .. 4k + 3 (the published grouping), so a latent frame is ready once
    its 4 frames are in: fed 1 + 4k frames and then 4k at a time, each call returns k latent frames and one
    frame waits. `flush()` pads the last group by repeating its last frame, as the whole encode does.
    State: each memory block's input at the last frame.
    """

    def __init__(self, model: TAEHV):
        self.model = model
        super().__init__(model, model.latent_channels, model.spatial_stride)

    def _reset_state(self) -> None:
        self._memory: list = [None] * len(self.model.encoder)

    def _group_size(self, index: int) -> int:
        return self.model.encoder_time_stride

    def _encode_groups(self, x: torch.Tensor, sizes: list[int], normalized: bool) -> torch.Tensor:
        z = self.model._encode_frames(x, self._memory)
        return z if normalized else denormalize(z.float()).to(z.dtype)

    def _flush_pending(self, normalized: bool) -> torch.Tensor:
        x = self._pending
        x = torch.cat([x, x[:, :, -1:].expand(-1, -1, self.model.encoder_time_stride - x.shape[2], -1, -1)], dim=2)
        self.latents_out += 1
        return self._encode_groups(x, [x.shape[2]], normalized)


def _to_pixels(y: torch.Tensor) -> torch.Tensor:
    """Raw frames [B, T, 3, H, W] in ~[0, 1] -> [B, 3, T, H, W] in [-1, 1]."""
    return (y.clamp(0.0, 1.0) * 2.0 - 1.0).permute(0, 2, 1, 3, 4).contiguous()


# --------------------------------------------------------------------------------------------
# Config inference and the TGrow layout patch
# --------------------------------------------------------------------------------------------
_DEC_CONVS = {0: 1, 1: 8, 2: 14, 3: 20}  # decoder_channels[i] = out channels of decoder.<idx>.weight
_TGROW = (7, 13, 19)
_TPOOL = (2, 7, 12)


def _not_taehv(sd: Mapping[str, torch.Tensor], source: str, why: str) -> CheckpointError:
    return not_a(source, f"a TAEHV tiny decoder for Wan2.1 ({why})", list(sd), "taew2_1.pth names, e.g. "
                 "'decoder.1.weight' [256, 16, 3, 3], 'decoder.3.conv.0.weight', 'decoder.22.weight' [3, 64, 3, 3]", sd)


def infer_taehv_config(sd: Mapping[str, torch.Tensor], source: str = "state dict") -> TAEHVConfig:
    """Channel counts, latent channels, patch size and encoder presence from the weight shapes."""
    need = [f"decoder.{i}.weight" for i in (1, 8, 14, 20, 22)] + [f"decoder.{i}.conv.weight" for i in _TGROW]
    missing = [k for k in need if k not in sd]
    if missing:
        raise _not_taehv(sd, source, f"no {', '.join(repr(k) for k in missing[:3])}")
    if any(sd[k].ndim != 4 for k in need):
        raise _not_taehv(sd, source, "the decoder weights are not 2D convolutions")
    latent = int(sd["decoder.1.weight"].shape[1])
    if latent != 16:
        raise _not_taehv(sd, source, f"{latent} latent channels; the Wan2.1 latent has 16 (this may be a TAEHV for another model)")
    chans = tuple(int(sd[f"decoder.{_DEC_CONVS[i]}.weight"].shape[0]) for i in range(4))
    out = int(sd["decoder.22.weight"].shape[0])
    patch = int(round((out / 3) ** 0.5))
    if 3 * patch * patch != out:
        raise _not_taehv(sd, source, f"'decoder.22.weight' gives {out} output channels, expected 3 * p^2")
    has_encoder = "encoder.0.weight" in sd
    enc_c = int(sd["encoder.0.weight"].shape[0]) if has_encoder else 64
    enc_t = (True, True, False)
    if has_encoder:
        keys = [f"encoder.{i}.conv.weight" for i in _TPOOL]
        if any(k not in sd for k in keys):
            raise _not_taehv(sd, source, "incomplete encoder")
        enc_t = tuple(int(sd[k].shape[1]) == 2 * int(sd[k].shape[0]) for k in keys)
    return TAEHVConfig(
        latent_channels=latent,
        patch_size=patch,
        decoder_channels=chans,  # type: ignore[arg-type]
        encoder_channels=enc_c,
        encoder_time_downscale=enc_t,  # type: ignore[arg-type]
        has_encoder=has_encoder,
    )


def patch_tgrow(sd: Mapping[str, torch.Tensor], cfg: TAEHVConfig) -> dict[str, torch.Tensor]:
    """Some published files keep a TGrow conv with more output channels than the Wan2.1 time
    upscale (1, 2, 2) uses; like the published loader, keep the last-timestep channels."""
    out = dict(sd)
    for level, idx in enumerate(_TGROW):
        key = f"decoder.{idx}.conv.weight"
        c = cfg.decoder_channels[level]
        want = c * (2 if cfg.decoder_time_upscale[level] else 1)
        w = out[key]
        if w.shape[0] > want and w.shape[0] % c == 0:
            out[key] = w[-want:]
    return out

