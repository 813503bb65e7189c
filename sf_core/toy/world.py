"""A procedural video world with ground truth: coloured shapes moving on simple backgrounds.

Every video is drawn from a `Scene` (sampled from a seed, or parsed from a caption) and comes with the
state of each object at each frame. Rendering is vectorised torch over videos, objects and frames:

    scenes = [sample_scene(seed) for seed in range(8)]
    video, truth = render(scenes, frames=33)      # video [8, 3, 33, 64, 64] in [-1, 1]
    truth.centre                                  # [8, 33, 3, 2] (x, y) in pixels, per object slot
    caption(scenes[0])                            # "a red circle moves right on a grey background"

The screen is a torus: an object that leaves one edge re-enters from the other (drawn on both sides
while it crosses), so every motion keeps its object on screen for any length of video. 16 fps; the
Wan sizes hold (side divisible by 16, 1 + 4k frames).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch

from ..errors import SelfForcingError

SIZE = 64
FPS = 16
MAX_OBJECTS = 3

COLOURS = {
    "red": (0.90, 0.15, 0.15),
    "green": (0.20, 0.80, 0.20),
    "blue": (0.20, 0.35, 0.95),
    "yellow": (0.95, 0.90, 0.20),
    "purple": (0.65, 0.25, 0.85),
    "white": (0.97, 0.97, 0.97),
}
SHAPES = ("circle", "square", "triangle")
MOTIONS = ("left", "right", "up", "down", "bounce", "orbit", "grow", "shrink", "still")
MOTION_PHRASES = {
    "left": "moves left", "right": "moves right", "up": "moves up", "down": "moves down",
    "bounce": "bounces", "orbit": "orbits", "grow": "grows", "shrink": "shrinks", "still": "stays still",
}
BACKGROUNDS = {  # name -> (colour a, colour b) of an 8-pixel checker (equal for a flat background)
    "grey": ((0.45, 0.45, 0.45), (0.45, 0.45, 0.45)),
    "black": ((0.06, 0.06, 0.06), (0.06, 0.06, 0.06)),
    "tiled": ((0.30, 0.30, 0.30), (0.52, 0.52, 0.52)),
}
PANS = (None, "left", "right")
TRAIN_BACKGROUNDS = ("grey", "black")  # the flat backgrounds the embedded models are trained on
TRAIN_OBJECTS = (0.75, 0.25)  # their clips: one object, sometimes two (weights of 1, 2, ... objects)
TILE = 8
SPEED = 1.0  # pixels per frame of the straight motions
PAN_SPEED = 0.5
BOUNCE_PERIOD, ORBIT_PERIOD = 16.0, 32.0
COLOUR_NAMES = tuple(COLOURS)
BACKGROUND_NAMES = tuple(BACKGROUNDS)


@dataclass(frozen=True)
class ObjectSpec:
    colour: str
    shape: str
    motion: str
    x: float = SIZE / 2  # start centre, pixels
    y: float = SIZE / 2
    size: float = 9.0  # radius-like half extent, pixels
    phase: float = 0.0  # for bounce / orbit, radians

    def __post_init__(self):
        for value, allowed, what in ((self.colour, COLOURS, "colour"), (self.shape, SHAPES, "shape"),
                                     (self.motion, MOTIONS, "motion")):
            if value not in allowed:
                raise SelfForcingError(f"unknown {what} {value!r}; the world has {', '.join(allowed)}")


@dataclass(frozen=True)
class Scene:
    objects: tuple[ObjectSpec, ...]
    background: str = "grey"
    pan: str | None = None
    seed: int = 0

    def __post_init__(self):
        if not 1 <= len(self.objects) <= MAX_OBJECTS:
            raise SelfForcingError(f"a scene holds 1 to {MAX_OBJECTS} objects, got {len(self.objects)}")
        if self.background not in BACKGROUNDS:
            raise SelfForcingError(f"unknown background {self.background!r}; the world has {', '.join(BACKGROUNDS)}")
        if self.pan not in PANS:
            raise SelfForcingError(f"unknown camera pan {self.pan!r}; use left, right or none")


# ---- captions ---------------------------------------------------------------------------------
GRAMMAR = ("'a <colour> <shape> <motion>', objects joined by 'and', then "
           + " or ".join(f"'on a {b} background'" for b in TRAIN_BACKGROUNDS)
           + f" (colours {', '.join(COLOURS)}; shapes {', '.join(SHAPES)}; motions moves left/right/up/down, "
           + ", ".join(MOTION_PHRASES[m] for m in MOTIONS[4:]) + ")")
def object_phrase(o: ObjectSpec) -> str:
    article = "an" if o.colour[0] in "aeiou" else "a"
    return f"{article} {o.colour} {o.shape} {MOTION_PHRASES[o.motion]}"


def caption(scene: Scene) -> str:
    """The grammar: object phrases joined by 'and', the background, an optional camera pan."""
    text = " and ".join(object_phrase(o) for o in scene.objects)
    text += " on a tiled floor" if scene.background == "tiled" else f" on a {scene.background} background"
    if scene.pan:
        text += f" while the camera pans {scene.pan}"
    return text


_PHRASE_MOTION = {v: k for k, v in MOTION_PHRASES.items()}


def parse_caption(text: str) -> tuple[list[tuple[str, str, str]], str, str | None]:
    """Inverse of `caption`: ([(colour, shape, motion), ...], background, pan). Raises on other text."""
    s = text.strip().rstrip(".").lower()
    pan = None
    if " while the camera pans " in s:
        s, pan = s.split(" while the camera pans ")
    if s.endswith(" on a tiled floor"):
        s, bg = s[: -len(" on a tiled floor")], "tiled"
    elif " on a " in s and s.endswith(" background"):
        s, bg = s.rsplit(" on a ", 1)
        bg = bg[: -len(" background")]
    else:
        raise SelfForcingError(f"not a caption of the toy world: {text!r} (e.g. 'a red circle moves right on a grey background')")
    objects = []
    for part in s.split(" and "):
        words = part.split()
        if len(words) < 4 or words[0] not in ("a", "an") or " ".join(words[3:]) not in _PHRASE_MOTION:
            raise SelfForcingError(f"not an object phrase of the toy world: {part!r} (e.g. 'a red circle moves right')")
        objects.append((words[1], words[2], _PHRASE_MOTION[" ".join(words[3:])]))
    Scene(tuple(ObjectSpec(*o) for o in objects), bg, pan)  # validates names
    return objects, bg, pan


def check_caption(text: str, reader: str = "the toy models") -> None:
    """Refuse text that is not a caption of the world, with the grammar (the toy models know nothing else)."""
    try:
        parse_caption(text)
    except SelfForcingError as e:
        raise SelfForcingError(f"{e}; {reader} read captions of the toy world: {GRAMMAR}") from None


# ---- sampling ---------------------------------------------------------------------------------
def _place(rng: random.Random, colour: str, shape: str, motion: str) -> ObjectSpec:
    size = rng.uniform(7.5, 9.0) if motion == "grow" else rng.uniform(11.5, 13.0) if motion == "shrink" else rng.uniform(9.0, 12.0)
    margin = 14.0 if motion in ("orbit", "bounce") else 10.0
    return ObjectSpec(colour, shape, motion, x=rng.uniform(margin, SIZE - margin), y=rng.uniform(margin, SIZE - margin),
                      size=size, phase=rng.uniform(0, 2 * math.pi))


def _place_apart(rng: random.Random, others: list[ObjectSpec], *what: str) -> ObjectSpec:
    """Like `_place`, with the start centre at least 20 pixels from the other objects' (on the torus)."""
    for _ in range(50):
        o = _place(rng, *what)
        if all(_torus_distance(o, p) >= 20.0 for p in others):
            break
    return o


