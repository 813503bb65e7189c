"""sf_core.video: incremental MP4 writing (atomic), reading back with PyAV, PNG dumps."""

from __future__ import annotations

import os
from fractions import Fraction

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")

from sf_core.errors import SelfForcingError  # noqa: E402
from sf_core.video import VideoWriter, as_uint8_frames, read_video, write_frames_png  # noqa: E402


def gradient_frames(t: int, h: int, w: int, start: int = 0) -> np.ndarray:
    """Smooth moving colour ramps (codec-friendly, so decoded pixels stay close to the input)."""
    y = np.linspace(0, 1, h)[None, :, None]
    x = np.linspace(0, 1, w)[None, None, :]
    k = (np.arange(start, start + t) / 40.0)[:, None, None]
    shape = (t, h, w)
    channels = [(x + k) % 1.0, y, 0.5 + 0.4 * np.sin(6 * (x + y) + k)]
    rgb = np.stack([np.broadcast_to(c, shape) for c in channels], axis=-1)
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


def _probe(path):
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return s.codec_context.name, s.codec_context.pix_fmt, s.width, s.height, Fraction(s.average_rate), s.frames


def test_roundtrip_frame_count_size_fps(tmp_path):
    target = tmp_path / "clip.mp4"
    chunks = [gradient_frames(4, 48, 64, start=4 * i) for i in range(3)]
    with VideoWriter(target, fps=16) as w:
        for c in chunks:
            w.write(c)
    codec, pix_fmt, width, height, rate, _ = _probe(target)
    assert codec == "h264" and pix_fmt == "yuv420p"
    assert (width, height) == (64, 48) and rate == 16
    frames, fps = read_video(target)
    assert frames.dtype == torch.uint8 and tuple(frames.shape) == (12, 48, 64, 3)
    assert fps == 16.0
    err = (frames.float() - torch.from_numpy(np.concatenate(chunks)).float()).abs().mean()
    assert err < 6.0, f"decoded frames differ from the input by {err:.2f} levels on average"
    assert sorted(os.listdir(tmp_path)) == ["clip.mp4"]  # no temporary left over


@pytest.mark.parametrize("fps", [24, 12.5])
def test_fps_is_settable(tmp_path, fps):
    with VideoWriter(tmp_path / "a.mp4", fps=fps) as w:
        w.write(gradient_frames(6, 32, 32))
    frames, got = read_video(tmp_path / "a.mp4")
    assert frames.shape[0] == 6 and got == pytest.approx(fps)


def test_default_fps_is_16(tmp_path):
    with VideoWriter(tmp_path / "a.mp4") as w:
        w.write(gradient_frames(3, 16, 16))
    assert read_video(tmp_path / "a.mp4")[1] == 16.0


def test_float_torch_and_uint8_numpy_inputs_agree(tmp_path):
    u8 = gradient_frames(5, 32, 48)
    as_float = torch.from_numpy(u8).float() / 255.0
    assert np.array_equal(as_uint8_frames(as_float), u8)
    assert np.array_equal(as_uint8_frames(as_float.numpy()), u8)
    assert as_uint8_frames(torch.full((1, 2, 2, 3), 7.0)).max() == 255  # clamped, not wrapped
    for name, frames in (("a.mp4", u8), ("b.mp4", as_float)):
        with VideoWriter(tmp_path / name, fps=16) as w:
            w.write(frames)
    a, _ = read_video(tmp_path / "a.mp4")
    b, _ = read_video(tmp_path / "b.mp4")
    # x264's threaded encoder is not bit-exact from run to run on every machine, so the two files are compared as
    # pictures: both close to the source (a float input read as 0..255, or not clamped, would be far off).
    source = torch.from_numpy(u8).float()
    for decoded in (a, b):
        assert (decoded.float() - source).abs().mean() < 12  # 4:2:0 chroma on saturated gradients
    assert (a.float() - b.float()).abs().mean() < 2


