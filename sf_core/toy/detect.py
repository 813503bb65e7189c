"""A detector that reads the toy world from pixels: per frame, which colours are on screen, the shape,
centre and size of each.

    det = detect(video)                  # video [T, 3, H, W] or [3, T, H, W]... see `detect`
    det.present[t, c]                    # colour c (index into world.COLOUR_NAMES) is on screen at frame t
    det.shape[t, c], det.centre[t, c]    # its shape index and (x, y) centre in pixels

How: every pixel goes to the nearest colour of the world's palette (object colours and background
colours), object pixels only when within `tolerance` of their colour; a colour with at least
`min_area` pixels is an object. Its centre is the circular mean of its pixels (the screen is a torus),
and its shape is the world shape whose drawing, at that centre and with the same area, overlaps the
mask best (intersection over union). Nothing is learned.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass

import torch

from ..errors import SelfForcingError
from .world import BACKGROUNDS, COLOURS, SHAPES, SIZE, coverage, render, sample_scene

# area of each drawn shape for half extent s is AREA[shape] * s^2 (see world._coverage)
AREA = {"circle": math.pi, "square": 1.7**2, "triangle": 3 * math.sqrt(3) * 0.65**2}
MIN_AREA = 15
TOLERANCE = 0.3


@dataclass
class Detection:
    """present, area, shape: [T, C]; centre: [T, C, 2] (x, y); size: [T, C] (half extent from the area).
    C = number of world colours; entries of absent colours are meaningless."""

    present: torch.Tensor
    area: torch.Tensor
    shape: torch.Tensor
    centre: torch.Tensor
    size: torch.Tensor
    iou: torch.Tensor

    @property
    def dominant(self) -> torch.Tensor:
        """[T] the colour with most pixels per frame (-1 when nothing is on screen)."""
        area = torch.where(self.present, self.area, torch.zeros_like(self.area))
        return torch.where(self.present.any(1), area.argmax(1), torch.full_like(area[:, 0], -1, dtype=torch.long))


def _palette() -> tuple[torch.Tensor, int]:
    objects = torch.tensor(list(COLOURS.values()))
    backgrounds = torch.tensor([c for pair in BACKGROUNDS.values() for c in pair])
    return torch.cat([objects, backgrounds]), objects.shape[0]


def as_frames(video: torch.Tensor) -> torch.Tensor:
    """Accepts [3, T, H, W] in [-1, 1] (a world / decoder video of one sample) or [T, H, W, 3] uint8 (frames as
    written to MP4) -> [T, 3, H, W] in [0, 1]."""
    if video.ndim != 4:
        raise SelfForcingError(f"detect: expected one video [3, T, H, W] in [-1, 1] or [T, H, W, 3] uint8, got {tuple(video.shape)}")
    if video.dtype == torch.uint8:
        if video.shape[-1] != 3:
            raise SelfForcingError(f"detect: uint8 frames must be [T, H, W, 3], got {tuple(video.shape)}")
        return video.permute(0, 3, 1, 2).float() / 255.0
    if video.shape[0] != 3:
        raise SelfForcingError(f"detect: float video must be [3, T, H, W] in [-1, 1], got {tuple(video.shape)}")
    return ((video.float() + 1) / 2).permute(1, 0, 2, 3)


@torch.no_grad()
def detect(video: torch.Tensor, min_area: int = MIN_AREA, tolerance: float = TOLERANCE) -> Detection:
    """One video -> Detection (see `as_frames` for the accepted layouts)."""
    frames = as_frames(video)
    T, _, H, W = frames.shape
    if (H, W) != (SIZE, SIZE):
        raise SelfForcingError(f"detect: the toy world is {SIZE}x{SIZE}, got {W}x{H}")
    palette, n_obj = _palette()
    dist = torch.cdist(frames.permute(0, 2, 3, 1).reshape(-1, 3), palette).view(T, H, W, -1)
    best, label = dist.min(-1)
    masks = torch.stack([(label == c) & (best < tolerance) for c in range(n_obj)], 1).float()  # [T, C, H, W]
    area = masks.flatten(2).sum(-1)  # [T, C]
    present = area >= min_area

    # circular mean per axis (torus)
    ang = 2 * math.pi * (torch.arange(SIZE, dtype=torch.float32) + 0.5) / SIZE
    def circ(weights: torch.Tensor) -> torch.Tensor:  # weights [T, C, N] along one axis -> [T, C]
        s = (weights * torch.sin(ang)).sum(-1)
        c = (weights * torch.cos(ang)).sum(-1)
        return torch.remainder(torch.atan2(s, c), 2 * math.pi) * SIZE / (2 * math.pi)
    cx, cy = circ(masks.sum(2)), circ(masks.sum(3))
    centre = torch.stack([cx, cy], -1)

    # shape: best IoU among the drawn shapes of equal area, for the (frame, colour) pairs on screen only
    shape = torch.zeros(T, n_obj, dtype=torch.long)
    best_iou = torch.zeros(T, n_obj)
    ti, ci = torch.nonzero(present, as_tuple=True)
    if ti.numel():
        m, a = masks[ti, ci], area[ti, ci]  # [N, H, W], [N]
        grid = torch.arange(SIZE, dtype=torch.float32) + 0.5
        half = SIZE / 2
        dx = torch.remainder(grid.view(1, 1, -1) - cx[ti, ci].view(-1, 1, 1) + half, SIZE) - half  # [N, 1, W]
        dy = torch.remainder(grid.view(1, -1, 1) - cy[ti, ci].view(-1, 1, 1) + half, SIZE) - half  # [N, H, 1]
        ious = []
        for k, name in enumerate(SHAPES):
            cov = coverage(k, dx, dy, torch.sqrt(a / AREA[name]).view(-1, 1, 1))
            inter = (cov * m).flatten(1).sum(-1)
            ious.append(inter / (cov.flatten(1).sum(-1) + a - inter).clamp_min(1e-6))
        b, k = torch.stack(ious, -1).max(-1)
        shape[ti, ci], best_iou[ti, ci] = k, b
    size = torch.sqrt(area / torch.tensor([AREA[n] for n in SHAPES])[shape])
    return Detection(present=present, area=area, shape=shape, centre=centre, size=size, iou=best_iou)


def accuracy(scenes, frames: int) -> dict:
    """Detector against the world's ground truth on rendered videos: colour recall, shape accuracy and share of
    centres within 2 px (over detected objects), false colours per frame."""
    video, truth = render(scenes, frames)
    found = right_shape = near = total = false = 0
    for b, scene in enumerate(scenes):
        det = detect(video[b])
        wanted = set(truth.colour[b][truth.present[b]].tolist())
        false += sum(len(set(torch.nonzero(det.present[t]).flatten().tolist()) - wanted) for t in range(frames))
        for k in range(len(scene.objects)):
            c = truth.colour[b, k]
            seen = det.present[:, c]
            total += frames
            found += int(seen.sum())
            right_shape += int((seen & (det.shape[:, c] == truth.shape[b, k])).sum())
            err = (det.centre[:, c] - truth.centre[b, :, k]).abs()
            near += int((seen & (torch.minimum(err, SIZE - err).norm(dim=-1) < 2.0)).sum())
    return {"objects_x_frames": total, "colour_recall": found / total, "shape_accuracy": right_shape / max(1, found),
            "centre_within_2px": near / max(1, found), "false_colours_per_frame": false / (len(scenes) * frames)}


def main(argv: list[str] | None = None) -> int:
    """`python -m sf_core.toy.detect --scenes 64 --frames 33`: the detector's accuracy on rendered videos (JSON)."""
    p = argparse.ArgumentParser(prog="python -m sf_core.toy.detect", description=main.__doc__)
    p.add_argument("--scenes", type=int, default=64)
    p.add_argument("--frames", type=int, default=33)
    p.add_argument("--seed", type=int, default=100_000)
    args = p.parse_args(argv)
    scenes = [sample_scene(args.seed + i, train=False) for i in range(args.scenes)]
    print(json.dumps(accuracy(scenes, args.frames)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
