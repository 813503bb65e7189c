"""Prompt timelines as text: one prompt per line, each starting at a time or a chunk.

    0s: a red fox trots through fresh snow, low morning sun
    5s: the fox stops and looks straight into the camera
    #12: it leaps into a snow bank          (chunk index)

A single line without a tag is one prompt for the whole video. Times map to the chunk holding that
video frame (16 fps, TIME_STRIDE = 4 video frames per latent frame, `frames_per_chunk` latent frames per chunk).

The keyframe schedules of ComfyUI prompt-schedule nodes (FizzNodes' Batch Prompt Schedule and its kin) are
read too, keyed by video frame, with or without the braces:

    "0": "a red fox trots through fresh snow",
    "48": "the fox stops and looks straight into the camera"

Parsing (`parse_entries`) needs no sampler settings; `resolve` maps entries to chunks once they are known and
refuses what no model is needed to see: nothing at 0s, two prompts in one chunk, a prompt after the video's end.
Every rule lives here; the nodes, the queue-time checks and the CLI only call these functions.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .errors import SelfForcingError
from .latents import TIME_STRIDE
from .stream import chunk_at_frame, chunk_at_seconds

_TAG = re.compile(r"^\s*(?:(?P<sec>\d+(?:\.\d+)?)\s*s|#\s*(?P<chunk>\d+)|chunk\s+(?P<chunk2>\d+))\s*:\s*(?P<text>.*)$", re.I)


@dataclass(frozen=True)
class Entry:
    prompt: str
    seconds: float | None = None  # start time, or
    chunk: int | None = None  # start chunk, or
    frame: int | None = None  # start video frame (keyframe schedules)

    def start_chunk(self, fps: float, frames_per_chunk: int) -> int:
        if self.chunk is not None:
            return self.chunk
        if self.frame is not None:
            return chunk_at_frame(self.frame, frames_per_chunk)
        return chunk_at_seconds(self.seconds, fps, frames_per_chunk)

    @property
    def start(self) -> str:
        """The start as written: '5s', '#4' or 'frame 48'."""
        if self.chunk is not None:
            return f"#{self.chunk}"
        return f"frame {self.frame}" if self.frame is not None else f"{self.seconds:g}s"


def check_prompt(text: str) -> str:
    """A single prompt, stripped; SelfForcingError when it is empty."""
    if not str(text).strip():
        raise SelfForcingError("the prompt is empty; write what the video should show")
    return str(text).strip()


_KEYFRAME_START = re.compile(r'^\s*(\{|"[^"]*"\s*:)')
_KEYFRAME_HELP = 'write one \'"frame": "prompt",\' per keyframe, e.g. "0": "a red fox in the snow", "48": "a wolf"'


def parse_keyframes(text: str) -> list[Entry]:
    """A prompt-schedule keyframe list ('"0": "...", "48": "..."', braces optional) -> entries by video frame."""
    body = text.strip()
    if body.startswith("{") and body.endswith("}"):
        body = body[1:-1]
    body = body.strip().rstrip(",")
    pairs: list = []
    try:
        json.loads("{" + body + "}", object_pairs_hook=lambda kv: pairs.extend(kv) or {})
    except json.JSONDecodeError as e:
        raise SelfForcingError(
            f"the keyframe schedule cannot be read at line {e.lineno} ({e.msg}): {_line(body, e.lineno)!r}; {_KEYFRAME_HELP}"
        ) from None
    entries, seen = [], set()
    for key, value in pairs:
        if not re.fullmatch(r"\s*\d+\s*", key):
            raise SelfForcingError(f"keyframe {key!r} is not a frame number; {_KEYFRAME_HELP}")
        frame = int(key)
        if frame in seen:
            raise SelfForcingError(f"keyframe {frame} appears twice in the schedule")
        seen.add(frame)
        if not isinstance(value, str) or not value.strip():
            raise SelfForcingError(f"keyframe {frame} has no prompt text; {_KEYFRAME_HELP}")
        entries.append(Entry(value.strip(), frame=frame))
    if not entries:
        raise SelfForcingError(f"the keyframe schedule is empty; {_KEYFRAME_HELP}")
    return entries


def _line(text: str, n: int) -> str:
    lines = text.splitlines() or [""]
    return lines[min(max(n, 1), len(lines)) - 1].strip()[:60]


def parse_entries(text: str) -> list[Entry]:
    """Timeline text (tagged lines or a keyframe schedule) -> entries, in the order written."""
    check_prompt(text)
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if _KEYFRAME_START.match(lines[0]):
        return parse_keyframes(text)
    if len(lines) == 1 and not _TAG.match(lines[0]):
        return [Entry(lines[0], seconds=0.0)]
    entries = []
    for n, line in enumerate(lines, 1):
        m = _TAG.match(line)
        if not m:
            raise SelfForcingError(
                f"timeline line {n} has no time: {line[:60]!r}; start each line with a time like '5s:' or a chunk "
                "like '#4:', or write a keyframe schedule like '\"0\": \"...\", \"48\": \"...\"'"
            )
        if not m["text"].strip():
            raise SelfForcingError(f"timeline line {n} has a time but no prompt")
        if m["sec"] is not None:
            entries.append(Entry(m["text"].strip(), seconds=float(m["sec"])))
        else:
            entries.append(Entry(m["text"].strip(), chunk=int(m["chunk"] or m["chunk2"])))
    return entries


def resolve(entries: list[Entry], fps: float = 16.0, frames_per_chunk: int = 3,
            num_chunks: int | None = None) -> list[int]:
    """Start chunk of each entry (same order). Raises if two share a chunk, nothing starts at 0, or (with
    `num_chunks`, the generated chunks of the video) a prompt starts after the last chunk."""
    starts = [e.start_chunk(fps, frames_per_chunk) for e in entries]
    seen: dict[int, int] = {}
    for i, c in enumerate(starts):
        if c in seen:
            raise SelfForcingError(
                f"timeline prompts {seen[c] + 1} and {i + 1} both start in chunk {c}; prompts switch at chunk "
                f"boundaries ({frames_per_chunk * TIME_STRIDE / fps:.2f}s apart): move one later"
            )
        seen[c] = i
    if 0 not in seen:
        raise SelfForcingError("the timeline must start at 0s (or #0, or keyframe \"0\")")
    if num_chunks is not None:
        for i, (e, c) in enumerate(zip(entries, starts)):
            if c >= num_chunks:
                last = num_chunks - 1
                raise SelfForcingError(
                    f"timeline prompt {i + 1} starts at {e.start} (chunk {c}) but the video's last chunk is {last}: "
                    f"it would never be shown; start it by {_chunk_seconds(last, fps, frames_per_chunk):g}s "
                    f"(#{last}) or make the video longer"
                )
    return starts


def parse_timeline(text: str, fps: float = 16.0, frames_per_chunk: int = 3,
                   num_chunks: int | None = None) -> list[tuple[int, str]]:
    """Text -> [(start_chunk, prompt), ...] sorted by start (see `resolve` for `num_chunks`)."""
    entries = parse_entries(text)
    return sorted(zip(resolve(entries, fps, frames_per_chunk, num_chunks), (e.prompt for e in entries)))


def _chunk_seconds(chunk: int, fps: float, frames_per_chunk: int) -> float:
    """The time of the first video frame of generated chunk `chunk` (inverse of chunk_at_seconds), 2 decimals."""
    latent = chunk * frames_per_chunk
    frame = 0 if latent == 0 else 4 * (latent - 1) + 1
    return round(frame / fps, 2)


def format_timeline(segments) -> str:
    """Timeline segments (anything with start_chunk and label, e.g. a PromptTimeline's) -> text with chunk tags,
    one line each, that `parse_timeline` reads back to the same chunks and prompts."""
    return "".join(f"#{s.start_chunk}: {' '.join(s.label.split())}\n" for s in segments)
