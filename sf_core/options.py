"""The sampling and training options, declared once: the CLI flags (`add_arguments`) and the ComfyUI node inputs
(`nodes/common.sampling_inputs` / `stream_inputs` / `training_inputs`) are derived from `SAMPLING`, `STREAMING`
and `TRAINING`; `stream_settings` / `train_settings` turn values of either into `StreamSettings` /
`TrainSettings` (which validate them). `parse_steps` is the one step-list parser.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Mapping

from .cache import SINK_POSITIONS
from .errors import SelfForcingError
from .schedule import SELF_FORCING_STEPS
from .steering import BLEND_MODES
from .stream import CONTEXT_SOURCES, StreamSettings
from .train.trainer import TrainSettings


@dataclass(frozen=True)
class Option:
    """One sampling knob. `name` is the node input and the keyword; `flag` the command-line spelling."""

    name: str
    type: type  # int, float, str
    default: Any
    help: str
    flag: str = ""
    min: float | None = None
    max: float | None = None
    step: float | None = None
    choices: tuple[str, ...] = ()
    optional: bool = False  # an optional node input

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")


SAMPLING: tuple[Option, ...] = (
    Option("frames_per_chunk", int, 3, "Latent frames denoised together (3 = chunk-wise checkpoints, 1 = frame-wise).",
           min=1, max=21),
    Option("denoising_steps", str, ",".join(str(s) for s in SELF_FORCING_STEPS),
           "Few-step schedule of the checkpoint, before warping onto the shifted grid.", flag="--steps"),
    Option("shift", float, 5.0, "Flow-matching time shift.", min=0.1, max=20.0, step=0.1),
    Option("window", int, 0, "Rolling KV cache: latent frames attended to, including the sink and the current chunk. "
           "0 keeps the whole video (bounded length). 12 with sink 3 streams without limit.", min=0, max=1024),
    Option("sink", int, 0, "Attention-sink frames at the start that are never evicted from the window.", min=0, max=1024),
    Option("sink_positions", str, "adjacent", "adjacent: the sink is seen right before the window (window-relative "
           "RoPE, as LongLive); absolute: at its own, ever more distant, frames.", choices=SINK_POSITIONS),
)


#: Video-to-video and prompt blending: optional node inputs of the sampler, flags of `generate`.
STREAMING: tuple[Option, ...] = (
    Option("strength", float, 0.7, "Video-to-video: how much of the input video is redrawn. 0 keeps it, 1 ignores it "
           "(text-to-video); in between, each chunk of the input is noised to that level and denoised by the remaining "
           "steps under the prompt.", min=0.0, max=1.0, step=0.05, optional=True),
    Option("context", str, "generated", "Video-to-video: what later chunks attend to. generated: the restyled frames (a "
           "coherent new video); input: the input's frames (follows the input's motion closely).",
           choices=CONTEXT_SOURCES, optional=True),
    Option("blend_chunks", int, 0, "A prompt change (timeline or live) moves over this many chunks; 0 switches at once.",
           min=0, max=64, optional=True),
    Option("blend", str, "linear", "How the prompts are mixed while a change moves: linear or slerp of the text "
           "embeddings.", choices=BLEND_MODES, optional=True),
)


#: The DMD knobs of LoRA training: flags of `train`, inputs of the Train LoRA node (name -> TrainSettings field).
TRAINING: tuple[Option, ...] = (
    Option("iterations", int, 600, "Critic steps; the generator steps every critic_ratio of them.", min=1, max=100000),
    Option("rank", int, 32, "LoRA rank on every Linear of the blocks (alpha = rank).", min=1, max=1024),
    Option("learning_rate", float, 1e-4, "AdamW learning rate of the generator LoRA.", flag="--lr", min=1e-7,
           max=1.0, step=1e-6),
    Option("critic_learning_rate", float, 2e-5, "AdamW learning rate of the critic LoRA.", flag="--critic-lr",
           min=1e-7, max=1.0, step=1e-6),
    Option("critic_ratio", int, 5, "Critic steps per generator step.", min=1, max=100),
    Option("guidance", float, 3.0, "Teacher CFG: real = cond + g (cond - uncond); 3 is CFG 4.", min=0.0, max=20.0),
    Option("switch_share", float, 0.0, "Tuning for live prompt switches: the share of rollouts whose prompt switches "
           "(re-cache) to another of the prompts at a random chunk; the frames after it are judged under the new "
           "prompt. 0 = off; needs two prompts or more.", min=0.0, max=1.0, step=0.05),
)
_TRAIN_FIELDS = {"learning_rate": "lr", "critic_learning_rate": "critic_lr", "switch_share": "switch"}


def add_arguments(parser: argparse.ArgumentParser, group: tuple[Option, ...] = SAMPLING) -> None:
    """The flags of a group: SAMPLING (`--frames-per-chunk`, `--steps`, `--shift`, `--window`, `--sink`,
    `--sink-positions`) or STREAMING (`--strength`, `--context`, `--blend-chunks`, `--blend`)."""
    for o in group:
        kw: dict = {"dest": o.name, "default": o.default, "help": o.help.replace("%", "%%")}
        if o.choices:
            kw["choices"] = list(o.choices)
        else:
            kw["type"] = o.type
        parser.add_argument(o.cli_flag, **kw)


def parse_steps(text: str) -> tuple[float, ...]:
    """"1000, 750,500,250" -> (1000.0, 750.0, 500.0, 250.0), or an error that shows the expected form."""
    try:
        return tuple(float(s) for s in str(text).replace(" ", "").split(",") if s)
    except ValueError:
        raise SelfForcingError(
            f"denoising steps must be numbers separated by commas, like 1000,750,500,250; got {text!r}") from None


def train_settings(values: Mapping[str, Any] | argparse.Namespace, **more) -> TrainSettings:
    """Training option values (node inputs, or parsed flags) -> TrainSettings; `more`: its other fields."""
    v = vars(values) if isinstance(values, argparse.Namespace) else values
    return TrainSettings(**{_TRAIN_FIELDS.get(o.name, o.name): v.get(o.name, o.default) for o in TRAINING}, **more)


def stream_settings(values: Mapping[str, Any] | argparse.Namespace, switch: str = "recache", **more) -> StreamSettings:
    """Sampling option values (node inputs, or parsed flags) -> validated StreamSettings; window 0 = none.
    `more`: further StreamSettings fields (video-to-video, blending)."""
    v = vars(values) if isinstance(values, argparse.Namespace) else values
    get = {o.name: v.get(o.name, o.default) for o in SAMPLING}
    streaming = {o.name: v[o.name] for o in STREAMING if v.get(o.name) is not None}
    return StreamSettings(frames_per_chunk=get["frames_per_chunk"], steps=parse_steps(get["denoising_steps"]),
                          shift=get["shift"], window=get["window"] or None, sink=get["sink"],
                          sink_positions=get["sink_positions"], switch=switch, **{**streaming, **more})
