"""`generate` with a start image, an input video (video-to-video) and prompts typed on standard input."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sf_core.cli import build_parser
from sf_core.config import WanConfig
from sf_core.errors import SelfForcingError
from fixtures.dit import tiny_dit_state_dict, write_dit

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from PIL import Image

    from fixtures.text import write_tiny_umt5
    from fixtures.vae import write_tiny_taehv, write_tiny_wan_vae
    from sf_core.video import VideoWriter

    d = tmp_path_factory.mktemp("models")
    cfg = WanConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=32, freq_dim=64)
    g = torch.Generator().manual_seed(0)
    with VideoWriter(d / "in.mp4", fps=16) as w:  # a bright square moving right over a dark red field
        for i in range(21):
            f = torch.zeros(64, 64, 3, dtype=torch.uint8)
            f[..., 0] = 60
            f[20:40, 2 * i : 2 * i + 20] = 230
            w.write(f[None])
    img = (torch.rand(48, 80, 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(img).save(d / "start.png")
    return {
        "model": write_dit(d / "self_forcing_dmd.pt", tiny_dit_state_dict(cfg), "official_pt"),
        "te": write_tiny_umt5(d / "umt5_xxl_fp16.safetensors", "comfy_hf"),
        "vae": write_tiny_wan_vae(d / "wan_2.1_vae.safetensors"),
        "taehv": write_tiny_taehv(d / "taew2_1.pth"),
        "video": d / "in.mp4",
        "image": d / "start.png",
    }


def _args(files, out, *extra):
    return ["generate", "--model", str(files["model"]), "--text-encoder", str(files["te"]),
            "--vae", str(files["vae"]), "--taehv", str(files["taehv"]),
            "--prompt", "a red fox runs through the snow", "--output", str(out), *extra]


def _latents(path):
    from safetensors.torch import load_file

    return load_file(str(path))["latent_tensor"]


def test_input_video_at_strength_zero_gives_back_its_latents(files, tmp_path):
    from sf_core.generate import run
    from sf_core.vae import load_vae
    from sf_core.video import read_video

    out, lat = tmp_path / "v2v.mp4", tmp_path / "v2v.latent"
    lines = []
    summary = run(build_parser().parse_args(_args(files, out, "--input-video", str(files["video"]), "--strength", "0",
                                                  "--decoder", "taehv", "--encoder", "wan", "--latents-out", str(lat))), log=lines.append)
    frames, _ = read_video(files["video"])
    want = load_vae(files["vae"]).encode(frames.permute(3, 0, 1, 2)[None].float() / 127.5 - 1)
    got = _latents(lat)
    assert got.shape == want.shape == (1, 16, 6, 8, 8)  # 21 frames at the input's size, 64x64
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert summary["video_frames"] == 21


def test_input_video_shorter_than_asked_ends_the_stream_and_other_sizes_are_refused(files, tmp_path, monkeypatch):
    import sf_core.generate as gen

    lines = []
    summary = gen.run(build_parser().parse_args(_args(files, tmp_path / "a.mp4", "--input-video", str(files["video"]),
                                                      "--frames", "81", "--strength", "0.5", "--encoder", "taehv")),
                      log=lines.append)
    assert summary["video_frames"] == 21 and "the input video ended: the stream stopped with it" in lines
    monkeypatch.setattr(gen, "load_dit", lambda *a, **k: pytest.fail("loaded the DiT before checking inputs"))
    with pytest.raises(SelfForcingError, match=r"is 64x64 but --width/--height ask for 128x64; the input is not resized"):
        gen.run(build_parser().parse_args(_args(files, tmp_path / "b.mp4", "--input-video", str(files["video"]),
                                                "--width", "128")))
    with pytest.raises(SystemExit):  # argparse: not both
        build_parser().parse_args(_args(files, tmp_path / "c.mp4", "--input-video", "x.mp4", "--image", "y.png"))


def test_start_image_is_the_first_latent_frame(files, tmp_path):
    from sf_core.generate import run
    from sf_core.vae import load_vae
    from sf_core.video import read_image

    lat = tmp_path / "i2v.latent"
    summary = run(build_parser().parse_args(_args(files, tmp_path / "i2v.mp4", "--image", str(files["image"]),
                                                  "--width", "64", "--height", "64", "--frames", "17", "--decoder", "taehv",
                                                  "--encoder", "wan", "--latents-out", str(lat))), log=lambda *_: None)
    img = read_image(files["image"], 64, 64)  # 80x48 scaled to cover 64x64 and centre-cropped
    want = load_vae(files["vae"]).encode(img.permute(3, 0, 1, 2)[None].float() / 127.5 - 1)
    got = _latents(lat)
    assert got.shape == (1, 16, 5, 8, 8) and summary["video_frames"] == 17
    torch.testing.assert_close(got[:, :, :1], want, rtol=0, atol=1e-4)


def test_interactive_prompts_from_stdin_switch_and_replay(files, tmp_path):
    """A prompt typed while the CLI streams switches at the next chunk; the timeline it writes replays the run."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    out, lat = tmp_path / "live.mp4", tmp_path / "live.latent"
    cmd = [sys.executable, "-m", "sf_core", *_args(files, out, "--width", "64", "--height", "64", "--frames", "121",
                                                   "--decoder", "taehv", "--interactive", "--latents-out", str(lat))]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("chunk 2/"):
                proc.stdin.write("a blue whale sings in the deep ocean\n")
                proc.stdin.flush()
        assert proc.wait(timeout=600) == 0, proc.stderr.read()
    finally:
        proc.kill()
    queued = [ln for ln in lines if ln.startswith("prompt 0 queued during chunk ")]
    switched = [ln for ln in lines if "switched to 'a blue whale" in ln]
    assert len(queued) == 1 and len(switched) == 1
    posted = int(queued[0].split("during chunk ")[1].split(":")[0])  # 1-based chunk running when it arrived
    applied = int(switched[0].split()[1].split("/")[0])
    assert applied == posted + 1 and applied >= 3
    timeline = (tmp_path / "live.timeline.txt").read_text()
    assert timeline == f"#0: a red fox runs through the snow\n#{applied - 1}: a blue whale sings in the deep ocean\n"

    replay = tmp_path / "replay.latent"
    args = _args(files, tmp_path / "replay.mp4", "--width", "64", "--height", "64", "--frames", "121", "--decoder", "taehv",
                 "--latents-out", str(replay))
    i = args.index("--prompt")
    args[i : i + 2] = ["--timeline-file", str(tmp_path / "live.timeline.txt")]
    res = subprocess.run([sys.executable, "-m", "sf_core", *args], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    assert torch.equal(_latents(replay), _latents(lat))
