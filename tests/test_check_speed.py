"""The GPU check script (tests/gpu/check_speed.py) in its CPU form: it runs and its JSON is complete and sane."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_check_speed_tiny_prints_one_sane_json():
    res = subprocess.run([sys.executable, str(ROOT / "tests" / "gpu" / "check_speed.py"), "--config", "tiny",
                          "--modes", "eager,fp8+compile+graphs", "--no-compile"],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout)  # exactly one JSON document on stdout
    assert "error" not in res.stdout, res.stdout
    assert report["config"] == "tiny" and report["device"] == "cpu" and report["skipped"] == []
    assert (report["window"], report["sink"], report["frames_per_chunk"]) == (12, 3, 3)
    for name, m in report["modes"].items():
        s = m["seconds_per_chunk_median"]
        assert s > 0 and abs(m["latent_fps_dit"] - 3 / s) < 0.02 * m["latent_fps_dit"] + 0.01, name
        assert abs(m["video_fps_dit"] - 4 * m["latent_fps_dit"]) < 0.05 * m["video_fps_dit"] + 0.01, name
        assert m["video_fps_with_taehv_overlapped"] > 0 and m["first_chunk_latency_s"] > 0, name
        ratio = m["video_fps_with_taehv_overlapped"] / m["latent_fps_with_taehv_overlapped"]
        assert abs(ratio - 4) < 0.05, name  # 4 video frames per latent frame after the first chunk
        assert m["first_frame_latency_s_taehv_overlapped"] > 0 and m["peak_rss_mib"] > 0, name
    assert report["modes"]["eager"]["relative_difference_to_first_mode"] == 0
    assert 0 < report["modes"]["fp8+compile+graphs"]["relative_difference_to_first_mode"] < 0.1  # fp8 rounding
    graphs = report["modes"]["fp8+compile+graphs"]["graphs"]
    assert graphs["static"] > 0 and graphs["fallback"] is None  # full-window chunks ran as static steps
    assert 0.2 < report["long"]["chunk60_over_chunk10"] < 5  # per-chunk cost does not grow with length
    assert report["wan_vae"]["wan_vae_decode_s_per_chunk"] > 0
    train = report["train"]
    assert train["latent_frames"] == 21 and train["seconds_generator_step"] > 0 and train["seconds_critic_step"] > 0
