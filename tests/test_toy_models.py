"""The shipped toy models, read by the detector: prompts followed, prompt switches, image-to-video, long streams,
and the embedded default of `python -m sf_core generate`.

The behaviour tests state what a working toy model must do. The model shipped now does not do it (its teacher draws
the backgrounds but not the objects; see sf_core/toy/models/MODEL_CARD.md), so they are strict expected failures:
they run and assert in full, and turn into failures to update the moment a model that passes them ships.
Thresholds: well above chance (colour 1/8, shape 1/4, motion 1/9) and below what rendered ground truth scores
through the autoencoder (the ceiling row of the table).
"""

import torch
import pytest

from sf_core.toy import world
from sf_core.toy.detect import detect
from sf_core.toy.diffusion import FRAMES_PER_CHUNK, LATENT_FRAMES
from sf_core.toy.metrics import JUMP, mean_scores, score, subject
from sf_core.toy.models import Toy, check_shipped

MIN_COLOUR, MIN_SHAPE, MIN_MOTION = 0.6, 0.25, 0.4  # ceiling through the autoencoder: 1.0, ~0.3, 1.0
NOT_YET = pytest.mark.xfail(strict=True, reason=(
    "the shipped toy model does not follow prompts yet: its teacher (1600 flow-matching steps of a 1.25M-parameter "
    "DiT on a shared 2-core CPU) draws backgrounds but no objects, and the students learn from it (MODEL_CARD.md)"))
HELD_OUT = world.held_out_prompts()[::4]  # 8 of the 32 evaluation prompts
CHUNK_FRAMES = 4 * FRAMES_PER_CHUNK  # video frames per chunk after the first
RESTYLE_STRENGTH = 0.7


@pytest.fixture(scope="module")
def toy():
    check_shipped()
    torch.set_num_threads(1)
    return Toy.load()


@NOT_YET
def test_held_out_prompts_colour_shape_and_motion(toy):
    scores = [score(detect(toy.generate(p, LATENT_FRAMES, seed=i)), p) for i, p in enumerate(HELD_OUT)]
    m = mean_scores(scores)
    assert m["colour"] >= MIN_COLOUR and m["shape"] >= MIN_SHAPE and m["motion"] >= MIN_MOTION, m


def _switch(toy, switch, seed):
    a = "a red circle stays still on a grey background"
    b = "a blue circle stays still on a grey background"
    video = toy.generate([(0, a), (2, b)], 12, seed=seed, window=LATENT_FRAMES, sink=FRAMES_PER_CHUNK, switch=switch)
    det = detect(video)
    at = 1 + 2 * CHUNK_FRAMES - 3  # first frame of chunk 2
    return det, at


@NOT_YET
def test_prompt_switch_recache_changes_colour_within_two_chunks_and_keeps_the_rest(toy):
    red, blue = world.COLOUR_NAMES.index("red"), world.COLOUR_NAMES.index("blue")
    jumps_recache, jumps_cut = [], []
    for seed in range(3):
        det, at = _switch(toy, "recache", seed)
        before, after = det.dominant[at - 4 : at], det.dominant[at + 2 * CHUNK_FRAMES - 4 : at + 2 * CHUNK_FRAMES]
        assert (before == red).all() and (after == blue).all(), (det.dominant.tolist(), at)
        assert (det.shape[at + 2 * CHUNK_FRAMES - 4 : at + 2 * CHUNK_FRAMES, blue] == 0).all()  # still a circle
        jumps_recache.append((det.centre[at + CHUNK_FRAMES, blue] - det.centre[at - 1, red]).abs().max())
        cut, at = _switch(toy, "cut", seed)
        jumps_cut.append((cut.centre[at + CHUNK_FRAMES, blue] - cut.centre[at - 1, red]).abs().max())
    assert max(jumps_recache) < JUMP, jumps_recache  # the object stays where it was
    assert sum(jumps_cut) > sum(jumps_recache), (jumps_cut, jumps_recache)  # a cut starts a new scene


@NOT_YET
def test_image_to_video_keeps_the_start_frame_object(toy):
    scene = world.scene_from_caption("a yellow square stays still on a grey background", seed=4)
    image, truth = world.render([scene], 1)
    prefix = toy.autoencoder.encode_normalized(image)  # [1, 16, 1, 8, 8]
    video = toy.generate("a yellow square stays still on a grey background", LATENT_FRAMES - 1, seed=0, prefix=prefix)
    det = detect(video)
    c = world.COLOUR_NAMES.index("yellow")
    assert det.present[:, c].float().mean() > 0.9
    err = (det.centre[:, c] - truth.centre[0, 0, 0]).abs()
    err = torch.minimum(err, world.SIZE - err).amax(-1)
    assert err.median() < 4.0, err


@NOT_YET
def test_rolling_window_with_sink_keeps_the_object_on_screen_at_4x_length(toy):
    for i, p in enumerate(HELD_OUT[:3]):
        video = toy.generate(p, 4 * LATENT_FRAMES, seed=i, window=LATENT_FRAMES, sink=FRAMES_PER_CHUNK)
        assert video.shape[1] == 1 + 4 * (4 * LATENT_FRAMES - 1)
        c, _, _ = subject(p)
        seen = detect(video).present[:, c]
        assert seen.float().mean() > 0.9 and seen[-33:].float().mean() > 0.8, (p, seen.float().mean())


@NOT_YET
def test_video_to_video_restyles_the_colour_and_keeps_the_input_motion(toy):
    scene = world.scene_from_caption("a red circle moves right on a grey background", seed=2)
    video, truth = world.render([scene], 1 + 4 * (LATENT_FRAMES - 1))
    out = toy.generate("a blue circle moves right on a grey background", LATENT_FRAMES, seed=0, video=video,
                       strength=RESTYLE_STRENGTH)
    det = detect(out)
    blue = world.COLOUR_NAMES.index("blue")
    assert (det.dominant == blue).float().mean() > 0.7, det.dominant.tolist()
    seen = det.present[:, blue]
    err = (det.centre[:, blue] - truth.centre[0, :, 0]).abs()
    err = torch.minimum(err, world.SIZE - err).amax(-1)[seen]
    assert err.median() < 4.0, err  # the restyled circle moves where the input's did


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`python -m sf_core generate` with no model flags (the embedded default) -> (frames [T, 64, 64, 3], output)."""
    import contextlib
    import io

    import av

    from sf_core.cli import main

    check_shipped()
    out = tmp_path_factory.mktemp("demo") / "demo.mp4"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["generate", "--prompt", "0s: a red circle moves right on a grey background\n"
                     "1s: a green circle moves right on a grey background", "--seconds", "2", "-o", str(out)])
    lines = buf.getvalue()
    assert code == 0, lines
    with av.open(str(out)) as f:
        frames = torch.stack([torch.from_numpy(fr.to_ndarray(format="rgb24")) for fr in f.decode(video=0)])
    return frames, lines


def test_demo_command_writes_an_mp4_that_pyav_reads(demo):
    frames, out = demo
    assert frames.shape == (33, 64, 64, 3)
    assert "real use" in out and "--model" in out  # where the real weights go
    assert frames.float().std() > 5  # not a blank video (the detector checks of its content: the next test)


@NOT_YET
def test_demo_frames_show_the_prompted_colours(demo):
    frames, _ = demo
    det = detect(frames)
    assert det.present.any(1).float().mean() > 0.9
    red, green = world.COLOUR_NAMES.index("red"), world.COLOUR_NAMES.index("green")
    assert (det.dominant[:8] == red).float().mean() >= 0.75 and (det.dominant[-8:] == green).float().mean() >= 0.75
