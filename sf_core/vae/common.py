"""What the Wan2.1 VAE decoder and the TAEHV tiny decoder share: the decoder interface, the
streaming-decoder base class, input checks and strict loading (through `sf_core.weights`).

Layouts everywhere: latents [B, C=16, T, h, w]; pixels [B, 3, F, H, W] in [-1, 1] with
F = 1 + 4 * (T - 1), H = 8 * h, W = 8 * w.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Protocol, runtime_checkable

import torch
from torch import nn

from .. import latents as _latents
from ..errors import SelfForcingError
from ..weights import build_on_meta, check_strict, meta_shapes


# --------------------------------------------------------------------------------------------
# The interface the streaming sampler and the ComfyUI nodes use
# --------------------------------------------------------------------------------------------
@runtime_checkable
class StreamDecoder(Protocol):
    """Decodes one video chunk by chunk; the outputs concatenated over time equal a whole decode.

    ``decode(mu)`` takes un-normalised latents (ComfyUI LATENT convention), ``decode_normalized(z)``
    the DiT's normalised ones; both take [B, 16, t, h, w] for any t >= 1 and return that chunk's
    pixels [B, 3, n, 8h, 8w] in [-1, 1] at once, n = 4t, or 1 + 4(t - 1) for the first chunk.
    """

    latents_in: int
    frames_out: int

    def decode(self, mu: torch.Tensor) -> torch.Tensor: ...

    def decode_normalized(self, z: torch.Tensor) -> torch.Tensor: ...

    def reset(self) -> None: ...


@runtime_checkable
class VideoDecoder(Protocol):
    """What both `WanVAE` and `TAEHV` offer (see `sf_core.vae.load_decoder`)."""

    kind: str
    latent_channels: int
    temporal_stride: int
    spatial_stride: int

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def decode(self, mu: torch.Tensor) -> torch.Tensor: ...

    def decode_normalized(self, z: torch.Tensor) -> torch.Tensor: ...

    def stream_decoder(self) -> StreamDecoder: ...

    def num_frames(self, latent_frames: int) -> int: ...


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------
def check_latent(x: object, channels: int, what: str = "latent") -> torch.Tensor:
    """Raise SelfForcingError unless `x` is a floating tensor [B, channels, T, h, w] with T, h, w >= 1."""
    if not isinstance(x, torch.Tensor):
        raise SelfForcingError(f"{what}: expected a torch.Tensor [B, {channels}, T, h, w], got {type(x).__name__}")
    shape = tuple(x.shape)
    if x.ndim != 5:
        hint = ""
        if x.ndim == 4 and shape[0] == channels:
            hint = " (looks like one sample [C, T, h, w]: add the batch dimension with x[None])"
        elif x.ndim == 4 and shape[1] == channels:
            hint = " (looks like one frame [B, C, h, w]: add the time dimension with x[:, :, None])"
        raise SelfForcingError(f"{what}: expected 5 dimensions [B, {channels}, T, h, w], got shape {shape}{hint}")
    if shape[1] != channels:
        hint = ""
        if shape[2] == channels:
            hint = "; it looks like [B, T, C, h, w]: use x.permute(0, 2, 1, 3, 4)"
        raise SelfForcingError(
            f"{what}: expected {channels} channels in dimension 1 of [B, {channels}, T, h, w], "
            f"got shape {shape}{hint}"
        )
    if min(shape) < 1:
        raise SelfForcingError(f"{what}: empty tensor of shape {shape}; every dimension must be >= 1")
    if not x.is_floating_point():
        raise SelfForcingError(f"{what}: expected a floating-point tensor, got {x.dtype}")
    return x


# --------------------------------------------------------------------------------------------
# Streaming base
# --------------------------------------------------------------------------------------------
class VideoAutoencoder(nn.Module):
    """What the Wan VAE and TAEHV share: strides and latent channels from their config, device and dtype
    from `_anchor` (a weight of the decoder), and the frame count of a decode."""

    kind = ""

    @property
    def _anchor(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def temporal_stride(self) -> int:
        return self.config.temporal_stride

    @property
    def spatial_stride(self) -> int:
        return self.config.spatial_stride

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor.dtype

    def num_frames(self, latent_frames: int) -> int:
        """Video frames decoded from `latent_frames` latent frames: 1 + stride * (t - 1)."""
        if latent_frames < 1:
            raise SelfForcingError(f"need at least one latent frame, got {latent_frames}")
        return 1 + self.temporal_stride * (latent_frames - 1)

    # -- loading: subclasses give the file's name for messages and how to read a config off the weights
    file_label = ""

    @classmethod
    def infer_config(cls, sd: Mapping[str, torch.Tensor], source: str):
        raise NotImplementedError

    @classmethod
    def prepare_state_dict(cls, sd: Mapping[str, torch.Tensor], config) -> Mapping[str, torch.Tensor]:
        """Adapt published variants of the layout to the module's (default: as is)."""
        return sd

    @classmethod
    def from_state_dict(
        cls,
        sd: Mapping[str, torch.Tensor],
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        source: str = "state dict",
        decoder_only: bool = False,
    ):
        """Infer the config, check names and shapes strictly, and load. With ``decoder_only`` the encoder
        weights are checked but not kept (less memory)."""
        cfg = cls.infer_config(sd, source)
        sd = cls.prepare_state_dict(sd, cfg)
        check_strict(sd, meta_shapes(lambda: cls(cfg)), source, cls.file_label)
        if decoder_only and cfg.has_encoder:
            cfg = dataclasses.replace(cfg, has_encoder=False)
        return build_on_meta(lambda: cls(cfg), sd, device, dtype)


