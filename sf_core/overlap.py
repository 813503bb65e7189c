"""Overlapped decode: each clean chunk is decoded while the next one is generated.

Three kinds of threads, joined by bounded queues (so nothing runs more than `ahead` chunks ahead):
- the generator runs the stream; on CUDA it records an event after each chunk (its DiT time is measured
  by waiting for that event only, not for the decoders);
- one worker per decoder (e.g. the Wan VAE for the saved video and TAEHV for previews, side by side)
  decodes the chunks in order - on CUDA on a CUDA stream of its own that first waits for the chunk's event;
- the caller's thread receives the steps in chunk order as soon as every decoder has finished the chunk,
  and does the slow host work (MP4 writer, PNGs, previews) off the generator's path.
The frames are those of an in-line decode (same decoders, same order). Breaking out of the loop stops the
threads; an error in any of them is raised in the caller.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Iterator

import torch

from .video import to_uint8_frames

_END = object()


class _Stop(Exception):
    pass


class _Pipe:
    """A bounded queue whose put/get give up when the run is stopped."""

    def __init__(self, stop: threading.Event, size: int):
        self.q: queue.Queue = queue.Queue(maxsize=size)
        self.stop = stop

    def put(self, item) -> None:
        while True:
            if self.stop.is_set():
                raise _Stop
            try:
                self.q.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    def get(self):
        while True:
            if self.stop.is_set():
                raise _Stop
            try:
                return self.q.get(timeout=0.05)
            except queue.Empty:
                continue


def overlapped(stream, decoders: list, timings, ahead: int = 2) -> Iterator[tuple]:
    """Run `stream` with each of `decoders` (streaming decoders) in worker threads.

    Yields, per chunk in order: (chunk, [frames per decoder: [n, H, W, 3] uint8 CPU], dit_s, [decode_s],
    clean_at, clean_perf) where clean_perf is time.perf_counter() when the chunk was clean.
    """
    device = stream.backbone.device
    cuda = device.type == "cuda"
    stop = threading.Event()
    errors: list[BaseException] = []
    inputs = [_Pipe(stop, ahead) for _ in decoders]
    outputs = [_Pipe(stop, ahead) for _ in decoders] if decoders else [_Pipe(stop, ahead)]

    def guarded(fn):
        def run():
            try:
                if cuda:
                    torch.cuda.set_device(device)  # a new thread starts on the default device
                with torch.inference_mode():
                    fn()
            except _Stop:
                pass
            except BaseException as e:  # delivered to the caller
                errors.append(e)
                stop.set()
        return run

    def generate():
        last = time.perf_counter()
        for chunk in stream:
            event = None
            if cuda:
                event = torch.cuda.Event()
                event.record()
                event.synchronize()  # this chunk's work only; the decoders' streams keep running
            now = time.perf_counter()
            item = (chunk, now - last, time.monotonic(), now, event)
            for pipe in inputs or outputs:
                pipe.put(item)
            last = time.perf_counter()
        for pipe in inputs or outputs:
            pipe.put(_END)

    def decode(decoder, src: _Pipe, dst: _Pipe):
        side = torch.cuda.Stream(device) if cuda else None
        while (item := src.get()) is not _END:
            chunk, event = item[0], item[4]
            t0 = time.perf_counter()
            latents = chunk.latents.detach()
            if side is not None:
                with torch.cuda.stream(side):
                    side.wait_event(event)
                    latents.record_stream(side)
                    frames = to_uint8_frames(decoder.decode_normalized(latents))  # .cpu() waits for `side` only
            else:
                frames = to_uint8_frames(decoder.decode_normalized(latents))
            dst.put((item, frames, time.perf_counter() - t0))
        dst.put(_END)

    threads = [threading.Thread(target=guarded(generate), name="sf-generate", daemon=True)]
    threads += [threading.Thread(target=guarded(lambda d=d, i=i, o=o: decode(d, i, o)), name=f"sf-decode-{k}",
                                 daemon=True) for k, (d, i, o) in enumerate(zip(decoders, inputs, outputs))]
    for th in threads:
        th.start()
    try:
        while True:
            try:
                got = [pipe.get() for pipe in outputs]
            except _Stop:
                break
            if got[0] is _END:
                break
            if not decoders:
                chunk, dit_s, clean_at, clean_perf, _ = got[0]
                yield chunk, [], dit_s, [], clean_at, clean_perf
                continue
            chunk, dit_s, clean_at, clean_perf, _ = got[0][0]
            yield chunk, [g[1] for g in got], dit_s, [g[2] for g in got], clean_at, clean_perf
    finally:
        stop.set()
        for th in threads:
            th.join()
    if errors:
        raise errors[0]
