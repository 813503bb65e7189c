"""The shipped toy models, read by the detector: prompts followed, prompt switches, image-to-video, long streams,
and the embedded default of `python -m sf_core generate`.

Thresholds come from the recipe's evaluation table (sf_core/toy/models/MODEL_CARD.md): they sit below what the
shipped Self Forcing student measured on the 32 held-out prompts and far above chance (colour 1/8, shape 1/4,
motion 1/9), so a broken loader, stream or decoder fails them.
"""

import torch
import pytest

from sf_core.toy import world
from sf_core.toy.detect import detect
from sf_core.toy.diffusion import FRAMES_PER_CHUNK, LATENT_FRAMES
from sf_core.toy.metrics import JUMP, mean_scores, score, subject
from sf_core.toy.models import Toy, check_shipped

# measured on the shipped model (MODEL_CARD.md, "Self Forcing + DMD" @33) minus a margin; see the module docstring
MIN_COLOUR, MIN_SHAPE, MIN_MOTION = 0.6, 0.3, 0.25
HELD_OUT = world.held_out_prompts()[::4]  # 8 of the 32 evaluation prompts
CHUNK_FRAMES = 4 * FRAMES_PER_CHUNK  # video frames per chunk after the first


@pytest.fixture(scope="module")
def toy():
    check_shipped()
    torch.set_num_threads(1)
    return Toy.load()


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


def test_rolling_window_with_sink_keeps_the_object_on_screen_at_4x_length(toy):
    for i, p in enumerate(HELD_OUT[:3]):
        video = toy.generate(p, 4 * LATENT_FRAMES, seed=i, window=LATENT_FRAMES, sink=FRAMES_PER_CHUNK)
        assert video.shape[1] == 1 + 4 * (4 * LATENT_FRAMES - 1)
        c, _, _ = subject(p)
        seen = detect(video).present[:, c]
        assert seen.float().mean() > 0.9 and seen[-33:].float().mean() > 0.8, (p, seen.float().mean())


def test_demo_command_writes_an_mp4_whose_frames_pass_the_detector(tmp_path, capsys):
    import av

    from sf_core.cli import main

    check_shipped()
    out = tmp_path / "demo.mp4"
    assert main(["generate", "--prompt", "0s: a red circle moves right on a grey background\n"
                 "1s: a green circle moves right on a grey background", "--seconds", "2", "-o", str(out)]) == 0
    assert "real use" in capsys.readouterr().out
    with av.open(str(out)) as f:
        frames = torch.stack([torch.from_numpy(fr.to_ndarray(format="rgb24")) for fr in f.decode(video=0)])
    assert frames.shape[1:] == (64, 64, 3) and frames.shape[0] == 33
    det = detect(frames)
    red, green = world.COLOUR_NAMES.index("red"), world.COLOUR_NAMES.index("green")
    assert (det.dominant[:8] == red).float().mean() >= 0.75 and (det.dominant[-8:] == green).float().mean() >= 0.75
