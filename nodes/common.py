"""Shared input definitions and checks of the pack's nodes (ComfyUI V3 API)."""

from __future__ import annotations

from comfy_api.latest import io

from ..sf_core.errors import SelfForcingError
from ..sf_core.latents import latent_size_for
from ..sf_core.options import SAMPLING, STREAMING, TRAINING, stream_settings, train_settings  # noqa: F401  (settings: for the nodes)

CATEGORY = "Self Forcing"
Timeline = io.Custom("SF_PROMPT_TIMELINE")


MIN_SIZE, MAX_SIZE = 16, 4096


def size_inputs():
    return [
        io.Int.Input("width", default=832, min=MIN_SIZE, max=MAX_SIZE, step=16, tooltip="Video width in pixels (multiple of 16)."),
        io.Int.Input("height", default=480, min=MIN_SIZE, max=MAX_SIZE, step=16, tooltip="Video height in pixels (multiple of 16)."),
    ]


def sampling_inputs():
    """The node inputs of the sampling options declared in `sf_core.options.SAMPLING`."""
    return [_node_input(o) for o in SAMPLING]


def stream_inputs():
    """Video-to-video and live-steering inputs of the stream sampler (optional; `sf_core.options.STREAMING`)."""
    return [_node_input(o) for o in STREAMING]


def training_inputs():
    """The DMD knobs of the Train LoRA node (`sf_core.options.TRAINING`)."""
    return [_node_input(o) for o in TRAINING]


def _node_input(o):
    extra = {"optional": True} if o.optional else {}
    if o.choices:
        return io.Combo.Input(o.name, options=list(o.choices), default=o.default, tooltip=o.help, **extra)
    if o.type is str:
        return io.String.Input(o.name, default=o.default, tooltip=o.help, **extra)
    limits = {k: getattr(o, k) for k in ("min", "max", "step") if getattr(o, k) is not None}
    return (io.Int if o.type is int else io.Float).Input(o.name, default=o.default, tooltip=o.help, **limits, **extra)


def check_size(width=None, height=None) -> bool | str:
    """validate_inputs body of the nodes with a size: True, or the message that says what to change. ComfyUI
    marks every input a validate_inputs takes, so it takes the size pair only (and, taking them, skips their
    min/max check: made here). The other rules are in queue_checks.py and at run time."""
    if width is None or height is None:
        return True
    for name, v in (("width", width), ("height", height)):
        if not MIN_SIZE <= v <= MAX_SIZE:
            return f"{name} {v} is outside {MIN_SIZE}..{MAX_SIZE} pixels"
    try:
        latent_size_for(height, width)
    except SelfForcingError as e:
        return str(e)
    return True
