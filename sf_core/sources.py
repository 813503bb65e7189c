"""Input videos of a stream (video-to-video): latent frames handed to the chunk loop as it asks for them.

    source = EncodedVideo(frame_batches, vae.stream_encoder())   # pixels in, encoded as they arrive
    source = LatentVideo(z)                                       # latents already known [B, 16, T, h, w]
    stream = Stream(..., video=source)

`read(count)` returns the next normalised latent frames [B, 16, n, h, w] with n == count, or fewer (possibly
none) when the input has ended: the stream then ends too.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Protocol, runtime_checkable

import torch

from .errors import SelfForcingError


@runtime_checkable
class LatentSource(Protocol):
    def read(self, count: int) -> torch.Tensor:
        """The next `count` normalised latent frames [B, 16, n, h, w] (n < count only at the end)."""
        ...


class LatentVideo:
    """An input video given as normalised latents [B, 16, T, h, w] (e.g. a ComfyUI LATENT, or pre-encoded)."""

    def __init__(self, latents: torch.Tensor):
        if not isinstance(latents, torch.Tensor) or latents.ndim != 5:
            raise SelfForcingError(f"input video latents must be [B, 16, T, h, w], got {getattr(latents, 'shape', latents)}")
        self.latents = latents
        self.position = 0

    @property
    def frames(self) -> int:
        return self.latents.shape[2]

    def read(self, count: int) -> torch.Tensor:
        out = self.latents[:, :, self.position : self.position + count]
        self.position += out.shape[2]
        return out


class EncodedVideo:
    """An input video given as pixel frames, encoded as the stream asks for them.

    frames: an iterable of frame batches [n, H, W, 3] (uint8, or float in 0..1; torch or numpy), e.g. a video
    file read a few frames at a time, Load Video's IMAGE, or a camera. encoder: a streaming encoder of a Wan
    VAE or TAEHV (`.stream_encoder()`); frames are pulled only until the latent frames asked for exist, and
    the end of the input is flushed as the encoder's whole-video encode would treat it.
    """

    def __init__(self, frames: Iterable, encoder):
        self._frames: Iterator = iter(frames)
        self.encoder = encoder
        self._ready: list[torch.Tensor] = []
        self._count = 0
        self._ended = False
        self.frames_read = 0

    def read(self, count: int) -> torch.Tensor:
        while self._count < count and not self._ended:
            batch = next(self._frames, None)
            if batch is None:
                self._ended = True
                if self.frames_read:
                    self._push(self.encoder.flush_normalized())
                break
            video = to_video(batch)
            self.frames_read += video.shape[2]
            self._push(self.encoder.encode_normalized(video))
        if not self._ready:
            return torch.zeros(0)
        z = torch.cat(self._ready, dim=2)
        out, rest = z[:, :, :count], z[:, :, count:]
        self._ready = [rest] if rest.shape[2] else []
        self._count = rest.shape[2]
        return out

    def _push(self, z: torch.Tensor) -> None:
        if z.ndim == 5 and z.shape[2]:
            self._ready.append(z.float())
            self._count += z.shape[2]


def to_video(frames) -> torch.Tensor:
    """Frames [n, H, W, 3] (uint8 or float 0..1, torch or numpy) -> [1, 3, n, H, W] float in [-1, 1]."""
    t = frames if isinstance(frames, torch.Tensor) else torch.as_tensor(frames)
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4 or t.shape[-1] not in (3, 4):
        raise SelfForcingError(f"input frames must be [frames, height, width, 3], got {tuple(t.shape)}")
    t = t[..., :3]
    t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float().clamp(0, 1)
    return (t * 2 - 1).permute(3, 0, 1, 2)[None]


def frame_batches(frames: torch.Tensor, first: int = 9, then: int = 12) -> Iterator[torch.Tensor]:
    """Split frames [T, H, W, 3] as a stream delivers them: `first` (1 + 4k), then `then` (4k) at a time."""
    start, size = 0, first
    while start < frames.shape[0]:
        yield frames[start : start + size]
        start += size
        size = then
