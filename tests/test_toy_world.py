"""The procedural world: deterministic, captions parse back, ground truth matches the pixels."""

import torch
import pytest

from sf_core.errors import SelfForcingError
from sf_core.toy import world
from sf_core.toy.world import COLOURS, Scene, ObjectSpec, caption, parse_caption, render, sample_scene


def _colour_mask(video, colour, tol=0.05):
    rgb = torch.tensor(COLOURS[colour]).view(1, 3, 1, 1, 1) * 2 - 1
    return ((video - rgb).abs().amax(dim=1) < tol)  # [B, T, H, W]


def test_same_seed_same_video_and_other_seed_differs():
    a, _ = render([sample_scene(3)], 9)
    b, _ = render([sample_scene(3)], 9)
    c, _ = render([sample_scene(4)], 9)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == (1, 3, 9, 64, 64) and a.min() >= -1 and a.max() <= 1


def test_captions_parse_back_and_hold_out_combinations():
    for seed in range(300):
        s = sample_scene(seed)
        objects, bg, pan = parse_caption(caption(s))
        assert objects == [(o.colour, o.shape, o.motion) for o in s.objects]
        assert (bg, pan) == (s.background, s.pan)
        assert not any(world.held_out(*o) for o in objects)
    assert caption(Scene((ObjectSpec("yellow", "circle", "right"),))) == "a yellow circle moves right on a grey background"
    held = world.held_out_prompts()
    assert 12 <= len(held) <= 40
    with pytest.raises(SelfForcingError, match="toy world"):
        parse_caption("a fox in the snow")


def test_truth_centre_lies_on_the_object_and_motion_goes_its_way():
    scenes = [Scene((ObjectSpec(c, "square", m, x=32, y=32, size=8),), "black")
              for c, m in (("red", "right"), ("blue", "up"), ("green", "still"))]
    video, truth = render(scenes, 17)
    for b, s in enumerate(scenes):
        mask = _colour_mask(video[b : b + 1], s.objects[0].colour)[0]  # [T, H, W]
        for t in range(17):
            x, y = truth.centre[b, t, 0].tolist()
            assert mask[t, int(y), int(x)], (b, t)
            ys, xs = torch.nonzero(mask[t], as_tuple=True)
            assert abs(xs.float().mean() + 0.5 - x) < 0.6 and abs(ys.float().mean() + 0.5 - y) < 0.6
    dx = truth.centre[:, -1, 0, 0] - truth.centre[:, 0, 0, 0]
    dy = truth.centre[:, -1, 0, 1] - truth.centre[:, 0, 0, 1]
    assert dx[0] == pytest.approx(16) and dy[1] == pytest.approx(-16) and dx[2] == 0 and dy[2] == 0


def test_objects_stay_on_screen_on_long_videos():
    scenes = [Scene((ObjectSpec("yellow", "circle", m, size=8),), "grey") for m in world.MOTIONS]
    video, _ = render(scenes, 201)
    area = _colour_mask(video, "yellow").flatten(2).sum(-1)  # [B, T]
    assert (area > 25).all()  # the smallest: a shrinking circle of radius 4 (~50 px)


def test_scene_from_caption_and_bad_input():
    s = world.scene_from_caption("a red circle moves left and a blue triangle orbits on a tiled floor while the camera pans right", 5)
    assert [o.colour for o in s.objects] == ["red", "blue"] and s.pan == "right" and s.background == "tiled"
    with pytest.raises(SelfForcingError, match="colour"):
        ObjectSpec("pink", "circle", "still")
    with pytest.raises(SelfForcingError, match="1 \\+ 4k"):
        world.check_frames(10)


def test_toy_dit_config_is_the_one_loaders_infer_from_its_weights():
    from sf_core.config import WanConfig
    from sf_core.toy.diffusion import DIT_CONFIG, new_dit

    assert WanConfig.from_state_dict(new_dit(0).state_dict()) == DIT_CONFIG
