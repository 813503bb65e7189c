"""The shipped toy models, read by the detector: prompts followed, prompt switches, image-to-video, long streams,
and the embedded default of `python -m sf_core generate`.

Thresholds come from the recipe's table (sf_core/toy/models/MODEL_CARD.md; 18 held-out prompts x 2 seeds): each
sits about half-way between chance, or the weakest student, and what the shipped Self Forcing student measured,
so a model that lost half of what it learned fails. What the toy models do not do (shapes and motions beyond
chance, a re-cached switch that keeps the subject in place, restyling at a strength that keeps the input's motion) stays
as strict expected failures that assert in full: they turn into failures to update when a model that does ships.
"""

import torch
import pytest

from sf_core.toy import world
from sf_core.toy.detect import detect
from sf_core.toy.diffusion import FRAMES_PER_CHUNK, LATENT_FRAMES
from sf_core.toy.evaluate import CHUNK_FRAMES, STILL_RADIUS, evaluate_switch, first_frame_of_chunk, start_image_kept
from sf_core.toy.metrics import mean_scores, score, subject
from sf_core.toy.models import Toy, check_shipped

# Table, the shipped student (Self Forcing + DMD + switch tuning) at 33 frames: colour 0.91 (chance 1/6); 4x stream
# on screen 0.89, last window 0.88 (ODE init 0.58, 0.51); re-cached colour switch followed 0.72 (the Self Forcing
# student before switch tuning 0.39), in place 0.14. Shape 0.30 and motion 0.19 are at chance (1/3, 1/9) for every
# model, the bidirectional teacher included (0.32, 0.22): not learned at this size and CPU budget.
MIN_COLOUR = 0.54  # half-way between chance (0.17) and 0.91
MIN_ON_SCREEN_4X, MIN_ON_SCREEN_LAST = 0.73, 0.69  # half-way between the ODE init and the shipped student
MIN_SWITCH_FOLLOWED = 0.55  # half-way between the student before switch tuning and the shipped one
MIN_SHAPE, MIN_MOTION, MIN_IN_PLACE = 0.5, 0.4, 0.5  # what a model that does these would clear
HELD_OUT = world.held_out_prompts()  # the 18 evaluation prompts, one seed each
RESTYLE_STRENGTH = 0.7


def _not_learned(why: str):
    return pytest.mark.xfail(strict=True, reason=f"not learned by the shipped toy models: {why} (MODEL_CARD.md)")


@pytest.fixture(scope="module")
def toy():
    check_shipped()
    torch.set_num_threads(1)
    return Toy.load()


@pytest.fixture(scope="module")
def held_out_scores(toy):
    return mean_scores([score(detect(toy.generate(p, LATENT_FRAMES, seed=i)), p) for i, p in enumerate(HELD_OUT)])


def test_held_out_prompts_get_their_colour(held_out_scores):
    m = held_out_scores
    assert m["colour"] >= MIN_COLOUR and m["on_screen"] >= MIN_COLOUR, m


@_not_learned("shape and motion are at chance for every model of the table, the teacher included")
def test_held_out_prompts_get_their_shape_and_motion(held_out_scores):
    m = held_out_scores
    assert m["shape"] >= MIN_SHAPE and m["motion"] >= MIN_MOTION, m


def _switch(toy, switch, seed):
    a = "a red circle stays still on a grey background"
    b = "a blue circle stays still on a grey background"
    video = toy.generate([(0, a), (2, b)], 12, seed=seed, window=LATENT_FRAMES, sink=FRAMES_PER_CHUNK, switch=switch)
    return detect(video), first_frame_of_chunk(2)


def test_prompt_switch_by_cut_changes_the_colour_at_its_chunk(toy):
    red, blue = world.COLOUR_NAMES.index("red"), world.COLOUR_NAMES.index("blue")
    for seed in range(3):
        det, at = _switch(toy, "cut", seed)
        before, after = det.dominant[at - 8 : at], det.dominant[at + 4 : at + 2 * CHUNK_FRAMES]
        assert (before == red).float().mean() >= 0.75 and (after == blue).float().mean() >= 0.75, det.dominant.tolist()


@pytest.fixture(scope="module")
def switch_scores(toy):
    return evaluate_switch(toy, HELD_OUT)


def test_prompt_switch_recache_turns_the_subject_to_the_new_colour_within_two_chunks(switch_scores):
    """Each held-out prompt switches (re-cache) to the same caption in another colour at chunk 2."""
    assert switch_scores["followed"] >= MIN_SWITCH_FOLLOWED, switch_scores


@_not_learned("after a re-cached switch the new colour mostly appears elsewhere while the old object fades")
def test_prompt_switch_recache_keeps_the_subject_in_place(switch_scores):
    assert switch_scores["in_place"] >= MIN_IN_PLACE, switch_scores


def test_image_to_video_keeps_the_start_frame_object(toy):
    """Over three start images, the yellow square is on screen and its centre stays within the smallest object
    radius of where the image had it (median over all frames; over 8 images the shipped student measures 8.2 px,
    the Self Forcing student before switch tuning 4.5)."""
    kept = start_image_kept(toy, images=3)
    assert kept["on_screen"] > 0.9 and kept["median_px"] < STILL_RADIUS, kept


def test_rolling_window_with_sink_keeps_the_object_on_screen_at_4x_length(toy):
    seen_all, seen_last = [], []
    for i, p in enumerate(HELD_OUT):
        video = toy.generate(p, 4 * LATENT_FRAMES, seed=i, window=LATENT_FRAMES, sink=FRAMES_PER_CHUNK)
        assert video.shape[1] == 1 + 4 * (4 * LATENT_FRAMES - 1)
        c, _, _ = subject(p)
        seen = detect(video).present[:, c].float()
        seen_all.append(seen.mean())
        seen_last.append(seen[-33:].mean())
    assert torch.stack(seen_all).mean() >= MIN_ON_SCREEN_4X and torch.stack(seen_last).mean() >= MIN_ON_SCREEN_LAST, (
        seen_all, seen_last)


@_not_learned("the colour changes only from strength 0.8, where the input's position is no longer followed")
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


def test_demo_frames_show_the_prompted_colours(demo):
    frames, _ = demo
    det = detect(frames)
    assert det.present.any(1).float().mean() > 0.9
    red, green = world.COLOUR_NAMES.index("red"), world.COLOUR_NAMES.index("green")
    assert (det.dominant[:8] == red).float().mean() >= 0.75 and (det.dominant[-8:] == green).float().mean() >= 0.75


def test_motion_steering_counts_the_clips_motion_when_nothing_is_re_noised(toy):
    """At sigma 0 the instrument returns each rendered clip through the autoencoder: every video keeps its own
    motion and none shows the other caption's (the ceiling's motion is 1.00)."""
    from sf_core.toy.evaluate import motion_steering
    from sf_core.toy.models import shipped_files

    steer = motion_steering(toy, shipped_files()["dit"], sigmas=(0.0,), seeds=1)
    assert steer == {0.0: {"target": 0.0, "source": 1.0}}, steer
