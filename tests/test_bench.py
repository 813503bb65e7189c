"""`python -m sf_core bench`: each mode runs the product's own loops and reports what it measured."""

from __future__ import annotations

import json

import pytest

from sf_core.cli import build_parser, main


def _run(capsys, *argv) -> dict:
    assert main(["bench", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_stream_mode_times_every_chunk_and_a_window_keeps_memory_flat(capsys):
    args = ("--config", "tiny", "--height", "32", "--width", "32", "--window", "6", "--sink", "1", "--warmup", "0",
            "--device", "cpu")
    short, long = _run(capsys, "--chunks", "2", *args), _run(capsys, "--chunks", "4", *args)
    assert long["chunks"] == 4 and len(long["seconds_per_chunk"]) == 4 and len(long["rss_mb"]) == 4
    assert all(t > 0 for t in long["seconds_per_chunk"])
    assert abs(long["video_fps"] - 4 * long["latent_fps"]) < 0.01 * long["video_fps"]  # 4 video frames per latent
    assert long["cache_bytes"] == short["cache_bytes"] > 0  # a rolling cache holds the window, not the video


def test_decode_mode_reports_first_and_later_chunks_apart(capsys):
    out = _run(capsys, "--decode", "--tiny", "--height", "16", "--width", "16", "--chunks", "2",
               "--frames-per-chunk", "2", "--warmup", "0", "--device", "cpu")
    for kind in ("wan", "taehv"):
        r = out["results"][kind]
        assert (r["first_chunk_frames"], r["chunk_frames"]) == (1 + 4 * (2 - 1), 4 * 2)
        assert len(r["chunk_times_s"]) == 2 and r["frames_per_s"] > 0


def test_modes_exclude_each_other():
    parser = build_parser()
    try:
        parser.parse_args(["bench", "--train", "--decode"])
    except SystemExit as e:
        assert e.code == 2
    else:
        raise AssertionError("--train and --decode were accepted together")


@pytest.mark.parametrize("mode", [[], ["--decode"], ["--train"]])
def test_bench_refuses_an_unknown_device_with_exit_2(mode, capsys):
    assert main(["bench", *mode, "--config", "tiny", "--height", "64", "--width", "64", "--chunks", "1",
                 "--device", "foo"]) == 2
    assert "'foo' is not a device" in capsys.readouterr().err
