"""Video files: an incremental H.264 MP4 writer, a reader, and PNG frame dumps.

    with VideoWriter("out.mp4", fps=16) as w:    # path checked here, before any heavy work
        for frames in stream:                     # [T, H, W, 3] uint8, or float in 0..1 (torch or numpy)
            w.write(frames)                       # encoded and muxed as they arrive
    # out.mp4 appears only when the block ends without an error (written to a temp file, then renamed)

H.264 in yuv420p needs even width and height: frames of odd size are padded by repeating their last
row / column (nothing is cropped), so the file is up to one pixel larger than the frames.
"""

from __future__ import annotations

import contextlib
import math
import os
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import SelfForcingError
from .io import atomic_path, check_writable

DEFAULT_FPS = 16
_CONTAINERS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}


class _Aborted(Exception):
    """Passed to atomic_path to make it delete the temporary file."""


def as_uint8_frames(frames: Any) -> np.ndarray:
    """[T, H, W, 3] or [H, W, 3]; uint8, or float in 0..1 (clamped); torch or numpy -> uint8 numpy [T, H, W, 3]."""
    if isinstance(frames, torch.Tensor):
        t = frames.detach()
        if t.is_floating_point():
            t = (t.float().clamp(0, 1) * 255).round().to(torch.uint8)
        frames = t.cpu().numpy()
    arr = np.asarray(frames)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        hint = " (channels first? use frames.permute(0, 2, 3, 1))" if arr.ndim == 4 and arr.shape[1] == 3 else ""
        raise SelfForcingError(f"frames must be [T, H, W, 3] RGB, got shape {tuple(arr.shape)}{hint}")
    if np.issubdtype(arr.dtype, np.floating):
        arr = np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise SelfForcingError(f"frames must be uint8 or float in 0..1, got {arr.dtype}")
    return np.ascontiguousarray(arr)


def to_uint8_frames(pixels: torch.Tensor) -> torch.Tensor:
    """Decoder output [B, 3, n, H, W] in [-1, 1] -> [n, H, W, 3] uint8 of the first batch item (CPU)."""
    return ((pixels[0].permute(1, 2, 3, 0).float() + 1) * 127.5).clamp(0, 255).round().to(torch.uint8).cpu()


