"""Metrics on generated videos, built on the detector and the caption grammar.

For a video and the caption it was asked for (its first object is the subject):
- colour: fraction of frames whose dominant detected colour is the caption's colour;
- shape: fraction of frames where the caption's colour is on screen with the caption's shape;
- motion: whether the subject's track (centre, size) classifies as the caption's motion (a subject on screen in
  fewer than half the frames has no track: motion 0, whatever the caption's motion, "stays still" included);
- consistency: fraction of consecutive frame pairs that keep the identity of what is on screen (same dominant colour)
  without a jump of its centre larger than `JUMP` pixels;
- on_screen: fraction of frames where the caption's colour is detected.
Drift compares these over the first and the last window of a long stream.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .detect import Detection, detect
from .world import COLOUR_NAMES, SHAPES, SIZE, parse_caption

JUMP = 8.0  # pixels between consecutive frames; the world's fastest motion moves ~3.5 (orbit)
MOVE = 0.4  # pixels per frame of mean velocity that count as a straight motion (the world's is 1.0)


def wrap(d: torch.Tensor) -> torch.Tensor:
    return torch.remainder(d + SIZE / 2, SIZE) - SIZE / 2


def classify_motion(centre: torch.Tensor, size: torch.Tensor, seen: torch.Tensor | None = None) -> str:
    """A track -> one of world.MOTIONS. centre [T, 2] (x, y) on the torus, size [T], seen [T] bool (frames where
    the object was detected; the others are skipped)."""
    if seen is None:
        seen = torch.ones(centre.shape[0], dtype=torch.bool)
    idx = torch.nonzero(seen).flatten()
    if idx.numel() < 4:
        return "still"
    c, s, tt = centre[idx], size[idx], idx.float()
    step = wrap(c[1:] - c[:-1]) / (tt[1:] - tt[:-1]).unsqueeze(-1)  # [N-1, 2] pixels per frame
    v = step.mean(0)
    if v.abs().max() > MOVE:
        if v[0].abs() >= v[1].abs():
            return "right" if v[0] > 0 else "left"
        return "down" if v[1] > 0 else "up"
    path = torch.cat([c[:1] * 0, torch.cumsum(step * (tt[1:] - tt[:-1]).unsqueeze(-1), 0)])  # unwrapped track
    sx, sy = path[:, 0].std(), path[:, 1].std()
    if sx > 2.5 and sy > 2.5:
        return "orbit"
    if sy > 1.5 and sy > 2 * sx:
        return "bounce"
    n = max(1, len(s) // 4)
    change = s[-n:].mean() - s[:n].mean()
    if change > 0.12 * s[:n].mean():
        return "grow"
    if change < -0.12 * s[:n].mean():
        return "shrink"
    return "still"


@dataclass
class Scores:
    colour: float
    shape: float
    motion: float
    consistency: float
    on_screen: float

    def as_dict(self) -> dict:
        return asdict(self)


def subject(text: str) -> tuple[int, int, str]:
    """(colour index, shape index, motion) of the caption's first object."""
    objects, _, _ = parse_caption(text)
    colour, shape, motion = objects[0]
    return COLOUR_NAMES.index(colour), SHAPES.index(shape), motion


def score(det: Detection, text: str) -> Scores:
    """Scores of one detected video against its caption (the subject = the caption's first object)."""
    c, s, motion = subject(text)
    seen = det.present[:, c]
    dom = det.dominant
    colour = (dom == c).float().mean()
    shape = (seen & (det.shape[:, c] == s)).float().mean()
    tracked = seen.float().mean() >= 0.5
    got = classify_motion(det.centre[:, c], det.size[:, c], seen) if tracked else None
    # identity kept: the same dominant colour as the frame before, its centre moved less than JUMP. (Shape is left
    # out: the toy autoencoder blurs shapes, so frame-to-frame shape calls would measure the decoder, not the model.)
    d = dom.clamp_min(0)
    centre = det.centre[torch.arange(len(d)), d]
    jump = wrap(centre[1:] - centre[:-1]).norm(dim=-1)
    keep = (dom[1:] == dom[:-1]) & (dom[1:] >= 0) & (jump < JUMP)
    consistency = keep.float().mean() if keep.numel() else torch.tensor(1.0)
    return Scores(float(colour), float(shape), float(got == motion), float(consistency), float(seen.float().mean()))


def score_video(video: torch.Tensor, text: str) -> Scores:
    """video: one video as `detect` accepts it."""
    return score(detect(video), text)


def mean_scores(scores: list[Scores]) -> dict:
    keys = Scores.__dataclass_fields__
    return {k: sum(getattr(s, k) for s in scores) / max(1, len(scores)) for k in keys}


def windows(det: Detection, frames: int) -> list[Detection]:
    """Split a long detection into consecutive windows of `frames` frames (the last partial one dropped)."""
    T = det.present.shape[0]
    out = []
    for a in range(0, T - frames + 1, frames):
        out.append(Detection(**{k: getattr(det, k)[a : a + frames] for k in Detection.__dataclass_fields__}))
    return out


def drift(det: Detection, text: str, frames: int) -> dict:
    """Scores of the first and the last window of `frames` frames, and last minus first."""
    parts = windows(det, frames)
    first, last = score(parts[0], text).as_dict(), score(parts[-1], text).as_dict()
    return {"first": first, "last": last, "change": {k: last[k] - first[k] for k in first}}
