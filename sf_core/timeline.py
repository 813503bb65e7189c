"""Prompt timelines as text: one prompt per line, each starting at a time or a chunk.

    0s: a red fox trots through fresh snow, low morning sun
    5s: the fox stops and looks straight into the camera
    #12: it leaps into a snow bank          (chunk index)

A single line without a tag is one prompt for the whole video. Times map to the chunk holding that
video frame (16 fps, 4 video frames per latent frame, `frames_per_chunk` latent frames per chunk).
"""

from __future__ import annotations

import re

from .errors import SelfForcingError
from .stream import chunk_at_seconds

_TAG = re.compile(r"^\s*(?:(?P<sec>\d+(?:\.\d+)?)\s*s|#\s*(?P<chunk>\d+)|chunk\s+(?P<chunk2>\d+))\s*:\s*(?P<text>.*)$", re.I)


def parse_timeline(text: str, fps: float = 16.0, frames_per_chunk: int = 3) -> list[tuple[int, str]]:
    """Text -> [(start_chunk, prompt), ...] sorted by start; the first prompt starts at chunk 0."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        raise SelfForcingError("the prompt is empty; write what the video should show")
    if len(lines) == 1 and not _TAG.match(lines[0]):
        return [(0, lines[0])]
    out: dict[int, str] = {}
    for n, line in enumerate(lines, 1):
        m = _TAG.match(line)
        if not m:
            raise SelfForcingError(
                f"timeline line {n} has no time: {line[:60]!r}; start each line with a time like '5s:' or a chunk like '#4:'"
            )
        if not m["text"].strip():
            raise SelfForcingError(f"timeline line {n} has a time but no prompt")
        if m["sec"] is not None:
            chunk = chunk_at_seconds(float(m["sec"]), fps, frames_per_chunk)
        else:
            chunk = int(m["chunk"] or m["chunk2"])
        if chunk in out:
            raise SelfForcingError(
                f"timeline line {n} starts in chunk {chunk}, like an earlier line; prompts switch at chunk "
                f"boundaries ({frames_per_chunk * 4 / fps:.2f}s apart): move it later"
            )
        out[chunk] = m["text"].strip()
    if 0 not in out:
        raise SelfForcingError("the timeline must start at 0s (or #0)")
    return sorted(out.items())