def _pad_even(arr: np.ndarray) -> np.ndarray:
    ph, pw = arr.shape[1] % 2, arr.shape[2] % 2
    if ph or pw:
        arr = np.pad(arr, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    return arr


class VideoWriter:
    """Write an H.264 (yuv420p) video frame chunk by frame chunk; see the module docstring.

    path: .mp4 (also .m4v, .mov, .mkv); its folder must exist and be writable (checked here).
    fps:  frames per second (any positive number; 16 is Wan's rate).
    crf / preset: x264 quality (lower crf = better, 17-23 sensible) and speed preset.
    """

    def __init__(self, path: str | os.PathLike, fps: float = DEFAULT_FPS, *, crf: int = 19, preset: str = "medium"):
        self.path = check_writable(path)
        fmt = _CONTAINERS.get(self.path.suffix.lower())
        if fmt is None:
            raise SelfForcingError(f"cannot write {self.path}: use a .mp4 file name (or .m4v, .mov, .mkv)")
        if not (isinstance(fps, (int, float, Fraction)) and math.isfinite(fps) and fps > 0):
            raise SelfForcingError(f"fps must be a positive number, got {fps!r}")
        self.fps = Fraction(fps).limit_denominator(1001)
        self.crf, self.preset = int(crf), preset
        self.frames_written = 0
        self.size: tuple[int, int] | None = None  # (height, width) of the frames given
        self._stream = None
        self._atomic = atomic_path(self.path)
        self._tmp = self._atomic.__enter__()
        self._done = False
        try:
            self._container = av.open(str(self._tmp), mode="w", format=fmt)
        except BaseException as e:
            self._done = True
            self._atomic.__exit__(type(e), e, e.__traceback__)
            raise

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _open_stream(self, height: int, width: int) -> None:
        codec = "libx264" if "libx264" in av.codecs_available else "h264"
        stream = self._container.add_stream(codec, rate=self.fps)
        stream.width, stream.height = width + width % 2, height + height % 2
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = 1 / self.fps
        if codec == "libx264":
            stream.options = {"crf": str(self.crf), "preset": self.preset}
        self._stream = stream

    def write(self, frames: Any) -> None:
        """Append frames [T, H, W, 3] (or one [H, W, 3]); uint8 or float 0..1, torch or numpy."""
        if self._done:
            raise SelfForcingError(f"{self.path}: the video writer is already closed")
        arr = as_uint8_frames(frames)
        if self.size is None:
            self.size = (arr.shape[1], arr.shape[2])
            self._open_stream(*self.size)
        elif (arr.shape[1], arr.shape[2]) != self.size:
            raise SelfForcingError(f"frame size changed from {self.size} to {arr.shape[1:3]} within one video")
        for image in _pad_even(arr):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = self.frames_written
            frame.time_base = 1 / self.fps
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
            self.frames_written += 1

    def close(self) -> Path:
        """Flush the encoder and move the finished file into place. Raises if no frame was written."""
        if self._done:
            return self.path
        if self._stream is None:
            self.abort()
            raise SelfForcingError(f"{self.path}: no frames were written, so no video was saved")
        try:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
            self._container.close()
        except BaseException as e:
            self._done = True
            self._atomic.__exit__(type(e), e, e.__traceback__)
            raise
        self._done = True
        self._atomic.__exit__(None, None, None)  # renames the temporary file over self.path
        return self.path

    def abort(self) -> None:
        """Discard everything: the temporary file is deleted and self.path is left untouched."""
        if self._done:
            return
        self._done = True
        try:
            self._container.close()
        except Exception:
            pass
        e = _Aborted()
        self._atomic.__exit__(_Aborted, e, None)

    def __del__(self):  # never leave a temporary file behind, even when close() was forgotten
        if getattr(self, "_done", True) is False:
            self.abort()


@contextlib.contextmanager
def _open_video(path: str | os.PathLike):
    """(container, its first video stream, frame rate or 0.0), with clear errors for a missing, empty or unreadable
    file (also when decoding fails later inside the block)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such video file")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise SelfForcingError(f"{path}: holds no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            yield container, stream, float(rate) if rate else 0.0
    except av.error.FFmpegError as e:
        raise SelfForcingError(f"{path}: not a readable video ({e})") from e


def read_video(path: str | os.PathLike) -> tuple[torch.Tensor, float]:
    """Decode a video file -> (frames uint8 [T, H, W, 3] RGB, fps)."""
    with _open_video(path) as (container, stream, fps):
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        empty = torch.zeros(0, stream.height, stream.width, 3, dtype=torch.uint8)
    return (torch.from_numpy(np.stack(frames)) if frames else empty), fps


def probe_video(path: str | os.PathLike) -> dict:
    """Size, frame count (0 when the container does not say) and frame rate of a video file, without decoding."""
    with _open_video(path) as (_, stream, fps):
        return {"width": stream.width, "height": stream.height, "frames": int(stream.frames or 0), "fps": fps}


def iter_video(path: str | os.PathLike, first: int = 9, then: int = 12):
    """Decode a video file a few frames at a time: uint8 batches [n, H, W, 3], `first` frames then `then` at a
    time (1 + 4k, then 4k: what a stream's chunks take); the last batch may be shorter."""
    try:
        with av.open(str(path)) as container:
            batch, size = [], first
            for frame in container.decode(container.streams.video[0]):
                batch.append(frame.to_ndarray(format="rgb24"))
                if len(batch) == size:
                    yield torch.from_numpy(np.stack(batch))
                    batch, size = [], then
            if batch:
                yield torch.from_numpy(np.stack(batch))
    except av.error.FFmpegError as e:
        raise SelfForcingError(f"{path}: the video could not be decoded further ({e})") from e


def read_image(path: str | os.PathLike, width: int, height: int) -> torch.Tensor:
    """An image file -> uint8 [1, height, width, 3]: scaled to cover the size (bilinear), then centre-cropped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            scale = max(width / im.width, height / im.height)
            w, h = max(width, round(im.width * scale)), max(height, round(im.height * scale))
            im = im.resize((w, h), Image.BILINEAR)
            left, top = (w - width) // 2, (h - height) // 2
            im = im.crop((left, top, left + width, top + height))
            return torch.from_numpy(np.asarray(im).copy())[None]
    except UnidentifiedImageError as e:
        raise SelfForcingError(f"{path}: not a readable image ({e})") from e


def write_frames_png(folder: str | os.PathLike, frames: Any, start_index: int = 0, prefix: str = "frame_") -> list[Path]:
    """Write frames [T, H, W, 3] as folder/{prefix}{start_index + i:06d}.png (each atomically);
    the folder is created if needed. Returns the paths written."""
    arr = as_uint8_frames(frames)
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SelfForcingError(f"cannot create the frame folder {folder}: {e}") from e
    paths = []
    for i, image in enumerate(arr):
        target = folder / f"{prefix}{start_index + i:06d}.png"
        with atomic_path(target) as tmp:
            Image.fromarray(image).save(tmp, format="PNG", compress_level=4)
        paths.append(target)
    return paths