def _torus_distance(a: ObjectSpec, b: ObjectSpec) -> float:
    dx = abs(a.x - b.x) % SIZE
    dy = abs(a.y - b.y) % SIZE
    return math.hypot(min(dx, SIZE - dx), min(dy, SIZE - dy))


def held_out(colour: str, shape: str, motion: str) -> bool:
    """About one (colour, shape, motion) combination in nine never appears in training captions."""
    return (COLOUR_NAMES.index(colour) * 5 + SHAPES.index(shape) * 3 + MOTIONS.index(motion) * 2) % 9 == 4


def sample_scene(seed: int, train: bool = True, backgrounds: tuple[str, ...] = BACKGROUND_NAMES,
                 objects: tuple[float, ...] = (0.6, 0.3, 0.1)) -> Scene:
    """A random scene from a seed: 1-3 objects of distinct colours (weights of 1, 2, 3 objects: `objects`), one of
    `backgrounds`, maybe a pan (tiled floor only). train=True never draws a held-out (colour, shape, motion)
    combination."""
    rng = random.Random(seed)
    n = rng.choices(range(1, len(objects) + 1), weights=objects)[0]
    colours = rng.sample(COLOUR_NAMES, n)
    objects: list[ObjectSpec] = []
    for c in colours:
        while True:
            shape, motion = rng.choice(SHAPES), rng.choice(MOTIONS)
            if not (train and held_out(c, shape, motion)):
                break
        objects.append(_place_apart(rng, objects, c, shape, motion))
    bg = rng.choice(backgrounds)
    pan = rng.choice(("left", "right")) if bg == "tiled" and rng.random() < 0.3 else None
    return Scene(tuple(objects), bg, pan, seed)


