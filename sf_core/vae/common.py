"""What the Wan2.1 VAE decoder and the TAEHV tiny decoder share: the decoder interface, the
streaming-decoder base class, input checks and strict state-dict loading.

Layouts everywhere: latents [B, C=16, T, h, w]; pixels [B, 3, F, H, W] in [-1, 1] with
F = 1 + 4 * (T - 1), H = 8 * h, W = 8 * w.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Mapping, Protocol, runtime_checkable

import torch
from torch import nn

from ..errors import CheckpointError, SelfForcingError
from .. import latents as _latents


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
        with torch.device("meta"):
            full = cls(cfg)
        check_strict(sd, full, source, cls.file_label)
        if decoder_only and cfg.has_encoder:
            cfg = dataclasses.replace(cfg, has_encoder=False)
        return materialize(lambda: cls(cfg), sd, device, dtype)


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
        b, _, _, h, w = x.shape
        if self._geometry is not None and self._geometry != (b, h, w):
            pb, ph, pw = self._geometry
            raise SelfForcingError(
                f"{what}: this stream started with batch {pb} and latent size {ph}x{pw} (h x w), "
                f"got a chunk with batch {b} and size {h}x{w}; call reset() to start a new video"
            )
        self._geometry = (b, h, w)
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
        if self._geometry is not None and self._geometry != (b, h, w):
            pb, ph, pw = self._geometry
            raise SelfForcingError(
                f"encode: this stream started with batch {pb} and frames of {pw}x{ph} (WxH), got batch {b} and "
                f"{w}x{h}; call reset() to start a new video"
            )
        self._geometry = (b, h, w)
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


# --------------------------------------------------------------------------------------------
# State dicts
# --------------------------------------------------------------------------------------------
_WRAPPER_KEYS = ("state_dict", "model", "module", "vae", "decoder_state_dict")
_PREFIXES = ("module.", "_orig_mod.", "vae.", "first_stage_model.")


def flatten_state_dict(obj: Mapping, source: str) -> dict[str, torch.Tensor]:
    """A loaded file -> a flat {name: tensor} dict.

    Unwraps one level of {"state_dict": {...}}-style nesting and strips a wrapper prefix that
    every key shares (``module.``, ``_orig_mod.``, ``vae.``, ``first_stage_model.``).
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: holds a {type(obj).__name__}, expected a dict of tensors")
    sd = obj
    for _ in range(2):
        tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
        if tensors:
            break
        inner = [k for k in _WRAPPER_KEYS if isinstance(sd.get(k), Mapping)]
        if not inner:
            break
        sd = sd[inner[0]]
    tensors = {str(k): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    changed = True
    while changed and tensors:
        changed = False
        for p in _PREFIXES:
            if all(k.startswith(p) for k in tensors):
                tensors = {k[len(p):]: v for k, v in tensors.items()}
                changed = True
    if "decoder.conv1.weight" not in tensors and "decoder.1.weight" not in tensors:
        # a whole-pipeline checkpoint that also carries a VAE under a prefix
        for p in ("first_stage_model.", "vae."):
            sub = {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}
            if "decoder.conv1.weight" in sub or "decoder.1.weight" in sub:
                return sub
    if not tensors:
        raise CheckpointError(
            f"{source}: no tensors found at the top level; expected a VAE state dict, found {describe_state_dict(obj)}"
        )
    return tensors


def describe_state_dict(sd: Mapping[str, object]) -> str:
    """A short human guess at what a state dict holds, for error messages."""
    keys = [str(k) for k in sd]
    ks = set(keys)

    def has(pattern: str) -> bool:
        rx = re.compile(pattern)
        return any(rx.search(k) for k in keys)

    n = len(keys)
    if any(k in ks for k in ("generator_ema", "generator", "critic")):
        what = "a Self Forcing training checkpoint (a diffusion model, not a VAE)"
    elif has(r"(^|\.)patch_embedding\.weight$") or has(r"(^|\.)blocks\.\d+\.self_attn\.") or has(
        r"(^|\.)condition_embedder\."
    ):
        what = "a Wan diffusion model (DiT), not a VAE"
    elif has(r"lora_(A|B|up|down)\b"):
        what = "a LoRA, not a VAE"
    elif "shared.weight" in ks or has(r"^encoder\.block\.\d+\.") or has(r"^blocks\.\d+\.attn\.q\.") or (
        "token_embedding.weight" in ks
    ):
        what = "a text encoder (UMT5), not a VAE"
    elif "post_quant_conv.weight" in ks or has(r"^decoder\.up_blocks\."):
        what = (
            "a diffusers-layout VAE; use the original Wan2.1_VAE.pth or ComfyUI's wan_2.1_vae.safetensors"
        )
    elif "decoder.conv1.weight" in ks:
        w = sd["decoder.conv1.weight"]
        zc = tuple(getattr(w, "shape", ()))[1:2]
        if zc and zc[0] == 48:
            what = "the Wan2.2 VAE (48 latent channels); Self Forcing needs the Wan2.1 VAE (16 channels)"
        else:
            what = "a Wan-style VAE"
    elif "decoder.1.weight" in ks and has(r"^decoder\.\d+\.conv\.0\.weight$"):
        what = "a TAEHV tiny autoencoder"
    else:
        what = "an unknown model"
    sample = ", ".join(repr(k) for k in keys[:4])
    return f"{what} ({n} entries, e.g. {sample})"


def _short(items: list[str], limit: int = 6) -> str:
    items = sorted(items)
    more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def check_strict(
    sd: Mapping[str, torch.Tensor], module: nn.Module, source: str, what: str
) -> None:
    """Raise CheckpointError unless `sd` has exactly the module's parameter names and shapes."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [
        f"{k} {tuple(sd[k].shape)} (expected {expected[k]})"
        for k in expected
        if k in sd and tuple(sd[k].shape) != expected[k]
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {_short(unexpected)}")
        if wrong:
            parts.append(f"wrong shape {len(wrong)}: {_short(wrong, 4)}")
        raise CheckpointError(
            f"{source}: the weights do not match the {what} layout ({'; '.join(parts)}). "
            f"The file looks like {describe_state_dict(sd)}"
        )


def materialize(
    build: Callable[[], nn.Module],
    sd: Mapping[str, torch.Tensor],
    device: str | torch.device,
    dtype: torch.dtype,
) -> nn.Module:
    """Build a module on the meta device (free) and assign `sd` (cast to device/dtype) to it."""
    with torch.device("meta"):
        module = build()
    names = set(module.state_dict())
    cast = {k: sd[k].to(device=device, dtype=dtype) for k in names}
    module.load_state_dict(cast, strict=True, assign=True)
    return module.eval().requires_grad_(False)

