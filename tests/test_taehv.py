"""TAEHV tiny decoder: names, streaming, frame count and alignment with the Wan VAE, loading."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sf_core.errors import CheckpointError, SelfForcingError
from sf_core.latents import normalize
from sf_core.vae import TAEHV, WanVAE, infer_taehv_config, load_decoder, load_vae
from fixtures import key_list
from fixtures.vae import (
    make_tiny_taehv_state_dict,
    make_tiny_wan_vae_state_dict,
    save_state_dict,
    write_tiny_taehv,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = (32, 16, 8, 8)


@pytest.fixture(scope="module")
def sd():
    return make_tiny_taehv_state_dict(TINY, seed=0)


@pytest.fixture(scope="module")
def tae(sd):
    return TAEHV.from_state_dict(sd)


def _z(b=1, t=7, h=2, w=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 16, t, h, w, generator=g)


def test_real_key_list_matches_meta_module():
    keys = key_list("taehv_wan21")
    expected = {k: tuple(v[0]) for k, v in keys.items()}
    cfg = infer_taehv_config({k: torch.empty(s, device="meta") for k, s in expected.items()})
    assert cfg.decoder_channels == (256, 128, 64, 64) and cfg.encoder_channels == 64
    assert cfg.latent_channels == 16 and cfg.patch_size == 1 and cfg.has_encoder
    with torch.device("meta"):
        module = TAEHV(cfg)
    assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == expected
    tiny = make_tiny_taehv_state_dict(TINY)
    assert set(tiny) == set(expected)
    assert all(tiny[k].ndim == len(s) for k, s in expected.items())


def test_frame_count_range_and_content(tae):
    for t in (1, 2, 5):
        out = tae.decode_normalized(_z(t=t, seed=t))
        assert out.shape == (1, 3, 1 + 4 * (t - 1), 16, 24)
        assert out.min() >= -1 and out.max() <= 1 and out.std() > 0.05
        assert tae.num_frames(t) == out.shape[2]


@pytest.mark.parametrize("chunks", [(1, 3, 3), (3, 3, 1), (2, 1, 4), (1,) * 7])
@pytest.mark.parametrize("per_step", [1, None])
def test_stream_equals_whole(tae, chunks, per_step):
    z = _z(t=sum(chunks), seed=1)
    whole = tae.decode_all_at_once(z)  # every frame through each layer together, zero memory at start
    assert whole.shape[2] == 25
    s = tae.stream_decoder(latents_per_step=per_step)
    outs, start = [], 0
    for i, c in enumerate(chunks):
        o = s.decode_normalized(z[:, :, start : start + c])
        assert o.shape[2] == (1 + 4 * (c - 1) if i == 0 else 4 * c)
        outs.append(o)
        start += c
    torch.testing.assert_close(torch.cat(outs, 2), whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(tae.decode_normalized(z), whole, rtol=0, atol=1e-5)


def test_reads_normalized_latents(tae):
    z = _z(t=3, seed=2)
    mu = z * 2.0 + 0.5  # some un-normalised latent
    torch.testing.assert_close(tae.decode(mu), tae.decode_normalized(normalize(mu)), rtol=0, atol=1e-5)
    assert (tae.decode(mu) - tae.decode_normalized(mu)).abs().max() > 1e-2


def test_batch_two_and_two_streams(tae):
    z = _z(b=2, t=4, seed=3)
    s1, s2 = tae.stream_decoder(), tae.stream_decoder()
    a = torch.cat([s1.decode_normalized(z[:, :, :1]), s1.decode_normalized(z[:, :, 1:])], 2)
    b0 = torch.cat([s2.decode_normalized(z[1:, :, :2]), s2.decode_normalized(z[1:, :, 2:])], 2)
    for i in range(2):
        torch.testing.assert_close(a[i : i + 1], tae.decode_normalized(z[i : i + 1]), rtol=0, atol=1e-5)
    torch.testing.assert_close(b0, a[1:], rtol=0, atol=1e-5)


def test_frames_line_up_with_wan_vae(tae):
    """Same latent -> same frame count, same per-chunk counts and the same causal boundaries."""
    wan = WanVAE.from_state_dict(make_tiny_wan_vae_state_dict(base_dim=8))
    mu = _z(t=5, seed=4) * 1.5
    assert tae.decode(mu).shape == wan.decode(mu).shape == (1, 3, 17, 16, 24)
    sw, st = wan.stream_decoder(), tae.stream_decoder()
    for a, b in ((0, 1), (1, 3), (3, 5)):
        assert sw.decode(mu[:, :, a:b]).shape == st.decode(mu[:, :, a:b]).shape
    for k in (0, 1, 3):
        mu2 = mu.clone()
        mu2[:, :, k] += 2.0
        first = 0 if k == 0 else 1 + 4 * (k - 1)
        for dec in (wan, tae):
            a, b = dec.decode(mu), dec.decode(mu2)
            assert torch.equal(a[:, :, :first], b[:, :, :first]), (type(dec).__name__, k)
            assert (a[:, :, first] - b[:, :, first]).abs().max() > 1e-4, (type(dec).__name__, k)


def test_wide_tgrow_layout_is_patched(sd):
    wide = make_tiny_taehv_state_dict(TINY, seed=0, wide_first_tgrow=True)
    assert wide["decoder.7.conv.weight"].shape[0] == 2 * sd["decoder.7.conv.weight"].shape[0]
    a = TAEHV.from_state_dict(wide)
    assert torch.equal(a.decoder[7].conv.weight, sd["decoder.7.conv.weight"])  # the last half is kept
    z = _z(t=2, seed=5)
    torch.testing.assert_close(a.decode_normalized(z), TAEHV.from_state_dict(sd).decode_normalized(z), rtol=0, atol=0)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_file_round_trip_and_detection(tmp_path, tae, suffix):
    path = write_tiny_taehv(tmp_path / f"taew2_1{suffix}", TINY, seed=0, dtype=torch.float16)  # fp16 like the real file
    dec = load_decoder(path)
    assert isinstance(dec, TAEHV) and dec.dtype == torch.float32 and not hasattr(dec, "encoder")
    assert dec.config.decoder_channels == TINY
    sd16 = make_tiny_taehv_state_dict(TINY, seed=0, dtype=torch.float16)
    loaded = dec.state_dict()
    assert set(loaded) == {k for k in sd16 if k.startswith("decoder.")}
    for k, v in loaded.items():
        assert torch.equal(v, sd16[k].float()), k
    z = _z(t=2, seed=6)
    torch.testing.assert_close(dec.decode_normalized(z), tae.decode_normalized(z), rtol=0, atol=5e-3)
    with pytest.raises(CheckpointError, match="TAEHV tiny decoder, not the full Wan2.1 VAE"):
        load_vae(path)


def test_strict_names(sd):
    extra = dict(sd)
    extra["decoder.23.weight"] = torch.zeros(3, 3, 3, 3)
    with pytest.raises(CheckpointError, match=r"unexpected 1: decoder\.23\.weight"):
        TAEHV.from_state_dict(extra)
    missing = {k: v for k, v in sd.items() if k != "decoder.16.conv.2.bias"}
    with pytest.raises(CheckpointError, match=r"missing 1: decoder\.16\.conv\.2\.bias"):
        TAEHV.from_state_dict(missing)


def test_wrong_files(tmp_path):
    with pytest.raises(CheckpointError, match="Wan-style VAE"):
        TAEHV.from_state_dict(make_tiny_wan_vae_state_dict(base_dim=8))
    dit = save_state_dict({"patch_embedding.weight": torch.zeros(8, 16, 1, 2, 2),
                           "blocks.0.self_attn.q.weight": torch.zeros(8, 8)}, tmp_path / "dit.pth")
    with pytest.raises(CheckpointError, match=r"dit\.pth: not a video decoder.*diffusion model \(DiT\)"):
        load_decoder(dit)
    other = make_tiny_taehv_state_dict(TINY)
    other["decoder.1.weight"] = torch.zeros(32, 48, 3, 3)  # a TAEHV for another latent space
    with pytest.raises(CheckpointError, match="48 latent channels"):
        TAEHV.from_state_dict(other)


def test_odd_latent_shapes(tae):
    s = tae.stream_decoder()
    with pytest.raises(SelfForcingError, match=r"permute\(0, 2, 1, 3, 4\)"):
        s.decode_normalized(torch.zeros(1, 5, 16, 2, 2))
    with pytest.raises(SelfForcingError, match="5 dimensions"):
        s.decode_normalized(torch.zeros(16, 5, 2, 2))
    s.decode_normalized(torch.zeros(1, 16, 2, 2, 2))
    with pytest.raises(SelfForcingError, match="reset"):
        s.decode_normalized(torch.zeros(1, 16, 1, 3, 2))
    with pytest.raises(ValueError):
        tae.stream_decoder(latents_per_step=0)


def test_encoder_shape():
    full = TAEHV.from_state_dict(make_tiny_taehv_state_dict(TINY, seed=1))
    g = torch.Generator().manual_seed(7)
    video = torch.rand(2, 3, 9, 16, 24, generator=g) * 2 - 1
    z = full.encode_normalized(video)
    assert z.shape == (2, 16, 3, 2, 3)
    torch.testing.assert_close(full.encode_normalized(video[1:]), z[1:], rtol=0, atol=1e-5)
    with pytest.raises(SelfForcingError, match="multiple of 8"):
        full.encode_normalized(torch.zeros(1, 3, 5, 12, 16))


def _comfyui_path() -> str | None:
    for p in (os.environ.get("COMFYUI_DIR"),):
        if p and (Path(p) / "comfy" / "taesd" / "taehv.py").is_file():
            return p
    return None


@pytest.mark.skipif(_comfyui_path() is None, reason="COMFYUI_DIR is not set: point it at a ComfyUI checkout to compare with ComfyUI's decoder")
def test_matches_comfyui_taehv(tmp_path):
    """Cross-check with ComfyUI's TAEHV (its parallel mode) on the real channel layout."""
    path = save_state_dict(make_tiny_taehv_state_dict((256, 128, 64, 64), encoder_channels=64, seed=2),
                           tmp_path / "taew2_1.safetensors")
    script = textwrap.dedent(
        f"""
        import sys, torch
        torch.set_num_threads(1)
        sys.path.insert(0, {_comfyui_path()!r}); sys.argv = ["x", "--cpu"]
        import comfy.options; comfy.options.enable_args_parsing()
        import comfy.taesd.taehv as ct
        from safetensors.torch import load_file
        ref = ct.TAEHV(16, parallel=True, decoder_time_upscale=(True, True), show_progress_bar=False)
        ref.load_state_dict(load_file({str(path)!r}), strict=True)
        ref.eval()
        z = torch.randn(1, 16, 3, 2, 3, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.save({{"z": z, "out": ref.decode(z).clamp(0, 1)}}, {str(tmp_path / "ref.pt")!r})
        """
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    if r.returncode != 0:
        pytest.skip(f"ComfyUI could not run here: {r.stderr.strip().splitlines()[-1:]}")
    ref = torch.load(tmp_path / "ref.pt")
    ours = load_decoder(path)
    torch.testing.assert_close(ours.decode_normalized(ref["z"]), ref["out"] * 2 - 1, rtol=0, atol=5e-5)
