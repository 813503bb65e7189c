"""The Wan2.1 causal 3D VAE (an own implementation with the Wan parameter names).

Loads ``Wan2.1_VAE.pth`` and ComfyUI's ``wan_2.1_vae.safetensors`` (same names) with strict key
matching; the configuration is inferred from the weight shapes, so small test VAEs load too.

Shapes (real config: spatial stride 8, temporal stride 4, 16 latent channels):
  encode:  video [B, 3, 1 + 4k, H, W] in [-1, 1]  ->  mu [B, 16, 1 + k, H/8, W/8] (un-normalised)
  decode:  mu [B, 16, t, h, w]  ->  video [B, 3, 1 + 4(t - 1), 8h, 8w] in [-1, 1]

Causality: the encoder consumes frames as 1, 4, 4, ...; the decoder runs one latent frame at a
time. Every causal 3x3x3 convolution keeps the last 2 frames of its input as context (zeros
before the first frame), so decoding chunk by chunk with a kept state gives the same result as
decoding the whole latent. The temporal upsamplers (decoder) pass the very first frame through
without their time convolution (that is why the first latent frame yields one frame and each
later one four); the temporal downsamplers (encoder) do the mirror image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SelfForcingError
from ..latents import normalize
from .common import StreamDecoderBase, StreamEncoderBase, VideoAutoencoder, check_latent, to_unnormalized
from .wan_vae_config import WanVAEConfig, infer_wan_vae_config

CONTEXT_FRAMES = 2  # frames of input kept by every causal 3x3x3 convolution


# --------------------------------------------------------------------------------------------
# Per-stream causal memory
# --------------------------------------------------------------------------------------------
class CausalState:
    """The memory of every causal layer of one stream, visited in a fixed order per step.

    A slot is ``None`` until its layer has seen the first frame. The object belongs to one
    stream; nothing is stored on the modules, so any number of streams can share a model.
    """

    __slots__ = ("slots", "cursor")

    def __init__(self):
        self.slots: list[torch.Tensor | None] = []
        self.cursor = 0

    def rewind(self) -> None:
        self.cursor = 0

    def take(self) -> torch.Tensor | None:
        if self.cursor == len(self.slots):
            self.slots.append(None)
        return self.slots[self.cursor]

    def put(self, value: torch.Tensor) -> None:
        self.slots[self.cursor] = value
        self.cursor += 1


def _with_context(x: torch.Tensor, state: CausalState, n: int) -> torch.Tensor:
    """Prepend the last `n` frames seen (zeros at the start) and remember the new last `n`."""
    prev = state.take()
    if prev is None:
        b, c, _, h, w = x.shape
        prev = x.new_zeros(b, c, n, h, w)
    full = torch.cat([prev, x], dim=2)
    keep = x[:, :, -n:] if x.shape[2] >= n else full[:, :, -n:]
    state.put(keep.clone())
    return full


def _frames_to_batch(x: torch.Tensor) -> torch.Tensor:
    b, c, t, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)


def _batch_to_frames(x: torch.Tensor, b: int) -> torch.Tensor:
    bt, c, h, w = x.shape
    return x.reshape(b, bt // b, c, h, w).permute(0, 2, 1, 3, 4)


# --------------------------------------------------------------------------------------------
# Layers (parameter names follow Wan's)
# --------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """x / ||x||_channels * sqrt(C) * gamma; the norm is computed in float32."""

    def __init__(self, dim: int, video: bool = True):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1, 1) if video else (1, 1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float32).clamp_min(1e-12)
        return x / norm.to(x.dtype) * (self.gamma * self.scale).to(x.dtype)


class CausalConv3d(nn.Conv3d):
    """3D convolution, causal in time: zero 'same' padding in space, past context in time."""

    def __init__(self, in_dim: int, out_dim: int, kernel: int):
        super().__init__(in_dim, out_dim, kernel, padding=(0, kernel // 2, kernel // 2))
        self.context = kernel - 1

    def forward(self, x: torch.Tensor, state: CausalState | None = None) -> torch.Tensor:
        if self.context:
            if state is None:
                x = F.pad(x, (0, 0, 0, 0, self.context, 0))
            else:
                x = _with_context(x, state, self.context)
        return super().forward(x)


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3),
            RMSNorm(out_dim),
            nn.SiLU(),
            nn.Identity(),  # dropout in training code (index kept for the parameter names)
            CausalConv3d(out_dim, out_dim, 3),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, state: CausalState | None) -> torch.Tensor:
        skip = self.shortcut(x)
        for layer in self.residual:
            x = layer(x, state) if isinstance(layer, CausalConv3d) else layer(x)
        return x + skip


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, video=False)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, state: CausalState | None = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = self.to_qkv(self.norm(_frames_to_batch(x)))  # [bt, 3c, h, w]
        q, k, v = y.reshape(b * t, 3, c, h * w).transpose(-1, -2).unsqueeze(1).unbind(2)
        y = F.scaled_dot_product_attention(q, k, v)  # [bt, 1, hw, c]
        y = y.squeeze(1).transpose(-1, -2).reshape(b * t, c, h, w)
        return x + _batch_to_frames(self.proj(y), b)


class Upsample2x(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")


class Resample(nn.Module):
    """Spatial x2 up/down sampling, optionally with x2 temporal up/down sampling.

    upsample3d: time conv (C -> 2C, kernel 3 causal) turns each frame after the first into two
    frames, then nearest x2 and a 3x3 conv (C -> C/2). The first frame skips the time conv.
    downsample3d: zero pad right/bottom + 3x3 stride-2 conv, then a stride-2 time conv over
    [previous frame, frames]; the first frame skips the time conv.
    """

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode.startswith("up"):
            self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
            if mode == "upsample3d":
                self.time_conv = nn.Conv3d(dim, dim * 2, (3, 1, 1))
        elif mode.startswith("down"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
            if mode == "downsample3d":
                self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        else:
            raise ValueError(f"unknown resample mode {mode!r}")

    def _time_up(self, x: torch.Tensor, state: CausalState) -> torch.Tensor:
        prev = state.take()
        if prev is None:  # the very first frame of the video at this level passes through
            head, rest = x[:, :, :1], x[:, :, 1:]
            b, c, _, h, w = x.shape
            prev = x.new_zeros(b, c, CONTEXT_FRAMES, h, w)
        else:
            head, rest = None, x
        if rest.shape[2] == 0:
            state.put(prev)
            return head
        full = torch.cat([prev, rest], dim=2)
        state.put(full[:, :, -CONTEXT_FRAMES:].clone())
        y = self.time_conv(full)  # [b, 2c, t, h, w]: channel halves are two consecutive frames
        b, c2, t, h, w = y.shape
        y = y.reshape(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)
        return y if head is None else torch.cat([head, y], dim=2)

    def _time_down(self, x: torch.Tensor, state: CausalState) -> torch.Tensor:
        prev = state.take()
        if prev is None:
            head, prev, rest = x[:, :, :1], x[:, :, :1], x[:, :, 1:]
        else:
            head, rest = None, x
        if rest.shape[2] % 2:
            raise SelfForcingError(
                f"temporal downsampling needs an even number of frames after the first, got {rest.shape[2]}"
            )
        if rest.shape[2] == 0:
            state.put(prev.clone())
            return head
        full = torch.cat([prev, rest], dim=2)
        state.put(full[:, :, -1:].clone())
        y = self.time_conv(full)
        return y if head is None else torch.cat([head, y], dim=2)

    def forward(self, x: torch.Tensor, state: CausalState) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._time_up(x, state)
        b = x.shape[0]
        x = _batch_to_frames(self.resample(_frames_to_batch(x)), b)
        if self.mode == "downsample3d":
            x = self._time_down(x, state)
        return x


def _head(dim: int, out: int) -> nn.Sequential:
    return nn.Sequential(RMSNorm(dim), nn.SiLU(), CausalConv3d(dim, out, 3))


def _run(seq: nn.Sequential, x: torch.Tensor, state: CausalState) -> torch.Tensor:
    for layer in seq:
        if isinstance(layer, (ResidualBlock, Resample, AttentionBlock, CausalConv3d)):
            x = layer(x, state)
        else:
            x = layer(x)
    return x


class Encoder3d(nn.Module):
    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3)
        blocks: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(cin, cout))
                cin = cout
            if i != len(cfg.dim_mult) - 1:
                blocks.append(Resample(cout, "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"))
        self.downsamples = nn.Sequential(*blocks)
        top = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(top, top), AttentionBlock(top), ResidualBlock(top, top))
        self.head = _head(top, cfg.z_dim * 2)

    def forward(self, x: torch.Tensor, state: CausalState) -> torch.Tensor:
        x = self.conv1(x, state)
        x = _run(self.downsamples, x, state)
        x = _run(self.middle, x, state)
        return _run(self.head, x, state)


class Decoder3d(nn.Module):
    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.dim * m for m in (mult[-1], *mult[::-1])]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]), ResidualBlock(dims[0], dims[0]))
        blocks: list[nn.Module] = []
        up_t = cfg.temporal_upsample
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                cin = cin // 2  # the previous Resample halved the channels
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResidualBlock(cin, cout))
                cin = cout
            if i != len(mult) - 1:
                blocks.append(Resample(cout, "upsample3d" if up_t[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*blocks)
        self.head = _head(dims[-1], 3)

    def forward(self, x: torch.Tensor, state: CausalState) -> torch.Tensor:
        x = self.conv1(x, state)
        x = _run(self.middle, x, state)
        x = _run(self.upsamples, x, state)
        return _run(self.head, x, state)


# --------------------------------------------------------------------------------------------
# The VAE
# --------------------------------------------------------------------------------------------
class WanVAE(VideoAutoencoder):
    """Wan2.1 VAE. Build with a `WanVAEConfig`, or load with `WanVAE.from_state_dict` /
    `sf_core.vae.load_vae`. With ``config.has_encoder = False`` only the decoder is built."""

    kind = "wan"

    def __init__(self, config: WanVAEConfig = WanVAEConfig()):
        super().__init__()
        self.config = config
        z = config.z_dim
        if config.has_encoder:
            self.encoder = Encoder3d(config)
            self.conv1 = CausalConv3d(z * 2, z * 2, 1)
        self.conv2 = CausalConv3d(z, z, 1)
        self.decoder = Decoder3d(config)

    @property
    def _anchor(self) -> torch.Tensor:
        return self.conv2.weight

    # -- encode --------------------------------------------------------------------------
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, 3, 1 + 4k, H, W] in [-1, 1] -> mu [B, z, 1 + k, H/8, W/8] (un-normalised).

        Frames are consumed as 1, 4, 4, ... with the causal state; H and W must be multiples of 8.
        """
        if not self.config.has_encoder:
            raise SelfForcingError("this Wan VAE was loaded without its encoder (use load_vae for encoding)")
        return self.stream_encoder().encode(self._check_video(video))

    def encode_normalized(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, 3, 1 + 4k, H, W] in [-1, 1] -> normalised (DiT) z [B, 16, 1 + k, H/8, W/8]."""
        mu = self.encode(video)
        return normalize(mu.float()).to(mu.dtype)

    def encode_all_at_once(self, video: torch.Tensor) -> torch.Tensor:
        """Same as `encode` but with all frames in one pass (more memory; for checks)."""
        if not self.config.has_encoder:
            raise SelfForcingError("this Wan VAE was loaded without its encoder")
        video = self._check_video(video)
        with torch.no_grad():
            h = self.conv1(self.encoder(video, CausalState()))
        return h[:, : self.config.z_dim]

    def _check_video(self, video: torch.Tensor) -> torch.Tensor:
        if not isinstance(video, torch.Tensor) or video.ndim != 5 or video.shape[1] != 3:
            shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise SelfForcingError(f"encode: expected video [B, 3, T, H, W] in [-1, 1], got {shape}")
        t, h, w = video.shape[2:]
        ts, ss = self.temporal_stride, self.spatial_stride
        if (t - 1) % ts:
            raise SelfForcingError(
                f"encode: {t} frames is not 1 + {ts}*k; use {1 + ts * ((t - 1) // ts)} or {1 + ts * ((t - 1) // ts + 1)} frames"
            )
        if h % ss or w % ss:
            raise SelfForcingError(f"encode: frame size {w}x{h} (WxH) must be a multiple of {ss}")
        return video.to(device=self.device, dtype=self.dtype)

    # -- decode --------------------------------------------------------------------------
    def decode(self, mu: torch.Tensor) -> torch.Tensor:
        """mu [B, z, t, h, w] (un-normalised) -> video [B, 3, 1 + 4(t - 1), 8h, 8w] in [-1, 1]."""
        return self.stream_decoder().decode(mu)

    def decode_normalized(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised (DiT) latent [B, 16, t, h, w] -> video [B, 3, 1 + 4(t - 1), 8h, 8w] in [-1, 1]."""
        return self.stream_decoder().decode_normalized(z)

    def decode_all_at_once(self, mu: torch.Tensor) -> torch.Tensor:
        """Same result as `decode`, but all latent frames go through each layer together (more
        memory, no per-frame loop; for checks)."""
        check_latent(mu, self.config.z_dim, "decode")
        with torch.no_grad():
            x = self.conv2(mu.to(device=self.device, dtype=self.dtype))
            return self.decoder(x, CausalState()).clamp_(-1.0, 1.0)

    def stream_encoder(self) -> "WanStreamEncoder":
        """A new encoding stream: feed frames as they arrive (first 1 + 4k, then 4k at a time, or any split)."""
        if not self.config.has_encoder:
            raise SelfForcingError("this Wan VAE was loaded without its encoder (use load_vae for encoding)")
        return WanStreamEncoder(self)

    def stream_decoder(self) -> "WanStreamDecoder":
        """A new stream: feed latent chunks of any size in order, get their frames at once."""
        return WanStreamDecoder(self)

    # -- loading -------------------------------------------------------------------------
    file_label = "Wan2.1 VAE"

    @classmethod
    def infer_config(cls, sd, source):
        return infer_wan_vae_config(sd, source)


