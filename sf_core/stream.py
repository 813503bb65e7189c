"""The chunk loop: autoregressive few-step generation with a KV cache (Self Forcing inference).

One implementation serves the ComfyUI sampler, the CLI, the benchmark and the training rollout:

    for each chunk:   x = fresh noise
                      for each step i:  x0 = x - sigma_i * G(x, t_i | cache)
                                        x  = add_noise(x0, fresh eps, sigma_{i+1})   (not after the last)
                      clean pass:       G(x0, t=0) writes the chunk's clean K/V   (skipped after the last)
                      yield x0

Training uses the same loop through `rollout(exit_step)`: steps before the exit step run without grad,
the exit step runs with grad and ends the chunk, and the clean pass writes the cache without grad, so no
gradient crosses the cache.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .cache import SINK_POSITIONS, KVCache
from .errors import SelfForcingError
from .schedule import SELF_FORCING_STEPS, FlowSchedule, add_noise
from .wan.forward import PromptKV, WanBackbone

SWITCH_MODES = ("recache", "cut")


@dataclass(frozen=True)
class StreamSettings:
    """How a stream samples. window/sink in latent frames; window includes the sink and the current chunk."""

    frames_per_chunk: int = 3
    steps: tuple[float, ...] = SELF_FORCING_STEPS
    shift: float = 5.0
    window: int | None = None
    sink: int = 0
    switch: str = "recache"
    sink_positions: str = "adjacent"  # sink seen right before the window (LongLive), or at its own frames

    def __post_init__(self):
        object.__setattr__(self, "steps", tuple(float(s) for s in self.steps))
        if self.frames_per_chunk < 1:
            raise SelfForcingError(f"frames per chunk must be at least 1, got {self.frames_per_chunk}")
        if not self.steps:
            raise SelfForcingError("the denoising step list is empty; use e.g. 1000, 750, 500, 250")
        if any(b >= a for a, b in zip(self.steps, self.steps[1:])):
            raise SelfForcingError(f"denoising steps must decrease, got {list(self.steps)}")
        if self.sink < 0:
            raise SelfForcingError(f"sink must be >= 0, got {self.sink}")
        if self.sink_positions not in SINK_POSITIONS:
            raise SelfForcingError(f"sink positions must be one of {SINK_POSITIONS}, got {self.sink_positions!r}")
        if self.switch not in SWITCH_MODES:
            raise SelfForcingError(f"prompt switch mode must be one of {SWITCH_MODES}, got {self.switch!r}")
        if self.window is not None:
            if self.sink >= self.window:
                raise SelfForcingError(
                    f"sink ({self.sink}) must be smaller than the window ({self.window}); e.g. window 12, sink 3"
                )
            if self.window - self.sink < self.frames_per_chunk:
                raise SelfForcingError(
                    f"window {self.window} with sink {self.sink} leaves {self.window - self.sink} frames, less than "
                    f"one chunk of {self.frames_per_chunk}; use a window of at least {self.sink + self.frames_per_chunk}"
                )
        elif self.sink:
            raise SelfForcingError("a sink needs a window (rolling cache); set window too, e.g. window 12, sink 3")


@dataclass(frozen=True)
class PromptSegment:
    start_chunk: int
    text: torch.Tensor  # [B or 1, Lt, text_dim] text-encoder output
    label: str = ""


class PromptTimeline:
    """Prompts by generated-chunk index: segment i is used from its start_chunk until the next one starts."""

    def __init__(self, segments: Sequence[PromptSegment]):
        segs = sorted(segments, key=lambda s: s.start_chunk)
        if not segs or segs[0].start_chunk != 0:
            raise SelfForcingError("a prompt timeline needs a prompt that starts at chunk 0 (time 0s)")
        starts = [s.start_chunk for s in segs]
        if len(set(starts)) != len(starts):
            raise SelfForcingError(f"two prompts start at the same chunk: {starts}")
        self.segments = segs

    @classmethod
    def single(cls, text: torch.Tensor) -> "PromptTimeline":
        return cls([PromptSegment(0, text)])

    def index_at(self, chunk: int) -> int:
        idx = 0
        for i, s in enumerate(self.segments):
            if s.start_chunk <= chunk:
                idx = i
        return idx


def chunk_at_seconds(seconds: float, fps: float = 16.0, frames_per_chunk: int = 3) -> int:
    """Generated chunk that holds the video frame shown at `seconds` (frame 0 = latent 0; 4 frames/latent)."""
    frame = round(seconds * fps)
    latent = 0 if frame <= 0 else (frame - 1) // 4 + 1
    return latent // frames_per_chunk


@dataclass
class Chunk:
    """A clean chunk: latents [B, 16, n, h, w] (normalised) of absolute frames [start, start + n)."""

    index: int  # generated chunk number; -1 for the clean prefix
    start: int
    latents: torch.Tensor
    prompt: int = 0
    last: bool = False

    @property
    def is_prefix(self) -> bool:
        return self.index < 0


class Stream:
    """Autoregressive chunk-by-chunk generation.

    backbone: a WanBackbone. prompts: text embeddings [B, Lt, text_dim] or a PromptTimeline.
    latent_height/width: latent size (pixels / 8). num_frames: latent frames to generate (None: unbounded,
    needs a window). generator: torch.Generator or int seed (all noise comes from it). prefix: clean latent
    frames [B, 16, P, h, w] (normalised) that enter the cache first (image-to-video, continuation).
    """

    def __init__(
        self,
        backbone: WanBackbone,
        prompts: torch.Tensor | PromptTimeline,
        *,
        latent_height: int,
        latent_width: int,
        num_frames: int | None,
        batch: int = 1,
        settings: StreamSettings = StreamSettings(),
        generator: torch.Generator | int = 0,
        prefix: torch.Tensor | None = None,
    ):
        cfg = backbone.config
        self.backbone, self.settings = backbone, settings
        self.timeline = prompts if isinstance(prompts, PromptTimeline) else PromptTimeline.single(prompts)
        self.batch = batch
        self.h, self.w = latent_height, latent_width
        self.tokens_per_frame = cfg.tokens_per_frame(latent_height, latent_width)
        if num_frames is not None and num_frames < 1:
            raise SelfForcingError(f"need at least one latent frame to generate, got {num_frames}")
        if num_frames is None and settings.window is None:
            raise SelfForcingError("an unbounded stream needs a window (rolling cache); set e.g. window 12, sink 3")
        self.num_frames = num_frames
        self.prefix = self._check_prefix(prefix, cfg)
        self.prefix_frames = 0 if self.prefix is None else self.prefix.shape[2]
        if isinstance(generator, int):
            generator = torch.Generator(device="cpu").manual_seed(generator)
        # Reference noise comes from `generator`, frame by frame, so a frame's starting noise does not depend on
        # the step list or the chunking; the per-step noise has a generator of its own, seeded from it.
        self.generator = generator
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        self.step_generator = torch.Generator(device=generator.device).manual_seed(seed)
        schedule = FlowSchedule(settings.shift)
        self.timesteps = schedule.warp(settings.steps)
        self.sigmas = [schedule.sigma_of(t) for t in self.timesteps]
        for seg in self.timeline.segments:
            if seg.text.shape[0] not in (1, batch):
                raise SelfForcingError(f"prompt batch {seg.text.shape[0]} does not match the video batch {batch}")
        capacity = settings.window or (self.prefix_frames + num_frames)
        self.cache = KVCache(
            cfg, batch, latent_height, latent_width, capacity,
            sink=settings.sink, rolling=settings.window is not None, sink_positions=settings.sink_positions,
            dtype=backbone.dtype, device=backbone.device,
        )

    def _check_prefix(self, prefix, cfg):
        if prefix is None:
            return None
        want = (self.batch, cfg.in_dim, self.h, self.w)
        if prefix.ndim != 5 or (prefix.shape[0], prefix.shape[1], prefix.shape[3], prefix.shape[4]) != want:
            raise SelfForcingError(
                f"prefix latents must be [{want[0]}, {want[1]}, frames, {want[2]}, {want[3]}], got {tuple(prefix.shape)}"
            )
        return prefix.to(self.backbone.device, torch.float32)

    @property
    def num_chunks(self) -> int | None:
        n = self.settings.frames_per_chunk
        return None if self.num_frames is None else -(-self.num_frames // n)

    # ---- the loop ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Chunk]:
        return self.rollout()

    def rollout(self, exit_step: int | None = None, grad: bool = True) -> Iterator[Chunk]:
        """Yield chunks as soon as they are clean.

        exit_step: None for inference (all steps, no grad). For training, the denoising step at which every
        chunk exits: earlier steps run without grad, the exit step with grad (its x0 is the chunk output)
        unless grad is False (the critic's samples).
        """
        if exit_step is not None and not 0 <= exit_step < len(self.timesteps):
            raise SelfForcingError(f"exit step {exit_step} is outside the {len(self.timesteps)} denoising steps")
        n = self.settings.frames_per_chunk
        train = exit_step is not None and grad  # prompt K/V keep their graph so LoRAs on cross-attn k/v learn too
        prompt_index, prompt = 0, self._prompt(0, train)
        if self.prefix is not None:
            self._prefill(prompt)
            yield Chunk(-1, 0, self.prefix, prompt_index, last=False)
        start = self.prefix_frames
        for index in itertools.count():
            if self.num_chunks is not None and index >= self.num_chunks:
                return
            wanted = self.timeline.index_at(index)
            if wanted != prompt_index:
                prompt_index, prompt = wanted, self._prompt(wanted, train)
                self._switch(prompt, start)
            count = n if self.num_frames is None else min(n, self.prefix_frames + self.num_frames - start)
            last = self.num_chunks is not None and index == self.num_chunks - 1
            x0 = self._denoise(start, count, prompt, exit_step, train)
            if not last:
                self._write_clean(start, x0.detach(), prompt)
            yield Chunk(index, start, x0, prompt_index, last)
            start += count

    def _prompt(self, index: int, grad: bool = False) -> PromptKV:
        text = self.timeline.segments[index].text
        if text.shape[0] != self.batch:
            text = text.expand(self.batch, -1, -1)
        with torch.set_grad_enabled(grad):
            return self.backbone.encode_text(text)

    def _noise(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A chunk's reference noise [B, C, n, h, w] and its per-step noise [steps - 1, B, C, n, h, w], drawn in
        one go and moved to the device with one asynchronous copy (no sync in the loop)."""
        B, C, g = self.batch, self.backbone.config.in_dim, self.generator
        ref = torch.randn((B, count, C, self.h, self.w), generator=g, device=g.device).transpose(1, 2).contiguous()
        steps = torch.randn((len(self.timesteps) - 1, B, C, count, self.h, self.w), generator=self.step_generator,
                            device=g.device)
        device = self.backbone.device
        if ref.device != device:
            if device.type == "cuda":
                ref, steps = ref.pin_memory(), steps.pin_memory()
            ref, steps = ref.to(device, non_blocking=True), steps.to(device, non_blocking=True)
        return ref, steps

    def _denoise(self, start: int, count: int, prompt: PromptKV, exit_step: int | None, grad: bool) -> torch.Tensor:
        bb, frames = self.backbone, range(start, start + count)
        last_step = len(self.timesteps) - 1 if exit_step is None else exit_step
        x, step_noise = self._noise(count)
        for i in range(last_step + 1):
            t = torch.full((self.batch, count), self.timesteps[i], device=bb.device)
            if grad and i == last_step:
                with torch.enable_grad():
                    x0 = x - self.sigmas[i] * bb(x, t, prompt, frames, self.cache.read_plan(start, count))
            else:
                with torch.no_grad():
                    x0 = x - self.sigmas[i] * bb(x, t, prompt, frames, self.cache.write_plan(start, count))
            if i < last_step:
                x = add_noise(x0, step_noise[i], self.sigmas[i + 1])
        return x0

    @torch.no_grad()
    def _write_clean(self, start: int, x0: torch.Tensor, prompt: PromptKV) -> None:
        """The clean-context forward: the chunk's K/V at t = 0 enter the cache for later chunks."""
        count = x0.shape[2]
        t = torch.zeros(self.batch, count, device=self.backbone.device)
        self.backbone(x0, t, prompt, range(start, start + count), self.cache.write_plan(start, count))
        self.cache.store_latents(start, x0)

    @torch.no_grad()
    def _prefill(self, prompt: PromptKV) -> None:
        n, p = self.settings.frames_per_chunk, self.prefix_frames
        first = p % n or n  # e.g. a single image frame, then chunk-sized blocks
        start = 0
        for size in [first] + [n] * ((p - first) // n):
            self._write_clean(start, self.prefix[:, :, start : start + size], prompt)
            start += size

    @torch.no_grad()
    def _switch(self, prompt: PromptKV, start: int) -> None:
        """New prompt at a chunk boundary: re-encode the cached frames under it, or cut."""
        if self.settings.switch == "cut":
            self.cache.cut(start)
            return
        plan, latents, frames = self.cache.recache_plan()
        if frames:
            t = torch.zeros(self.batch, len(frames), device=self.backbone.device)
            self.backbone(latents, t, prompt, frames, plan)

    def close(self) -> None:
        """Free the cache now (a cancelled stream)."""
        self.cache = None
