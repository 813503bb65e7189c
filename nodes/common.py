"""Shared input definitions and checks of the pack's nodes (ComfyUI V3 API)."""

from __future__ import annotations

from comfy_api.latest import io

from ..sf_core.errors import SelfForcingError
from ..sf_core.latents import latent_frames_for, latent_size_for
from ..sf_core.options import SAMPLING, STREAMING, stream_settings

CATEGORY = "Self Forcing"
Timeline = io.Custom("SF_PROMPT_TIMELINE")


def size_inputs():
    return [
        io.Int.Input("width", default=832, min=16, max=4096, step=16, tooltip="Video width in pixels (multiple of 16)."),
        io.Int.Input("height", default=480, min=16, max=4096, step=16, tooltip="Video height in pixels (multiple of 16)."),
    ]


def sampling_inputs():
    """The node inputs of the sampling options declared in `sf_core.options.SAMPLING`."""
    return [_node_input(o) for o in SAMPLING]


def stream_inputs():
    """Video-to-video and live-steering inputs of the stream sampler (optional; `sf_core.options.STREAMING`)."""
    return [_node_input(o) for o in STREAMING]


def _node_input(o):
    extra = {"optional": True} if o.optional else {}
    if o.choices:
        return io.Combo.Input(o.name, options=list(o.choices), default=o.default, tooltip=o.help, **extra)
    if o.type is str:
        return io.String.Input(o.name, default=o.default, tooltip=o.help, **extra)
    limits = {k: getattr(o, k) for k in ("min", "max", "step") if getattr(o, k) is not None}
    return (io.Int if o.type is int else io.Float).Input(o.name, default=o.default, tooltip=o.help, **limits, **extra)


def check_video_inputs(width=None, height=None, length=None, **settings) -> bool | str:
    """validate_inputs body shared by nodes: True, or the message that says what to change."""
    try:
        if width is not None and height is not None:
            latent_size_for(height, width)
        if length is not None:
            latent_frames_for(length)
        if all(settings.get(o.name) is not None for o in SAMPLING):
            stream_settings(settings)
    except (SelfForcingError, ValueError) as e:
        return str(e)
    return True