def scene_from_caption(text: str, seed: int = 0) -> Scene:
    """A scene that fits the caption, its free parts (positions, sizes, phases) drawn from the seed."""
    objects, bg, pan = parse_caption(text)
    rng = random.Random(seed)
    placed: list[ObjectSpec] = []
    for o in objects:
        placed.append(_place_apart(rng, placed, *o))
    return Scene(tuple(placed), bg, pan, seed)


def held_out_prompts(background: str = "grey") -> list[str]:
    """The single-object captions never seen in training, in a fixed order."""
    return [caption(Scene((ObjectSpec(c, s, m),), background)) for c in COLOUR_NAMES for s in SHAPES for m in MOTIONS
            if held_out(c, s, m)]


# ---- rendering --------------------------------------------------------------------------------
@dataclass
class Truth:
    """Per-frame ground truth. Object slots beyond a scene's count have present = False.

    colour, shape, motion: [B, K] indices into COLOUR_NAMES / SHAPES / MOTIONS. centre: [B, T, K, 2] (x, y)
    screen pixels (on the torus: in [0, SIZE)). size: [B, T, K] half extent. present: [B, K] bool.
    background: [B] index into BACKGROUND_NAMES. pan: [B, T] screen shift of the background, pixels.
    """

    colour: torch.Tensor
    shape: torch.Tensor
    motion: torch.Tensor
    centre: torch.Tensor
    size: torch.Tensor
    present: torch.Tensor
    background: torch.Tensor
    pan: torch.Tensor = field(default=None)