class StreamDecoderBase:
    """Shared bookkeeping of a stream: input checks, chunk-to-chunk consistency and counters.

    Subclasses implement ``_decode_chunk(x, normalized)`` for a checked chunk on the model's
    device and dtype. All state lives in the object, so two streams never interfere.
    """

    def __init__(self, model: nn.Module, latent_channels: int):
        self._model = model
        self._channels = latent_channels
        self.reset()

    def reset(self) -> None:
        """Forget everything: the next chunk starts a new video."""
        self._geometry: tuple[int, int, int] | None = None
        self.latents_in = 0
        self.frames_out = 0
        self._reset_state()

    def _reset_state(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _decode_chunk(self, x: torch.Tensor, normalized: bool) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _prepare(self, x: torch.Tensor, what: str) -> torch.Tensor:
        check_latent(x, self._channels, what)
        self._geometry = same_geometry(self._geometry, x, what, "latents of")
        return x

    def decode(self, mu: torch.Tensor) -> torch.Tensor:
        """Un-normalised latent chunk [B, 16, t, h, w] -> pixels [B, 3, n, 8h, 8w] in [-1, 1]."""
        x = self._prepare(mu, "decode(mu)")
        return self._run(x, normalized=False)

    def decode_normalized(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised (DiT) latent chunk [B, 16, t, h, w] -> pixels [B, 3, n, 8h, 8w] in [-1, 1]."""
        x = self._prepare(z, "decode_normalized(z)")
        return self._run(x, normalized=True)

    def _run(self, x: torch.Tensor, normalized: bool) -> torch.Tensor:
        with torch.no_grad():
            out = self._decode_chunk(x, normalized)
        self.latents_in += x.shape[2]
        self.frames_out += out.shape[2]
        return out


class StreamEncoderBase:
    """Encodes one video as its frames arrive, with causal state: the latents of all calls (and of
    `flush()`) concatenated equal a whole-video encode.

    ``encode(video)`` takes pixels [B, 3, n, H, W] in [-1, 1] for any n >= 0 and returns the latents
    [B, 16, m, H/8, W/8] of every frame group completed so far (m may be 0); frames of an unfinished
    group wait for the next call. ``encode_normalized`` returns the DiT's normalised latents.
    Subclasses give the group sizes and ``_encode_groups(x, sizes)`` for a run of complete groups.
    """

    def __init__(self, model: nn.Module, latent_channels: int, spatial_stride: int):
        self._model = model
        self._channels = latent_channels
        self._stride = spatial_stride
        self.reset()

    def reset(self) -> None:
        """Forget everything: the next frames start a new video."""
        self._geometry: tuple[int, int, int] | None = None
        self._pending: torch.Tensor | None = None  # frames of the unfinished group [B, 3, k, H, W]
        self.frames_in = 0
        self.latents_out = 0
        self._reset_state()

    @property
    def pending(self) -> int:
        """Frames received that belong to a group not complete yet."""
        return 0 if self._pending is None else self._pending.shape[2]

    def _reset_state(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _group_size(self, index: int) -> int:  # pragma: no cover - overridden
        """Frames of latent frame `index`."""
        raise NotImplementedError

    def _encode_groups(self, x: torch.Tensor, sizes: list[int], normalized: bool) -> torch.Tensor:  # pragma: no cover
        """Frames [B, 3, sum(sizes), H, W] on the model's device/dtype, in [-1, 1] -> latents [B, 16, len(sizes), h, w]."""
        raise NotImplementedError

    def _check(self, video: torch.Tensor) -> torch.Tensor:
        if not isinstance(video, torch.Tensor) or video.ndim != 5 or video.shape[1] != 3:
            shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise SelfForcingError(f"encode: expected video frames [B, 3, n, H, W] in [-1, 1], got {shape}")
        b, _, _, h, w = video.shape
        if h % self._stride or w % self._stride:
            raise SelfForcingError(f"encode: frame size {w}x{h} (WxH) must be a multiple of {self._stride}")
        self._geometry = same_geometry(self._geometry, video, "encode", "frames of")
        return video

    def _empty(self) -> torch.Tensor:
        b, h, w = self._geometry
        s = self._stride
        return torch.zeros(b, self._channels, 0, h // s, w // s, device=self._model_device(), dtype=self._model_dtype())

    def _model_device(self) -> torch.device:
        return next(self._model.parameters()).device

    def _model_dtype(self) -> torch.dtype:
        return next(self._model.parameters()).dtype

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Frames [B, 3, n, H, W] in [-1, 1] -> un-normalised mu [B, 16, m, H/8, W/8] of the groups completed."""
        return self._encode(video, normalized=False)

    def encode_normalized(self, video: torch.Tensor) -> torch.Tensor:
        """Frames [B, 3, n, H, W] in [-1, 1] -> normalised (DiT) z [B, 16, m, H/8, W/8] of the groups completed."""
        return self._encode(video, normalized=True)

    def _encode(self, video: torch.Tensor, normalized: bool) -> torch.Tensor:
        video = self._check(video)
        x = video.to(device=self._model_device(), dtype=self._model_dtype())
        if self._pending is not None:
            x = torch.cat([self._pending, x], dim=2)
        self.frames_in += video.shape[2]
        sizes, used = [], 0
        while True:
            size = self._group_size(self.latents_out + len(sizes))
            if used + size > x.shape[2]:
                break
            sizes.append(size)
            used += size
        self._pending = x[:, :, used:].clone() if used < x.shape[2] else None
        if not sizes:
            return self._empty()
        with torch.no_grad():
            out = self._encode_groups(x[:, :, :used], sizes, normalized)
        self.latents_out += len(sizes)
        return out

    def flush(self) -> torch.Tensor:
        """The video has ended: latents [B, 16, m, h, w] (un-normalised) of the frames still waiting, padded as
        the whole encode pads them, or none when the encoder does not pad (see the subclass)."""
        return self._flush(normalized=False)

    def flush_normalized(self) -> torch.Tensor:
        """`flush` as normalised (DiT) latents."""
        return self._flush(normalized=True)

    def _flush(self, normalized: bool) -> torch.Tensor:
        if self._geometry is None:
            raise SelfForcingError("flush: no frames were encoded")
        if self._pending is None:
            return self._empty()
        with torch.no_grad():
            out = self._flush_pending(normalized)
        self._pending = None
        return out

    def _flush_pending(self, normalized: bool) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError


def same_geometry(first: tuple[int, int, int] | None, x: torch.Tensor, what: str, unit: str) -> tuple[int, int, int]:
    """(batch, h, w) of chunk `x` [B, C, n, h, w], which must match the stream's `first` chunk (None: this is it)."""
    b, _, _, h, w = x.shape
    if first is not None and first != (b, h, w):
        pb, ph, pw = first
        raise SelfForcingError(f"{what}: this stream started with batch {pb} and {unit} {pw}x{ph} (WxH), got batch {b} "
                               f"and {w}x{h}; call reset() to start a new video")
    return b, h, w


def to_normalized(x: torch.Tensor, normalized: bool, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Latent -> normalised latent z on (device, dtype); conversion in float32."""
    x = x.to(device=device, dtype=torch.float32)
    if not normalized:
        x = _latents.normalize(x)
    return x.to(dtype)


def to_unnormalized(x: torch.Tensor, normalized: bool, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Latent -> un-normalised latent mu on (device, dtype); conversion in float32."""
    x = x.to(device=device, dtype=torch.float32)
    if normalized:
        x = _latents.denormalize(x)
    return x.to(dtype)