class WanStreamDecoder(StreamDecoderBase):
    """Decodes one video chunk by chunk with the Wan VAE; see `StreamDecoder`.

    Each latent frame is decoded on its own with the kept causal state (the last 2 frames of
    every causal conv's input), so memory stays flat however long the video is.
    """

    def __init__(self, vae: WanVAE):
        self.vae = vae
        super().__init__(vae, vae.config.z_dim)

    def _reset_state(self) -> None:
        self._state = CausalState()

    def _decode_chunk(self, x: torch.Tensor, normalized: bool) -> torch.Tensor:
        vae = self.vae
        mu = to_unnormalized(x, normalized, vae.dtype, vae.device)
        mu = vae.conv2(mu)
        outs = []
        for i in range(mu.shape[2]):
            self._state.rewind()
            outs.append(vae.decoder(mu[:, :, i : i + 1], self._state))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        return out.clamp_(-1.0, 1.0)


class WanStreamEncoder(StreamEncoderBase):
    """Encodes one video as its frames arrive with the Wan VAE; see `StreamEncoderBase`.

    Latent frame 0 comes from frame 0 alone, each later one from the next 4 frames, every group with the
    kept causal state, exactly as the whole-video encode consumes them. Frames after the last complete
    group when the video ends cannot form a latent frame: `flush()` drops them (counted in `dropped`).
    """

    def __init__(self, vae: WanVAE):
        self.vae = vae
        super().__init__(vae, vae.config.z_dim, vae.spatial_stride)

    def _reset_state(self) -> None:
        self._state = CausalState()
        self.dropped = 0

    def _group_size(self, index: int) -> int:
        return 1 if index == 0 else self.vae.temporal_stride

    def _encode_groups(self, x: torch.Tensor, sizes: list[int], normalized: bool) -> torch.Tensor:
        outs, start = [], 0
        for n in sizes:
            self._state.rewind()
            outs.append(self.vae.encoder(x[:, :, start : start + n], self._state))
            start += n
        mu = self.vae.conv1(outs[0] if len(outs) == 1 else torch.cat(outs, dim=2))[:, : self.vae.config.z_dim]
        return normalize(mu.float()).to(mu.dtype) if normalized else mu

    def _flush_pending(self, normalized: bool) -> torch.Tensor:
        self.dropped += self.pending
        return self._empty()
