"""A loss curve as an image (no plotting library): generator and critic losses per iteration."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

COLORS = {"generator_loss": (230, 90, 60), "critic_loss": (60, 140, 230)}


def loss_curve(history: list[dict], width: int = 640, height: int = 360) -> np.ndarray:
    """history of trainer records -> uint8 RGB [height, width, 3]; each loss on its own log scale band."""
    img = Image.new("RGB", (width, height), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    pad = 28
    draw.rectangle([pad, pad, width - pad, height - pad], outline=(180, 180, 180))
    n = max((h["iteration"] for h in history), default=1)
    legend_x = pad + 6
    for key, color in COLORS.items():
        pts = [(h["iteration"], h[key]) for h in history if key in h and h[key] is not None and h[key] > 0]
        if not pts:
            continue
        logs = [math.log10(v) for _, v in pts]
        lo, hi = min(logs), max(logs)
        span = hi - lo or 1.0
        xy = [(pad + (width - 2 * pad) * (i - 1) / max(1, n - 1),
               height - pad - (height - 2 * pad) * (lv - lo) / span) for (i, _), lv in zip(pts, logs)]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=2)
        else:
            draw.ellipse([xy[0][0] - 2, xy[0][1] - 2, xy[0][0] + 2, xy[0][1] + 2], fill=color)
        label = f"{key.replace('_', ' ')}: {pts[-1][1]:.4g}"
        draw.text((legend_x, 8), label, fill=color)
        legend_x += 8 * len(label)
    draw.text((pad, height - pad + 6), f"iteration 1..{n} (each curve on its own log scale)", fill=(90, 90, 90))
    return np.asarray(img)
