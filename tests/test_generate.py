"""`python -m sf_core generate` end to end on tiny files in the real formats, and its early errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sf_core.cli import build_parser
from sf_core.config import WanConfig
from sf_core.errors import CheckpointError, SelfForcingError
from fixtures.dit import tiny_dit_state_dict, write_dit

ROOT = Path(__file__).resolve().parents[1]
TEXT_DIM = 32  # the tiny UMT5's width


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from fixtures.text import write_tiny_umt5
    from fixtures.vae import write_tiny_taehv, write_tiny_wan_vae

    d = tmp_path_factory.mktemp("models")
    cfg = WanConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=TEXT_DIM, freq_dim=64)
    return {
        "model": write_dit(d / "self_forcing_dmd.pt", tiny_dit_state_dict(cfg), "official_pt"),
        "te": write_tiny_umt5(d / "umt5_xxl_fp16.safetensors", "comfy_hf"),
        "te_bare": write_tiny_umt5(d / "umt5_no_tokenizer.safetensors", "comfy_hf", spiece=None),
        "vae": write_tiny_wan_vae(d / "wan_2.1_vae.safetensors"),
        "taehv": write_tiny_taehv(d / "taew2_1.pth"),
    }


def _args(files, out, *extra):
    return ["generate", "--model", str(files["model"]), "--text-encoder", str(files["te"]),
            "--vae", str(files["vae"]), "--taehv", str(files["taehv"]), "--width", "64", "--height", "64",
            "--prompt", "a red fox runs through the snow", "--output", str(out), *extra]


def test_generate_writes_a_playable_mp4_as_it_streams(files, tmp_path):
    from sf_core.video import read_video

    out = tmp_path / "fox.mp4"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-m", "sf_core", *_args(files, out, "--frames", "81", "--frames-dir",
                          str(tmp_path / "frames"))], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    frames, fps = read_video(out)
    assert tuple(frames.shape) == (81, 64, 64, 3) and fps == 16
    assert len(list((tmp_path / "frames").glob("*.png"))) == 81
    chunk_lines = [ln for ln in res.stdout.splitlines() if ln.startswith("chunk ")]
    assert len(chunk_lines) == 7 and chunk_lines[0].startswith("chunk 1/7  frames 0-8")
    assert '"first_frame_latency_s"' in res.stdout and '"fps_without_decoding"' in res.stdout
    assert not list(tmp_path.glob(".*partial*"))


def test_generate_with_tiny_decoder_and_timeline(files, tmp_path):
    from sf_core.generate import run
    from sf_core.video import read_video

    out = tmp_path / "t.mp4"
    args = build_parser().parse_args(_args(files, out, "--decoder", "taehv", "--seconds", "2", "--prompt",
                                           "x") [:-2] + ["--prompt", "0s: a fox\n1s: a cat"])
    lines = []
    summary = run(args, log=lines.append)
    frames, _ = read_video(out)
    assert frames.shape[0] == summary["video_frames"] == 33  # 2 s at 16 fps, rounded up to 1 + 4k
    assert any(ln.endswith("prompt 1") for ln in lines)


@pytest.mark.parametrize("swap, error, words", [
    (dict(vae="model"), CheckpointError, "expected a Wan2.1 VAE.*not a video decoder"),
    (dict(te="vae"), CheckpointError, "not a UMT5|not a text encoder|VAE"),
    (dict(te="te_bare"), SelfForcingError, "no tokenizer"),
    (dict(model="vae"), CheckpointError, "not a Wan2.1 DiT"),
])
def test_wrong_files_fail_before_heavy_work(files, tmp_path, monkeypatch, swap, error, words):
    import sf_core.generate as gen

    monkeypatch.setattr(gen, "load_dit", lambda *a, **k: pytest.fail("loaded the DiT before checking inputs"))
    monkeypatch.setattr(gen, "encode_timeline", lambda *a, **k: pytest.fail("encoded text before checking inputs"))
    f = dict(files)
    for k, v in swap.items():
        f[k] = files[v]
    out = tmp_path / "o.mp4"
    with pytest.raises(error, match=words):
        gen.run(build_parser().parse_args(_args(f, out)))
    assert not out.exists() and not list(tmp_path.iterdir())


def test_unwritable_output_fails_first(files, tmp_path, monkeypatch):
    import sf_core.generate as gen

    monkeypatch.setattr(gen.pf, "dit_config", lambda *a: pytest.fail("read model files before checking the output"))
    with pytest.raises(SelfForcingError, match="does not exist"):
        gen.run(build_parser().parse_args(_args(files, tmp_path / "missing" / "o.mp4")))
    with pytest.raises(ValueError, match="not divisible by 16"):
        gen.run(build_parser().parse_args(_args(files, tmp_path / "o.mp4", "--width", "70")))


def test_fp8_generate_is_close_to_the_reference(files, tmp_path):
    from safetensors.torch import load_file

    from sf_core.generate import run

    def latents(*extra):
        out = tmp_path / f"v{len(extra)}.mp4"
        run(build_parser().parse_args(_args(files, out, "--frames", "9", "--latents-out", str(out) + ".latent",
                                            *extra)), log=lambda *_: None)
        return load_file(str(out) + ".latent")["latent_tensor"]

    ref, fp8 = latents(), latents("--fp8")
    rel = ((fp8 - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.1, rel  # fp8 rounding only: the same video


def test_compile_where_it_cannot_run_fails_before_heavy_work(files, tmp_path, monkeypatch):
    import shutil

    import sf_core.generate as gen

    monkeypatch.setattr(gen, "load_dit", lambda *a, **k: pytest.fail("loaded the DiT before checking --compile"))
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(SelfForcingError, match="--compile: .*C\\+\\+ compiler"):
        gen.run(build_parser().parse_args(_args(files, tmp_path / "o.mp4", "--compile")))


def test_overlapped_decode_writes_the_inline_frames(files, tmp_path):
    import numpy as np
    from PIL import Image

    from sf_core.generate import run

    def frames(flag):
        d = tmp_path / flag
        run(build_parser().parse_args(_args(files, tmp_path / f"{flag}.mp4", "--frames", "33", "--window", "6",
                                            "--sink", "1", f"--{flag}", "--frames-dir", str(d))), log=lambda *_: None)
        return [np.asarray(Image.open(p)) for p in sorted(d.glob("*.png"))]

    inline, over = frames("no-overlap-decode"), frames("overlap-decode")
    assert len(over) == len(inline) == 33
    assert all(np.array_equal(a, b) for a, b in zip(over, inline))
    assert np.std(np.stack(over).astype(float)) > 1  # real frames