def test_odd_size_is_padded_to_even(tmp_path):
    frames = gradient_frames(4, 33, 47)
    with VideoWriter(tmp_path / "odd.mp4") as w:
        w.write(frames)
    out, _ = read_video(tmp_path / "odd.mp4")
    assert tuple(out.shape) == (4, 34, 48, 3)
    err = (out[:, :33, :47].float() - torch.from_numpy(frames).float()).abs().mean()
    assert err < 6.0


def test_frames_are_encoded_as_they_arrive(tmp_path):
    target = tmp_path / "long.mp4"
    rng = np.random.default_rng(0)
    w = VideoWriter(target, fps=16)
    for _ in range(8):
        w.write(rng.integers(0, 256, size=(10, 128, 128, 3), dtype=np.uint8))
    partial = [p for p in tmp_path.iterdir() if p.name != "long.mp4"]
    assert not target.exists(), "the target must appear only when the video is complete"
    assert len(partial) == 1 and partial[0].stat().st_size > 100_000, "encoded data should already be on disk"
    w.close()
    assert target.exists() and not partial[0].exists()
    assert read_video(target)[0].shape[0] == 80


def test_error_mid_write_leaves_no_file(tmp_path):
    target = tmp_path / "broken.mp4"
    with pytest.raises(RuntimeError, match="generation failed"):
        with VideoWriter(target) as w:
            w.write(gradient_frames(4, 32, 32))
            raise RuntimeError("generation failed")
    assert list(tmp_path.iterdir()) == []


def test_error_keeps_an_existing_file_intact(tmp_path):
    target = tmp_path / "keep.mp4"
    target.write_bytes(b"previous video")
    with pytest.raises(SelfForcingError, match="frame size changed"):
        with VideoWriter(target) as w:
            w.write(gradient_frames(2, 32, 32))
            w.write(gradient_frames(2, 16, 32))
    assert target.read_bytes() == b"previous video"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.mp4"]


def test_bad_frames_raise_and_leave_nothing(tmp_path):
    with pytest.raises(SelfForcingError, match=r"\[T, H, W, 3\]"):
        with VideoWriter(tmp_path / "x.mp4") as w:
            w.write(torch.zeros(2, 3, 16, 16))  # channels first
    assert list(tmp_path.iterdir()) == []


def test_no_frames_is_an_error_and_no_file(tmp_path):
    with pytest.raises(SelfForcingError, match="no frames"):
        with VideoWriter(tmp_path / "empty.mp4"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_missing_folder_fails_at_construction(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VideoWriter(tmp_path / "no" / "such" / "dir" / "out.mp4")


def test_folder_as_target_fails_at_construction(tmp_path):
    (tmp_path / "out.mp4").mkdir()
    with pytest.raises(IsADirectoryError):
        VideoWriter(tmp_path / "out.mp4")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_folder_fails_at_construction(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="not writable"):
            VideoWriter(ro / "out.mp4")
    finally:
        ro.chmod(0o700)


def test_bad_suffix_and_fps_fail_at_construction(tmp_path):
    with pytest.raises(SelfForcingError, match=".mp4"):
        VideoWriter(tmp_path / "out.gif")
    with pytest.raises(SelfForcingError, match="fps"):
        VideoWriter(tmp_path / "out.mp4", fps=0)
    assert list(tmp_path.iterdir()) == []


def test_read_video_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_video(tmp_path / "nope.mp4")


def test_write_frames_png_lossless(tmp_path):
    frames = gradient_frames(3, 9, 13)
    paths = write_frames_png(tmp_path / "frames", torch.from_numpy(frames), start_index=7)
    assert [p.name for p in paths] == ["frame_000007.png", "frame_000008.png", "frame_000009.png"]
    for p, f in zip(paths, frames):
        with av.open(str(p)) as c:  # an independent PNG decoder (FFmpeg's)
            decoded = next(c.decode(video=0)).to_ndarray(format="rgb24")
        assert np.array_equal(decoded, f)
    # appending more frames continues the numbering without touching the first ones
    more = write_frames_png(tmp_path / "frames", frames[:1], start_index=10)
    assert more[0].name == "frame_000010.png"
    assert len(list((tmp_path / "frames").iterdir())) == 4