def _table(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    B, K = len(scenes), MAX_OBJECTS
    f = torch.zeros(B, K, 5)  # x, y, size, phase, motion
    ints = torch.zeros(B, K, 2, dtype=torch.long)
    present = torch.zeros(B, K, dtype=torch.bool)
    for b, s in enumerate(scenes):
        for k, o in enumerate(s.objects):
            f[b, k] = torch.tensor([o.x, o.y, o.size, o.phase, MOTIONS.index(o.motion)])
            ints[b, k] = torch.tensor([COLOUR_NAMES.index(o.colour), SHAPES.index(o.shape)])
            present[b, k] = True
    pan = torch.tensor([0.0 if s.pan is None else (-PAN_SPEED if s.pan == "right" else PAN_SPEED) for s in scenes])
    bg = torch.tensor([BACKGROUND_NAMES.index(s.background) for s in scenes])
    return {"f": f, "ints": ints, "present": present, "pan": pan, "bg": bg}


def states(scenes: list[Scene], frames: int, start: int = 0) -> Truth:
    """Ground truth of frames [start, start + frames) without drawing them."""
    tab = _table(scenes)
    f = tab["f"]
    t = torch.arange(start, start + frames, dtype=torch.float32).view(1, -1, 1)  # [1, T, 1]
    x0, y0, s0, ph, mo = (f[..., i].unsqueeze(1) for i in range(5))  # [B, 1, K]
    mo = mo.long()
    dx = torch.zeros_like(t * x0)
    dy = torch.zeros_like(dx)
    size = s0.expand_as(dx).clone()
    m = lambda name: mo == MOTIONS.index(name)  # noqa: E731
    dx = torch.where(m("left"), -SPEED * t, dx)
    dx = torch.where(m("right"), SPEED * t, dx)
    dy = torch.where(m("up"), -SPEED * t, dy)
    dy = torch.where(m("down"), SPEED * t, dy)
    bounce = -10.0 * torch.abs(torch.sin(math.pi * t / BOUNCE_PERIOD + ph))
    dy = torch.where(m("bounce"), bounce + 5.0, dy)
    ang = 2 * math.pi * t / ORBIT_PERIOD + ph
    dx = torch.where(m("orbit"), 9.0 * torch.cos(ang), dx)
    dy = torch.where(m("orbit"), 9.0 * torch.sin(ang), dy)
    # grow / shrink: a slow breathing over 48 frames so long videos stay in range
    cyc = (1 - torch.cos(2 * math.pi * t / 96.0)) / 2  # 0 -> 1 over 48 frames, back by 96
    size = torch.where(m("grow"), s0 * (1 + 0.7 * cyc), size)
    size = torch.where(m("shrink"), s0 * (1 - 0.45 * cyc), size)
    pan = tab["pan"].view(-1, 1) * t.view(1, -1)  # [B, T] screen shift of the world
    cx = torch.remainder(x0 + dx + pan.unsqueeze(-1), SIZE)
    cy = torch.remainder(y0 + dy, SIZE)
    ints = tab["ints"]
    return Truth(colour=ints[..., 0], shape=ints[..., 1], motion=f[..., 4].long(), centre=torch.stack([cx, cy], -1),
                 size=size, present=tab["present"], background=tab["bg"], pan=pan)


def _distance(shape: int, dx: torch.Tensor, dy: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Approximate signed distance (pixels, negative inside) of one shape of half extent s, centred at 0."""
    name = SHAPES[shape]
    if name == "circle":
        return torch.sqrt(dx * dx + dy * dy) - s
    if name == "square":
        return torch.maximum(dx.abs(), dy.abs()) - 0.85 * s
    # equilateral triangle pointing up, circumradius 1.3 s, centroid at the centre
    return torch.maximum(torch.maximum(dy, 0.866 * dx - 0.5 * dy), -0.866 * dx - 0.5 * dy) - 0.65 * s


def coverage(shape: int, dx: torch.Tensor, dy: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Anti-aliased coverage in [0, 1] of one shape at offsets (dx, dy) from its centre (broadcast together)."""
    return (0.5 - _distance(shape, dx, dy, s)).clamp(0.0, 1.0)


def render(scenes: list[Scene], frames: int, start: int = 0, size: int = SIZE) -> tuple[torch.Tensor, Truth]:
    """Draw frames [start, start + frames) of each scene -> (video [B, 3, T, size, size] in [-1, 1], Truth)."""
    if size != SIZE:
        raise SelfForcingError(f"the toy world is drawn at {SIZE}x{SIZE}")
    truth = states(scenes, frames, start)
    B, T, K = truth.size.shape
    grid = torch.arange(SIZE, dtype=torch.float32) + 0.5
    half = SIZE / 2
    cov = torch.zeros(B, T, K, SIZE, SIZE)
    for k in range(len(SHAPES)):  # each shape drawn only for the objects that have it
        b, j = torch.nonzero(truth.present & (truth.shape == k), as_tuple=True)
        if b.numel():
            c = truth.centre[b, :, j]  # [N, T, 2]; toroidal offsets from the centre
            dx = torch.remainder(grid.view(1, 1, 1, -1) - c[..., 0, None, None] + half, SIZE) - half
            dy = torch.remainder(grid.view(1, 1, -1, 1) - c[..., 1, None, None] + half, SIZE) - half
            cov[b, :, j] = coverage(k, dx, dy, truth.size[b, :, j][..., None, None])
    # background: checker shifted by the pan
    bg_a = torch.tensor([BACKGROUNDS[n][0] for n in BACKGROUND_NAMES])[truth.background]  # [B, 3]
    bg_b = torch.tensor([BACKGROUNDS[n][1] for n in BACKGROUND_NAMES])[truth.background]
    ix = torch.floor(torch.remainder(grid.view(1, 1, 1, -1) - truth.pan.view(B, T, 1, 1), SIZE) / TILE)
    iy = torch.floor(grid.view(1, 1, -1, 1) / TILE)
    checker = torch.remainder(ix + iy, 2).unsqueeze(2)  # [B, T, 1, H, W]
    img = bg_a.view(B, 1, 3, 1, 1) * (1 - checker) + bg_b.view(B, 1, 3, 1, 1) * checker
    palette = torch.tensor(list(COLOURS.values()))
    for k in range(K):  # painter's order: later objects on top
        rgb = palette[truth.colour[:, k]].view(B, 1, 3, 1, 1)
        a = cov[:, :, k : k + 1]
        img = img * (1 - a) + rgb * a
    return (img * 2 - 1).permute(0, 2, 1, 3, 4).contiguous(), truth


def check_frames(frames: int) -> None:
    if frames < 1 or (frames - 1) % 4:
        raise SelfForcingError(f"the world renders 1 + 4k frames (e.g. 33 or 81), got {frames}")
