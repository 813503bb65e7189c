"""The detector reads the world's pixels back to its ground truth; the metrics score captions correctly."""

import torch
import pytest

from sf_core.errors import SelfForcingError
from sf_core.toy import world
from sf_core.toy.detect import accuracy, detect
from sf_core.toy.metrics import classify_motion, drift, score, score_video
from sf_core.toy.world import COLOUR_NAMES, MOTIONS, SHAPES, ObjectSpec, Scene, caption, render, sample_scene


def test_detector_reads_rendered_videos():
    """Random scenes (1-3 objects that may overlap, all backgrounds, pans), including held-out combinations."""
    scenes = [sample_scene(50_000 + i, train=False) for i in range(24)]
    acc = accuracy(scenes, 17)
    colour, shape, centre = acc["colour_recall"], acc["shape_accuracy"], acc["centre_within_2px"]
    false = acc["false_colours_per_frame"]
    assert colour > 0.98 and shape > 0.95 and centre > 0.95 and false < 0.02, (colour, shape, centre, false)


def test_detector_reads_uint8_frames_like_the_float_video():
    video, _ = render([sample_scene(7)], 9)
    frames = ((video[0].permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    a, b = detect(video[0]), detect(frames)
    assert torch.equal(a.present, b.present) and torch.equal(a.shape[a.present], b.shape[b.present])
    with pytest.raises(SelfForcingError, match="64x64"):
        detect(torch.zeros(3, 5, 32, 32))


def test_motion_classifier_on_every_motion_shape_and_colour():
    prompts = [caption(Scene((ObjectSpec(COLOUR_NAMES[(i + j) % len(COLOUR_NAMES)], s, m),), "grey"))
               for i, s in enumerate(SHAPES) for j, m in enumerate(MOTIONS)]
    scenes = [world.scene_from_caption(p, i) for i, p in enumerate(prompts)]
    video, truth = render(scenes, 33)
    for b, p in enumerate(prompts):
        assert classify_motion(truth.centre[b, :, 0], truth.size[b, :, 0]) == scenes[b].objects[0].motion, p
        s = score_video(video[b], p)
        assert (s.colour, s.shape, s.motion, s.consistency, s.on_screen) == (1.0, 1.0, 1.0, 1.0, 1.0), (p, s)


def test_scores_fall_for_the_wrong_caption_and_drift_sees_a_change():
    a = world.scene_from_caption("a red circle moves right on a grey background", 1)
    b = world.scene_from_caption("a blue square moves up on a grey background", 1)
    va, _ = render([a], 33)
    vb, _ = render([b], 33)
    wrong = score_video(va[0], "a blue square moves up on a grey background")
    assert wrong.colour == 0 and wrong.shape == 0 and wrong.motion == 0
    det = detect(torch.cat([va[0], vb[0]], dim=1))  # the subject changes half way
    d = drift(det, "a red circle moves right on a grey background", 33)
    assert d["first"]["colour"] == 1.0 and d["last"]["colour"] == 0.0 and d["change"]["colour"] == -1.0
    flicker = torch.where(torch.arange(33).view(1, -1, 1, 1) % 2 == 0, va[0], vb[0])
    assert score(detect(flicker), "a red circle moves right on a grey background").consistency == 0.0


def test_an_empty_video_does_not_score_a_still_motion():
    scene = world.Scene((world.ObjectSpec("red", "circle", "still"),), "grey")
    video, _ = render([scene], 33)
    background = torch.full_like(video[0], video[0, :, 0, 0, 0].max().item())  # grey everywhere, nothing on it
    empty = score_video(background, "a red circle stays still on a grey background")
    assert empty.on_screen == 0 and empty.motion == 0
    assert score_video(video[0], "a red circle stays still on a grey background").motion == 1
