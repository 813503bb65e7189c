"""SIGINT / SIGTERM during `train` and `generate` (real subprocesses), umask, stale partial files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sf_core.cli import main
from sf_core.config import WanConfig
from fixtures.dit import tiny_dit_state_dict, write_dit

ROOT = Path(__file__).resolve().parents[1]
CFG = WanConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=32, freq_dim=64)
ITERATIONS = 6

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    from fixtures.text import write_tiny_umt5
    from fixtures.vae import write_tiny_wan_vae

    d = tmp_path_factory.mktemp("signals")
    write_dit(d / "sf.pt", tiny_dit_state_dict(CFG, 0), "official_pt")
    write_dit(d / "wan.safetensors", tiny_dit_state_dict(CFG, 1))
    write_tiny_umt5(d / "umt5.safetensors", "comfy_hf")
    write_tiny_wan_vae(d / "vae.safetensors")
    (d / "prompts.txt").write_text("a red fox in the snow\na cat on a roof\n")
    return d


def _train(d: Path, out: Path, *extra) -> list[str]:
    return ["train", "--model", str(d / "sf.pt"), "--teacher", str(d / "wan.safetensors"),
            "--text-encoder", str(d / "umt5.safetensors"), "--prompts", str(d / "prompts.txt"), "--output", str(out),
            "--iterations", str(ITERATIONS), "--rank", "4", "--frames", "9", "--width", "32", "--height", "32",
            "--critic-ratio", "2", "--no-checkpointing", "--device", "cpu", *extra]


def _generate(d: Path, out: Path, *extra) -> list[str]:
    return ["generate", "--model", str(d / "sf.pt"), "--text-encoder", str(d / "umt5.safetensors"),
            "--vae", str(d / "vae.safetensors"), "--width", "32", "--height", "32", "--prompt", "a fox",
            "--device", "cpu", "--output", str(out), *extra]


def _signal_after(argv: list[str], line_start: str, sig: int) -> tuple[int, str, str]:
    """Run the CLI; send `sig` as soon as a stdout line starts with `line_start`."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "sf_core", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    out = []
    try:
        for line in proc.stdout:
            out.append(line)
            if line.startswith(line_start):
                proc.send_signal(sig)
                break
        rest, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, "".join(out) + rest, err


@pytest.fixture(scope="module")
def reference_lora(d):
    out = d / "reference.safetensors"
    assert main(_train(d, out)) == 0
    return load_file(str(out))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_train_saves_a_checkpoint_that_resumes_to_the_identical_lora(d, tmp_path, reference_lora, sig):
    out = tmp_path / "lora.safetensors"
    code, stdout, err = _signal_after(_train(d, out), '{"iteration": 1,', sig)
    assert code == 128 + sig, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"stopped by {sig.name} at iteration") and "--resume" in lines[0], err
    state = torch.load(tmp_path / "lora.ckpt.pt", weights_only=True)
    assert 1 <= state["iteration"] < ITERATIONS  # stopped early, at a whole iteration
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["lora.ckpt.pt"]  # no LoRA, no partial

    assert main(_train(d, out, "--resume")) == 0
    got = load_file(str(out))
    assert got.keys() == reference_lora.keys()
    assert all(torch.equal(got[k], reference_lora[k]) for k in got)


def test_sigint_during_generate_removes_the_partial_video(d, tmp_path):
    out = tmp_path / "long.mp4"
    code, stdout, err = _signal_after(_generate(d, out, "--frames", "401", "--window", "6"), "chunk 1/", signal.SIGINT)
    assert code == 130, err
    assert "stopped by SIGINT" in err and "partial file was removed" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_outputs_honour_the_umask_and_stale_partials_are_cleaned(d, tmp_path):
    out = tmp_path / "v.mp4"
    stale = tmp_path / f".v.mp4.{_dead_pid()}-0a1b2c3d.partial.mp4"
    stale.write_bytes(b"left by a killed run")
    live = tmp_path / f".v.mp4.{os.getppid()}-0a1b2c3d.partial.mp4"  # a running process's: not touched
    live.write_bytes(b"being written")
    frames = tmp_path / "frames"
    frames.mkdir()
    stale_frame = frames / f".frame_000003.png.{_dead_pid()}-0a1b2c3d.partial.png"
    stale_frame.write_bytes(b"")
    old = os.umask(0o027)
    try:
        assert main(_generate(d, out, "--frames", "5", "--latents-out", str(tmp_path / "v.latent"),
                              "--frames-dir", str(frames))) == 0
        assert main(["convert", str(d / "wan.safetensors"), str(tmp_path / "c.safetensors")]) == 0
        (tmp_path / "c2.safetensors").write_bytes(b"")
        os.chmod(tmp_path / "c2.safetensors", 0o600)
        assert main(["convert", str(d / "wan.safetensors"), str(tmp_path / "c2.safetensors"), "--overwrite"]) == 0
    finally:
        os.umask(old)
    for name in ("v.mp4", "v.latent", "c.safetensors", "c2.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name
    assert not stale.exists() and live.exists() and not stale_frame.exists()
    assert sorted(p.name for p in frames.iterdir()) == [f"frame_{i:06d}.png" for i in range(5)]
    assert all(p.stat().st_mode & 0o777 == 0o640 for p in frames.iterdir())


def test_train_files_honour_the_umask(d, tmp_path):
    old = os.umask(0o002)
    try:
        assert main(_train(d, tmp_path / "l.safetensors", "--iterations", "1")) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "l.safetensors").stat().st_mode & 0o777 == 0o664
    assert (tmp_path / "l.ckpt.pt").stat().st_mode & 0o777 == 0o664
