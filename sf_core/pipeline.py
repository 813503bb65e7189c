"""Stream + streaming decode: what the CLI, the ComfyUI sampler and the benchmarks consume.

    for step in decode_stream(stream, decoder):
        step.chunk    # the clean latent chunk (sf_core.stream.Chunk)
        step.frames   # its decoded frames [n, H, W, 3] uint8 on CPU (None without a decoder)
        step.dit_s, step.decode_s

Timing is taken by this consumer after each chunk (a device sync here is measurement, not the loop).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .overlap import overlapped
from .stream import Chunk, Stream
from .timing import synchronize
from .video import to_uint8_frames


@dataclass
class StepResult:
    chunk: Chunk
    frames: torch.Tensor | None  # [n, H, W, 3] uint8 (first batch item), CPU
    dit_s: float
    decode_s: float
    elapsed_s: float  # since the stream started
    clean_at: float  # time.monotonic() when the chunk became clean (before decoding)
    preview: torch.Tensor | None = None  # frames of the preview decoder, if one was given


@dataclass
class Timings:
    dit_s: float = 0.0
    decode_s: float = 0.0
    first_chunk_s: float | None = None
    first_frame_s: float | None = None
    frames: int = 0
    latent_frames: int = 0
    total_s: float = 0.0
    per_chunk_s: list = field(default_factory=list)

    def summary(self) -> dict:
        out = {
            "latent_frames": self.latent_frames,
            "video_frames": self.frames,
            "first_chunk_latency_s": _r(self.first_chunk_s),
            "first_frame_latency_s": _r(self.first_frame_s),
            "latent_fps_dit_only": _r(self.latent_frames / self.dit_s if self.dit_s else None),
            "dit_seconds": _r(self.dit_s),
            "decode_seconds": _r(self.decode_s),
            "total_seconds": _r(self.total_s),
        }
        if self.frames:
            out["fps_with_decoding"] = _r(self.frames / self.total_s)
            out["fps_without_decoding"] = _r(self.frames / self.dit_s)
        return out


def _r(v):
    return None if v is None else round(v, 4)


def decode_stream(stream: Stream, decoder=None, timings: Timings | None = None, *, overlap: bool = False,
                  preview=None) -> Iterator[StepResult]:
    """Run `stream`, decoding each chunk with a streaming `decoder` (or not, if None).

    preview: a second streaming decoder (e.g. TAEHV for live previews next to the Wan VAE of the saved
    video); its frames are in `step.preview`. overlap: decode a chunk while the next one generates (worker
    threads, and CUDA streams on a GPU; see `sf_core.overlap`) - same frames, same order.
    """
    t = timings if timings is not None else Timings()
    decoders = [d for d in (decoder, preview) if d is not None]
    steps = (overlapped(stream, decoders, t) if overlap else _inline(stream, decoders))
    start = time.perf_counter()
    for chunk, frames, dit_s, dec_s, clean_at, clean_perf in steps:
        now = time.perf_counter()
        t.dit_s += dit_s
        t.decode_s += sum(dec_s)
        t.latent_frames += chunk.latents.shape[2]
        t.per_chunk_s.append(round(dit_s, 5))
        if t.first_chunk_s is None:
            t.first_chunk_s = clean_perf - start
        main = frames[0] if decoder is not None else None
        if main is not None:
            t.frames += main.shape[0]
            if t.first_frame_s is None:
                t.first_frame_s = now - start
        t.total_s = now - start
        yield StepResult(chunk, main, dit_s, sum(dec_s), now - start, clean_at,
                         frames[-1] if preview is not None else None)


def _inline(stream: Stream, decoders: list):
    """Chunks decoded in the generating thread, one after the other (the reference for `overlapped`)."""
    device = stream.backbone.device
    last = time.perf_counter()
    for chunk in stream:
        synchronize(device)
        clean = time.perf_counter()
        clean_at = time.monotonic()
        frames, dec_s = [], []
        for d in decoders:
            t0 = time.perf_counter()
            with torch.no_grad():
                frames.append(to_uint8_frames(d.decode_normalized(chunk.latents.detach())))
            dec_s.append(time.perf_counter() - t0)
        yield chunk, frames, clean - last, dec_s, clean_at, clean
        last = time.perf_counter()


class Background:
    """Run an iterator in a worker thread (e.g. the stream on the GPU) while the caller consumes its items
    (e.g. paces previews). `stop()` ends the worker after its current item; worker errors re-raise here.

        with Background(lambda: decode_stream(stream, dec)) as items:
            for step in items: ...
    """

    _DONE = object()

    def __init__(self, make_iter, max_ahead: int = 4, grad: bool = False):
        self._queue: "queue.Queue" = queue.Queue(maxsize=max_ahead)
        self._stop = threading.Event()
        self._ready = 0  # items produced and not yet consumed (the end marker not counted)
        self._lock = threading.Lock()
        self._error: BaseException | None = None

        def work():
            try:
                with torch.inference_mode(not grad):
                    for item in make_iter():
                        while not self._stop.is_set():
                            try:
                                with self._lock:
                                    self._queue.put(item, timeout=0.1)
                                    self._ready += 1
                                break
                            except queue.Full:
                                continue
                        if self._stop.is_set():
                            return
            except BaseException as e:  # delivered to the consumer
                self._error = e
            finally:
                self._put_done()

        self._thread = threading.Thread(target=work, name="sf-stream", daemon=True)
        self._thread.start()

    def _put_done(self):
        while True:
            try:
                self._queue.put(self._DONE, timeout=0.1)
                return
            except queue.Full:
                if self._stop.is_set():
                    try:
                        self._queue.get_nowait()
                    except queue.Empty:
                        pass

    def pending(self) -> int:
        """Items produced and not yet consumed."""
        return self._ready

    def __iter__(self):
        while True:
            item = self._queue.get()
            if item is self._DONE:
                if self._error is not None:
                    raise self._error
                return
            with self._lock:
                self._ready -= 1
            yield item

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
