"""Shared input definitions and checks of the pack's nodes (ComfyUI V3 API)."""

from __future__ import annotations

from comfy_api.latest import io

from ..sf_core.errors import SelfForcingError
from ..sf_core.latents import latent_frames_for, latent_size_for
from ..sf_core.cache import SINK_POSITIONS
from ..sf_core.steering import BLEND_MODES
from ..sf_core.stream import CONTEXT_SOURCES, StreamSettings

CATEGORY = "Self Forcing"
Timeline = io.Custom("SF_PROMPT_TIMELINE")


def size_inputs():
    return [
        io.Int.Input("width", default=832, min=16, max=4096, step=16, tooltip="Video width in pixels (multiple of 16)."),
        io.Int.Input("height", default=480, min=16, max=4096, step=16, tooltip="Video height in pixels (multiple of 16)."),
    ]


def sampling_inputs():
    return [
        io.Int.Input("frames_per_chunk", default=3, min=1, max=21,
                     tooltip="Latent frames denoised together (3 = chunk-wise checkpoints, 1 = frame-wise)."),
        io.String.Input("denoising_steps", default="1000,750,500,250",
                        tooltip="Few-step schedule of the checkpoint, before warping onto the shifted grid."),
        io.Float.Input("shift", default=5.0, min=0.1, max=20.0, step=0.1, tooltip="Flow-matching time shift."),
        io.Int.Input("window", default=0, min=0, max=1024,
                     tooltip="Rolling KV cache: latent frames attended to, including the sink and the current chunk. "
                             "0 keeps the whole video (bounded length). 12 with sink 3 streams without limit."),
        io.Int.Input("sink", default=0, min=0, max=1024,
                     tooltip="Attention-sink frames at the start that are never evicted from the window."),
        io.Combo.Input("sink_positions", options=list(SINK_POSITIONS), default="adjacent",
                       tooltip="adjacent: the sink is seen right before the window (window-relative RoPE, as LongLive); "
                               "absolute: at its own, ever more distant, frames."),
    ]


def stream_inputs():
    """Video-to-video and live-steering inputs of the stream sampler (all optional)."""
    return [
        io.Float.Input("strength", default=0.7, min=0.0, max=1.0, step=0.05, optional=True,
                       tooltip="Video-to-video: how much of the input video is redrawn. 0 keeps it, 1 ignores it "
                               "(text-to-video); in between, each chunk of the input is noised to that level and "
                               "denoised by the remaining steps under the prompt."),
        io.Combo.Input("context", options=list(CONTEXT_SOURCES), default="generated", optional=True,
                       tooltip="Video-to-video: what later chunks attend to. generated: the restyled frames (a "
                               "coherent new video); input: the input's frames (follows the input's motion closely)."),
        io.Int.Input("blend_chunks", default=0, min=0, max=64, optional=True,
                     tooltip="A prompt change (timeline or live) moves over this many chunks; 0 switches at once."),
        io.Combo.Input("blend", options=list(BLEND_MODES), default="linear", optional=True,
                       tooltip="How the prompts are mixed while a change moves: linear or slerp of the text embeddings."),
    ]


def parse_steps(text: str) -> tuple[float, ...]:
    try:
        steps = tuple(float(s) for s in str(text).replace(" ", "").split(",") if s)
    except ValueError:
        raise SelfForcingError(f"denoising steps must be numbers separated by commas, like 1000,750,500,250; got {text!r}")
    return steps


def stream_settings(frames_per_chunk, denoising_steps, shift, window, sink, sink_positions="adjacent",
                    switch="recache", **more) -> StreamSettings:
    """more: strength, context, blend_chunks, blend (see StreamSettings)."""
    return StreamSettings(frames_per_chunk=frames_per_chunk, steps=parse_steps(denoising_steps), shift=shift,
                          window=window or None, sink=sink, sink_positions=sink_positions, switch=switch, **more)


def check_video_inputs(width=None, height=None, length=None, **settings) -> bool | str:
    """validate_inputs body shared by nodes: True, or the message that says what to change."""
    try:
        if width is not None and height is not None:
            latent_size_for(height, width)
        if length is not None:
            latent_frames_for(length)
        keys = ("frames_per_chunk", "denoising_steps", "shift", "window", "sink")
        if all(k in settings and settings[k] is not None for k in keys):
            stream_settings(**{k: settings[k] for k in keys})
    except (SelfForcingError, ValueError) as e:
        return str(e)
    return True
