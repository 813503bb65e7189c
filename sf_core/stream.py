"""The chunk loop: autoregressive few-step generation with a KV cache (Self Forcing inference).

One implementation serves the ComfyUI sampler, the CLI, the benchmark and the training rollout:

    for each chunk:   x = fresh noise
                      for each step i:  x0 = x - sigma_i * G(x, t_i | cache)
                                        x  = add_noise(x0, fresh eps, sigma_{i+1})   (not after the last)
                      clean pass:       G(x0, t=0) writes the chunk's clean K/V   (skipped after the last)
                      yield x0

Video-to-video (`video=`): each chunk's input latents are noised to the strength's first step with the chunk's
reference noise and denoised by the remaining steps under the prompt; the clean pass then writes the generated
chunk, or the input chunk (`context="input"`), into the cache. Prompt changes come from the timeline and, while
the stream runs, from a `PromptInbox` (sf_core.steering); every applied change is recorded in `switches`.

Training uses the same loop through `rollout(exit_step)`: steps before the exit step run without grad,
the exit step runs with grad and ends the chunk, and the clean pass writes the cache without grad, so no
gradient crosses the cache.

What the clean pass writes is the generated chunk (Self Forcing). A `context` source can put other frames
there instead: ground-truth latents (Teacher Forcing), ground truth noised to a level per chunk (Diffusion
Forcing); see `sf_core.train.context`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from . import noise
from .cache import SINK_POSITIONS, KVCache
from .config import WanConfig
from .latents import TIME_STRIDE
from .errors import SelfForcingError
from .schedule import SELF_FORCING_STEPS, FlowSchedule, add_noise, restyle_steps
from .sources import LatentSource, LatentVideo
from .steering import BLEND_MODES, PromptInbox, Switch, blend_text
from .wan.forward import PromptKV, WanBackbone

SWITCH_MODES = ("recache", "cut")
CONTEXT_SOURCES = ("generated", "input")

# context(start, generated [B, C, n, h, w]) -> (latents [B, C, n, h, w], timesteps [B, n]) for the clean pass
ContextSource = Callable[[int, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


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
    blend_chunks: int = 0  # a prompt change moves over this many chunks (0 or 1: at once)
    blend: str = "linear"  # how the text embeddings are mixed meanwhile: linear or slerp
    strength: float = 1.0  # video-to-video: how much of the input is renoised (0 keeps it, 1 ignores it)
    start_step: int | None = None  # video-to-video: begin at this step of `steps` instead (overrides strength)
    context: str = "generated"  # video-to-video: what the cache holds, the generated or the input frames

    def __post_init__(self):
        object.__setattr__(self, "steps", tuple(float(s) for s in self.steps))
        if self.blend_chunks < 0:
            raise SelfForcingError(f"blend chunks must be >= 0, got {self.blend_chunks}")
        if self.blend not in BLEND_MODES:
            raise SelfForcingError(f"blend must be one of {BLEND_MODES}, got {self.blend!r}")
        if self.context not in CONTEXT_SOURCES:
            raise SelfForcingError(f"context must be one of {CONTEXT_SOURCES}, got {self.context!r}")
        try:
            restyle_steps(self.steps, self.strength, self.start_step)
        except ValueError as e:
            raise SelfForcingError(f"{e}; strength 0..1 (0 keeps the input video, 1 ignores it)") from None
        if self.frames_per_chunk < 1:
            raise SelfForcingError(f"frames per chunk must be at least 1, got {self.frames_per_chunk}")
        if not self.steps:
            raise SelfForcingError("the denoising step list is empty; use e.g. 1000, 750, 500, 250")
        if any(b >= a for a, b in zip(self.steps, self.steps[1:])):
            raise SelfForcingError(f"denoising steps must decrease, got {list(self.steps)}")
        if not all(0 < s <= 1000 for s in self.steps):
            raise SelfForcingError(f"denoising steps are timesteps in (0, 1000] (1000 = pure noise), got "
                                   f"{list(self.steps)}; e.g. 1000, 750, 500, 250")
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

    # ---- the plan: what a stream of these settings holds -------------------------------------
    def cache_frames(self, num_frames: int | None, prefix_frames: int = 0) -> int:
        """Latent-frame slots of the KV cache: the window, or the whole video (clean prefix included)."""
        if self.window is not None:
            return self.window
        if num_frames is None:
            raise SelfForcingError("an unbounded stream needs a window (rolling cache); set e.g. window 12, sink 3")
        return prefix_frames + num_frames

    def cache_bytes(self, config: WanConfig, latent_height: int, latent_width: int, num_frames: int | None, *,
                    batch: int = 1, dtype: torch.dtype = torch.bfloat16, prefix_frames: int = 0) -> int:
        """Memory the KV cache of such a stream takes, before it is built (nodes reserve it, the CLI reports it)."""
        adjacent = self.window is not None and self.sink > 0 and self.sink_positions == "adjacent"
        return KVCache.estimate_bytes(config, batch, latent_height, latent_width, self.cache_frames(num_frames, prefix_frames),
                                      dtype, sink_copy=self.sink if adjacent else 0)


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
    """Generated chunk that holds the video frame shown at `seconds` (frame 0 = latent 0; TIME_STRIDE frames/latent)."""
    return chunk_at_frame(round(seconds * fps), frames_per_chunk)


def chunk_at_frame(frame: int, frames_per_chunk: int = 3) -> int:
    """Generated chunk that holds video frame `frame` (frame 0 is latent frame 0, then TIME_STRIDE frames per latent)."""
    latent = 0 if frame <= 0 else (frame - 1) // TIME_STRIDE + 1
    return latent // frames_per_chunk


@dataclass
class Chunk:
    """A clean chunk: latents [B, 16, n, h, w] (normalised) of absolute frames [start, start + n)."""

    index: int  # generated chunk number; -1 for the clean prefix
    start: int
    latents: torch.Tensor
    prompt: int = 0  # timeline segment in effect
    last: bool = False
    label: str = ""  # the prompt in effect (the target of the latest change)
    switch: Switch | None = None  # the prompt change applied right before this chunk

    @property
    def is_prefix(self) -> bool:
        return self.index < 0


class Stream:
    """Autoregressive chunk-by-chunk generation.

    backbone: a WanBackbone. prompts: text embeddings [B, Lt, text_dim] or a PromptTimeline.
    latent_height/width: latent size (pixels / 8). num_frames: latent frames to generate (None: unbounded,
    needs a window). generator: torch.Generator or int seed (all noise comes from it), or one generator per
    sample (sample b's noise comes from generator b alone, whatever the batch it is drawn in). prefix: clean latent
    frames [B, 16, P, h, w] (normalised) that enter the cache first (image-to-video, continuation).
    video: the input of video-to-video, a LatentSource (sf_core.sources) or normalised latents [B, 16, T, h, w];
    the stream ends where the input ends. inbox: a PromptInbox for prompt changes while the stream runs.
    context_source: what the clean pass writes into the cache for each generated chunk (default: the chunk
    itself at t = 0; Teacher / Diffusion Forcing give ground truth, see sf_core.train.context).
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
        generator: torch.Generator | int | Sequence[torch.Generator] = 0,
        prefix: torch.Tensor | None = None,
        video: LatentSource | torch.Tensor | None = None,
        inbox: PromptInbox | None = None,
        context_source: ContextSource | None = None,
    ):
        cfg = backbone.config
        self.context_source = context_source
        self.backbone, self.settings = backbone, settings
        self.timeline = prompts if isinstance(prompts, PromptTimeline) else PromptTimeline.single(prompts)
        self.batch = batch
        self.h, self.w = latent_height, latent_width
        self.tokens_per_frame = cfg.tokens_per_frame(latent_height, latent_width)
        if num_frames is not None and num_frames < 1:
            raise SelfForcingError(f"need at least one latent frame to generate, got {num_frames}")
        self.num_frames = num_frames
        self.prefix = self._check_prefix(prefix, cfg)
        self.prefix_frames = 0 if self.prefix is None else self.prefix.shape[2]
        if isinstance(generator, int):
            generator = torch.Generator(device="cpu").manual_seed(generator)
        if noise.per_sample(generator) and len(generator) != batch:
            raise SelfForcingError(f"{len(generator)} per-sample generators for a batch of {batch}; give one per sample")
        # Reference noise comes from `generator`, frame by frame, so a frame's starting noise does not depend on
        # the step list or the chunking; the per-step noise has a generator of its own, seeded from it.
        self.generator = generator
        self.step_generator = noise.split(generator)
        schedule = FlowSchedule(settings.shift)
        self.timesteps = schedule.warp(settings.steps)
        self.sigmas = [schedule.sigma_of(t) for t in self.timesteps]
        self.video = self._check_video(video)
        restyle = restyle_steps(settings.steps, settings.strength, settings.start_step)
        self.input_timesteps = schedule.warp(restyle)
        self.input_sigmas = [schedule.sigma_of(t) for t in self.input_timesteps]
        self.inbox = inbox
        self.switches: list[Switch] = []
        self.input_ended = False
        for seg in self.timeline.segments:
            if seg.text.shape[0] not in (1, batch):
                raise SelfForcingError(f"prompt batch {seg.text.shape[0]} does not match the video batch {batch}")
        self.cache = KVCache(
            cfg, batch, latent_height, latent_width, settings.cache_frames(num_frames, self.prefix_frames),
            sink=settings.sink, rolling=settings.window is not None, sink_positions=settings.sink_positions,
            dtype=backbone.dtype, device=backbone.device,
        )

    def _check_video(self, video):
        if video is None:
            return None
        if self.prefix is not None:
            raise SelfForcingError("a start image (prefix) and an input video cannot be combined; give one of them")
        if isinstance(video, torch.Tensor):
            video = LatentVideo(video)
        if isinstance(video, LatentVideo):
            self._check_input_latents(video.latents)
        return video

    def _check_input_latents(self, z: torch.Tensor) -> None:
        want = (self.batch, self.backbone.config.in_dim, self.h, self.w)
        got = (z.shape[0], z.shape[1], z.shape[3], z.shape[4]) if z.ndim == 5 else tuple(z.shape)
        if got != want:
            raise SelfForcingError(
                f"the input video is {got[3] * 8}x{got[2] * 8} pixels (latent {tuple(z.shape)}) but this stream makes "
                f"{self.w * 8}x{self.h * 8} (latent [{want[0]}, {want[1]}, T, {want[2]}, {want[3]}]); resize the input "
                "video or set the width and height to its size"
                if z.ndim == 5 and z.shape[1] == want[1] else
                f"input video latents must be [{want[0]}, {want[1]}, T, {want[2]}, {want[3]}], got {tuple(z.shape)}"
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
        self._train = train
        seg = self.timeline.segments[0]
        self._segment, self._label, self._text = 0, seg.label, seg.text
        self._blend: tuple | None = None  # (from, to, steps done, steps, label, source, message) while moving
        prompt = self._encode(self._text)
        if self.prefix is not None:
            self._prefill(prompt)
            yield Chunk(-1, 0, self.prefix, 0, last=False, label=self._label)
        start = self.prefix_frames
        try:
            for index in itertools.count():
                if self.num_chunks is not None and index >= self.num_chunks:
                    return
                switch = self._prompt_at(index)
                if switch is not None:
                    prompt = self._encode(self._text)
                    self._switch(prompt, start, switch)
                count = n if self.num_frames is None else min(n, self.prefix_frames + self.num_frames - start)
                x_in = None
                if self.video is not None:
                    x_in = self._read_input(count)
                    if x_in.shape[2] == 0:
                        self.input_ended = True
                        return
                    if x_in.shape[2] < count:
                        self.input_ended, count = True, x_in.shape[2]
                last = (self.num_chunks is not None and index == self.num_chunks - 1) or self.input_ended
                x0 = self._denoise(start, count, prompt, exit_step, train, x_in)
                if not last:
                    clean = x_in if x_in is not None and self.settings.context == "input" else x0.detach()
                    self._write_clean(start, clean, prompt)
                yield Chunk(index, start, x0, self._segment, last, self._label, switch)
                start += count
        finally:
            if self.inbox is not None:
                self.inbox.close()

    # ---- prompts ----------------------------------------------------------------------------
    def _prompt_at(self, index: int) -> Switch | None:
        """The prompt change to apply before chunk `index` (timeline, then the inbox, then a blend in progress)."""
        wanted = self.timeline.index_at(index)
        if wanted != self._segment:
            self._segment = wanted
            seg = self.timeline.segments[wanted]
            self._begin(seg.text, seg.label, "timeline", None)
        if self.inbox is not None:
            message = self.inbox.take(index)
            if message is not None:
                self._begin(self.inbox.embeddings(message), message.label, "live", message)
        if self._blend is None:
            return None
        src, dst, done, steps, label, source, message = self._blend
        done += 1
        self._text = blend_text(src, dst, done / steps, self.settings.blend) if done < steps else dst
        self._blend = None if done >= steps else (src, dst, done, steps, label, source, message)
        switch = Switch(index, label, dst, source, done, steps, None if message is None else message.id,
                        None if message is None else message.posted_during)
        if message is not None and done == 1:
            self.inbox.applied[message.id] = index
        self.switches.append(switch)
        return switch

    def _begin(self, text: torch.Tensor, label: str, source: str, message) -> None:
        """Start moving from the prompt in effect to `text` (at once, or over blend_chunks chunks)."""
        if text.ndim != 3 or text.shape[0] not in (1, self.batch):
            raise SelfForcingError(f"a prompt must be embeddings [1 or {self.batch}, tokens, dim], got {tuple(text.shape)}")
        self._label = label
        self._blend = (self._text, text, 0, max(1, self.settings.blend_chunks), label, source, message)

    def replay_timeline(self) -> PromptTimeline:
        """The prompt changes this run applied, as a timeline: a new stream with it (same seed and settings, no
        inbox) makes the same video."""
        segments = {0: self.timeline.segments[0]}
        for s in self.switches:
            if s.begins:
                segments[s.chunk] = PromptSegment(s.chunk, s.text, s.label)
        return PromptTimeline(list(segments.values()))

    def _encode(self, text: torch.Tensor) -> PromptKV:
        if text.shape[0] != self.batch:
            text = text.expand(self.batch, -1, -1)
        with torch.set_grad_enabled(self._train):
            return self.backbone.encode_text(text)

    def _read_input(self, count: int) -> torch.Tensor:
        z = self.video.read(count)
        if z.ndim == 5 and z.shape[2]:
            self._check_input_latents(z)
            return z.to(self.backbone.device, torch.float32)
        return torch.zeros(self.batch, self.backbone.config.in_dim, 0, self.h, self.w)

    def _prompt(self, index: int, grad: bool = False) -> PromptKV:
        """Prompt K/V of timeline segment `index`."""
        text = self.timeline.segments[index].text
        if text.shape[0] != self.batch:
            text = text.expand(self.batch, -1, -1)
        with torch.set_grad_enabled(grad):
            return self.backbone.encode_text(text)

    def _noise(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A chunk's reference noise [B, C, n, h, w] and its per-step noise [steps - 1, B, C, n, h, w], drawn in
        one go and moved to the device with one asynchronous copy (no sync in the loop)."""
        B, C = self.batch, self.backbone.config.in_dim
        ref = noise.randn((B, count, C, self.h, self.w), self.generator).transpose(1, 2).contiguous()
        draws = max(len(self.timesteps), len(self.input_timesteps)) - 1
        steps = noise.randn((draws, B, C, count, self.h, self.w), self.step_generator, dim=1)
        device = self.backbone.device
        if ref.device != device:
            if device.type == "cuda":
                ref, steps = ref.pin_memory(), steps.pin_memory()
            ref, steps = ref.to(device, non_blocking=True), steps.to(device, non_blocking=True)
        return ref, steps

    def _denoise(self, start: int, count: int, prompt: PromptKV, exit_step: int | None, grad: bool,
                 x_in: torch.Tensor | None = None) -> torch.Tensor:
        """One chunk's few-step sampling. x_in: input latents [B, C, n, h, w] (video-to-video): noised to the
        strength's first step with the reference noise, then denoised by the remaining steps."""
        bb, frames = self.backbone, range(start, start + count)
        timesteps, sigmas = (self.timesteps, self.sigmas) if x_in is None else (self.input_timesteps, self.input_sigmas)
        last_step = len(timesteps) - 1 if exit_step is None else exit_step
        if exit_step is not None and exit_step >= len(timesteps):
            raise SelfForcingError(f"exit step {exit_step} is outside the {len(timesteps)} denoising steps")
        x, step_noise = self._noise(count)
        if x_in is not None:
            if not timesteps:  # strength 0: the input itself
                return x_in
            x = add_noise(x_in, x, sigmas[0])
        for i in range(last_step + 1):
            t = torch.full((self.batch, count), timesteps[i], device=bb.device)
            if grad and i == last_step:
                with torch.enable_grad():
                    x0 = x - sigmas[i] * bb(x, t, prompt, frames, self.cache.read_plan(start, count))
            else:
                with torch.no_grad():
                    x0 = x - sigmas[i] * bb(x, t, prompt, frames, self.cache.write_plan(start, count))
            if i < last_step:
                x = add_noise(x0, step_noise[i], sigmas[i + 1])
        return x0

    @torch.no_grad()
    def _write_clean(self, start: int, x0: torch.Tensor, prompt: PromptKV, own: bool = True) -> None:
        """The clean-context forward: the chunk's K/V at t = 0 enter the cache for later chunks (or, with a
        context source, the frames and timesteps it gives for them; `own` False for prefix frames)."""
        count = x0.shape[2]
        if own and self.context_source is not None:
            x0, t = self.context_source(start, x0)
            t = t.to(self.backbone.device, torch.float32)
        else:
            t = torch.zeros(self.batch, count, device=self.backbone.device)
        self.backbone(x0, t, prompt, range(start, start + count), self.cache.write_plan(start, count))
        self.cache.store_latents(start, x0)

    @torch.no_grad()
    def _prefill(self, prompt: PromptKV) -> None:
        n, p = self.settings.frames_per_chunk, self.prefix_frames
        first = p % n or n  # e.g. a single image frame, then chunk-sized blocks
        start = 0
        for size in [first] + [n] * ((p - first) // n):
            self._write_clean(start, self.prefix[:, :, start : start + size], prompt, own=False)
            start += size

    @torch.no_grad()
    def _switch(self, prompt: PromptKV, start: int, switch: Switch | None = None) -> None:
        """New prompt at a chunk boundary: re-encode the cached frames under it, or cut (a blended change cuts at
        its first step only)."""
        if self.settings.switch == "cut":
            if switch is None or switch.begins:
                self.cache.cut(start)
            return
        plan, latents, frames = self.cache.recache_plan()
        if frames:
            t = torch.zeros(self.batch, len(frames), device=self.backbone.device)
            self.backbone(latents, t, prompt, frames, plan)

    def close(self) -> None:
        """Free the cache now (a cancelled stream); later prompt posts are refused."""
        self.cache = None
        if self.inbox is not None:
            self.inbox.close()
