"""Wan2.1 VAE: streaming decode, causality, encode, loading with strict names, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sf_core.errors import CheckpointError, SelfForcingError
from sf_core.latents import denormalize
from sf_core.vae import WanVAE, WanVAEConfig, infer_wan_vae_config, load_decoder, load_vae
from fixtures import key_list
from fixtures.vae import make_tiny_wan_vae_state_dict, save_state_dict, write_tiny_wan_vae

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sd():
    return make_tiny_wan_vae_state_dict(base_dim=8, seed=0)


@pytest.fixture(scope="module")
def vae(sd):
    return WanVAE.from_state_dict(sd)


def _latent(b=1, t=7, h=2, w=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 16, t, h, w, generator=g) * 1.5


# ------------------------------------------------------------------------------------------
# decode
# ------------------------------------------------------------------------------------------
def test_decode_shape_range_and_content(vae):
    for t in (1, 2, 4):
        mu = _latent(t=t, seed=t)
        out = vae.decode(mu)
        assert out.shape == (1, 3, 1 + 4 * (t - 1), 16, 24)
        assert out.min() >= -1.0 and out.max() <= 1.0
        assert out.std() > 0.05  # not a constant image
        assert vae.num_frames(t) == out.shape[2]


@pytest.mark.parametrize("chunks", [(1, 3, 3), (3, 3, 1), (2, 1, 4), (1,) * 7, (7,)])
def test_stream_equals_whole(vae, chunks):
    mu = _latent(t=sum(chunks))
    whole = vae.decode(mu)
    parallel = vae.decode_all_at_once(mu)  # all frames through each layer together: no cache carried
    stream = vae.stream_decoder()
    outs, start = [], 0
    for i, c in enumerate(chunks):
        o = stream.decode(mu[:, :, start : start + c])
        assert o.shape[2] == (1 + 4 * (c - 1) if i == 0 else 4 * c)
        outs.append(o)
        start += c
    got = torch.cat(outs, dim=2)
    assert got.shape == whole.shape
    torch.testing.assert_close(got, whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(whole, parallel, rtol=0, atol=1e-5)
    assert stream.latents_in == 7 and stream.frames_out == 25


def test_decode_normalized_converts(vae):
    z = _latent(t=3, seed=4)
    a = vae.decode_normalized(z)
    torch.testing.assert_close(a, vae.decode(denormalize(z)), rtol=0, atol=1e-5)
    assert (a - vae.decode(z)).abs().max() > 1e-2  # the conversion matters
    s = vae.stream_decoder()
    b = torch.cat([s.decode_normalized(z[:, :, :1]), s.decode_normalized(z[:, :, 1:])], dim=2)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_batch_of_two_equals_single(vae):
    mu = _latent(b=2, t=4, seed=5)
    s = vae.stream_decoder()
    both = torch.cat([s.decode(mu[:, :, :1]), s.decode(mu[:, :, 1:])], dim=2)
    for i in range(2):
        torch.testing.assert_close(both[i : i + 1], vae.decode(mu[i : i + 1]), rtol=0, atol=1e-5)


def test_two_streams_do_not_interfere(vae):
    a, b = _latent(t=4, seed=6), _latent(t=4, seed=7)
    sa, sb = vae.stream_decoder(), vae.stream_decoder()
    oa, ob = [], []
    for i in range(4):
        oa.append(sa.decode(a[:, :, i : i + 1]))
        ob.append(sb.decode(b[:, :, i : i + 1]))
    torch.testing.assert_close(torch.cat(oa, 2), vae.decode(a), rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat(ob, 2), vae.decode(b), rtol=0, atol=1e-5)


def test_reset_starts_a_new_video(vae):
    a, b = _latent(t=2, seed=8), _latent(t=2, seed=9, h=3, w=2)
    s = vae.stream_decoder()
    s.decode(a)
    s.reset()
    torch.testing.assert_close(s.decode(b), vae.decode(b), rtol=0, atol=1e-5)


@pytest.mark.parametrize("k", [1, 3])
def test_decode_is_causal_and_aligned(vae, k):
    """Latent frame k (k >= 1) affects frames 4k-3 onwards and nothing before."""
    mu = _latent(t=5, seed=10)
    mu2 = mu.clone()
    mu2[:, :, k] += 2.0
    a, b = vae.decode(mu), vae.decode(mu2)
    first = 1 + 4 * (k - 1)
    assert torch.equal(a[:, :, :first], b[:, :, :first])
    assert (a[:, :, first] - b[:, :, first]).abs().max() > 1e-3


def test_first_latent_gives_first_frame_only(vae):
    mu = _latent(t=3, seed=11)
    mu2 = mu.clone()
    mu2[:, :, 0] -= 2.0
    a, b = vae.decode(mu), vae.decode(mu2)
    assert (a[:, :, 0] - b[:, :, 0]).abs().max() > 1e-3
    assert vae.decode(mu[:, :, :1]).shape[2] == 1


# ------------------------------------------------------------------------------------------
# encode
# ------------------------------------------------------------------------------------------
def test_encode_shape_chunking_and_causality(vae):
    g = torch.Generator().manual_seed(12)
    video = torch.rand(1, 3, 9, 32, 24, generator=g) * 2 - 1
    mu = vae.encode(video)
    assert mu.shape == (1, 16, 3, 4, 3)
    # 1, 4, 4 frames with the causal cache == all 9 frames in one pass
    torch.testing.assert_close(mu, vae.encode_all_at_once(video), rtol=0, atol=1e-5)
    # frames 1..4 make latent 1, frames 5..8 latent 2
    v2 = video.clone()
    v2[:, :, 5] = -v2[:, :, 5]
    mu2 = vae.encode(v2)
    assert torch.equal(mu[:, :, :2], mu2[:, :, :2])
    assert (mu[:, :, 2] - mu2[:, :, 2]).abs().max() > 1e-4
    assert vae.encode(video[:, :, :1]).shape == (1, 16, 1, 4, 3)


def test_encode_rejects_bad_video(vae):
    with pytest.raises(SelfForcingError, match=r"1 \+ 4"):
        vae.encode(torch.zeros(1, 3, 8, 16, 16))
    with pytest.raises(SelfForcingError, match="multiple of 8"):
        vae.encode(torch.zeros(1, 3, 5, 20, 16))
    with pytest.raises(SelfForcingError, match=r"\[B, 3, T, H, W\]"):
        vae.encode(torch.zeros(3, 5, 16, 16))


# ------------------------------------------------------------------------------------------
# files and names
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_tiny_file_round_trip(tmp_path, sd, vae, suffix):
    path = write_tiny_wan_vae(tmp_path / f"wan_2.1_vae{suffix}", base_dim=8, seed=0)
    full = load_vae(path)
    assert full.config == WanVAEConfig(dim=8)
    loaded = full.state_dict()
    assert set(loaded) == set(sd)
    for k, v in sd.items():
        assert torch.equal(loaded[k], v), k
    dec = load_decoder(path)
    assert isinstance(dec, WanVAE) and not hasattr(dec, "encoder")  # decoder only
    mu = _latent(t=2, seed=13)
    torch.testing.assert_close(dec.decode(mu), vae.decode(mu), rtol=0, atol=0)


def test_bf16_file_loads_into_fp32(tmp_path, sd):
    path = save_state_dict({k: v.to(torch.bfloat16) for k, v in sd.items()}, tmp_path / "v.safetensors")
    vae = load_vae(path)
    assert vae.dtype == torch.float32
    assert torch.equal(vae.state_dict()["decoder.conv1.weight"], sd["decoder.conv1.weight"].to(torch.bfloat16).float())


def test_nested_and_prefixed_state_dict(tmp_path, sd):
    path = tmp_path / "nested.pt"
    torch.save({"state_dict": {"first_stage_model." + k: v for k, v in sd.items()}}, path)
    assert load_vae(path).config.dim == 8
    # a whole-pipeline checkpoint: the VAE sits under a prefix next to the diffusion model
    both = {"model.diffusion_model.patch_embedding.weight": torch.zeros(8, 16, 1, 2, 2)}
    both.update({"first_stage_model." + k: v for k, v in sd.items()})
    path2 = save_state_dict(both, tmp_path / "all_in_one.safetensors")
    assert isinstance(load_decoder(path2), WanVAE)


def test_strict_names(sd):
    extra = dict(sd)
    extra["decoder.upsamples.0.residual.2.lora_A"] = torch.zeros(2)
    with pytest.raises(CheckpointError, match=r"unexpected 1: decoder\.upsamples\.0\.residual\.2\.lora_A"):
        WanVAE.from_state_dict(extra)
    missing = {k: v for k, v in sd.items() if k != "decoder.middle.1.proj.bias"}
    with pytest.raises(CheckpointError, match=r"missing 1: decoder\.middle\.1\.proj\.bias"):
        WanVAE.from_state_dict(missing)
    wrong = dict(sd)
    wrong["decoder.head.0.gamma"] = torch.ones(9, 1, 1, 1)
    with pytest.raises(CheckpointError, match=r"wrong shape 1: decoder\.head\.0\.gamma \(9, 1, 1, 1\)"):
        WanVAE.from_state_dict(wrong)


def test_config_inferred_from_shapes():
    sd16 = make_tiny_wan_vae_state_dict(base_dim=16, seed=1)
    assert infer_wan_vae_config(sd16) == WanVAEConfig(dim=16)
    dec_only = {k: v for k, v in sd16.items() if k.startswith(("decoder.", "conv2."))}
    cfg = infer_wan_vae_config(dec_only)
    assert cfg.dim == 16 and cfg.dim_mult == (1, 2, 4, 4) and not cfg.has_encoder
    with pytest.raises(CheckpointError, match="no encoder"):
        from sf_core.vae import vae_from_state_dict

        vae_from_state_dict(dec_only)


def test_real_key_list_matches_meta_module():
    keys = key_list("wan21_vae")
    expected = {k: tuple(v[0]) for k, v in keys.items()}
    meta_sd = {k: torch.empty(s, device="meta") for k, s in expected.items()}
    cfg = infer_wan_vae_config(meta_sd)
    # REFERENCE.md section 8: dim 96, mult [1, 2, 4, 4], 2 res blocks, z 16; strides (4, 8, 8)
    assert cfg == WanVAEConfig(dim=96, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2,
                               temporal_downsample=(False, True, True), has_encoder=True)
    assert cfg.temporal_stride == 4 and cfg.spatial_stride == 8
    with torch.device("meta"):
        module = WanVAE(cfg)
    got = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert got == expected
    # the tiny test file has exactly the real names and ranks
    tiny = make_tiny_wan_vae_state_dict(base_dim=8)
    assert set(tiny) == set(expected)
    assert all(tiny[k].ndim == len(s) for k, s in expected.items())


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------
def _dit_like():
    return {
        "patch_embedding.weight": torch.zeros(8, 16, 1, 2, 2),
        "text_embedding.0.weight": torch.zeros(8, 4),
        "blocks.0.self_attn.q.weight": torch.zeros(8, 8),
        "head.head.weight": torch.zeros(64, 8),
    }


def test_dit_passed_as_vae(tmp_path):
    path = save_state_dict(_dit_like(), tmp_path / "wan2.1_t2v_1.3B_bf16.safetensors")
    for loader in (load_vae, load_decoder):
        with pytest.raises(CheckpointError) as e:
            loader(path)
        msg = str(e.value)
        assert "wan2.1_t2v_1.3B_bf16.safetensors" in msg
        assert "diffusion model (DiT)" in msg  # what was found
        assert "decoder.conv1.weight" in msg  # what was expected


def test_text_encoder_passed_as_vae(tmp_path):
    path = save_state_dict({"shared.weight": torch.zeros(4, 4), "encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(4, 4)},
                           tmp_path / "umt5.safetensors")
    with pytest.raises(CheckpointError, match="text encoder"):
        load_vae(path)


def test_odd_latent_shapes(vae):
    s = vae.stream_decoder()
    with pytest.raises(SelfForcingError, match="5 dimensions"):
        s.decode(torch.zeros(16, 2, 2, 2))
    with pytest.raises(SelfForcingError, match="16 channels"):
        s.decode(torch.zeros(1, 4, 2, 2, 2))
    with pytest.raises(SelfForcingError, match=r"permute\(0, 2, 1, 3, 4\)"):
        s.decode(torch.zeros(1, 3, 16, 2, 2))
    with pytest.raises(SelfForcingError, match="empty"):
        s.decode(torch.zeros(1, 16, 0, 2, 2))
    with pytest.raises(SelfForcingError, match="floating"):
        s.decode(torch.zeros(1, 16, 1, 2, 2, dtype=torch.int64))
    s.decode(torch.zeros(1, 16, 1, 2, 2))
    with pytest.raises(SelfForcingError, match="reset"):
        s.decode(torch.zeros(1, 16, 1, 2, 4))
    with pytest.raises(SelfForcingError, match="reset"):
        s.decode(torch.zeros(2, 16, 1, 2, 2))
    assert s.latents_in == 1  # rejected chunks changed nothing


# ------------------------------------------------------------------------------------------
# optional cross-check against ComfyUI's own Wan VAE (skipped when ComfyUI is not present)
# ------------------------------------------------------------------------------------------
def _comfyui_path() -> str | None:
    for p in (os.environ.get("COMFYUI_DIR"),):
        if p and (Path(p) / "comfy" / "ldm" / "wan" / "vae.py").is_file():
            return p
    return None


@pytest.mark.skipif(_comfyui_path() is None, reason="COMFYUI_DIR is not set: point it at a ComfyUI checkout to compare with ComfyUI's decoder")
def test_matches_comfyui_wan_vae(tmp_path):
    path = write_tiny_wan_vae(tmp_path / "tiny.safetensors", base_dim=8, seed=3)
    script = textwrap.dedent(
        f"""
        import sys, torch
        torch.set_num_threads(1)
        sys.path.insert(0, {_comfyui_path()!r}); sys.argv = ["x", "--cpu"]
        import comfy.options; comfy.options.enable_args_parsing()
        import comfy.ldm.wan.vae as cv
        from safetensors.torch import load_file
        ref = cv.WanVAE(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                        temperal_downsample=[False, True, True])
        ref.load_state_dict(load_file({str(path)!r}), strict=True)
        ref.eval()
        g = torch.Generator().manual_seed(0)
        mu = torch.randn(2, 16, 4, 2, 3, generator=g) * 1.5
        video = torch.rand(1, 3, 5, 16, 24, generator=g) * 2 - 1
        with torch.no_grad():
            torch.save({{"mu": mu, "out": ref.decode(mu).clamp(-1, 1), "video": video, "enc": ref.encode(video)}},
                       {str(tmp_path / "ref.pt")!r})
        """
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    if r.returncode != 0:
        pytest.skip(f"ComfyUI could not run here: {r.stderr.strip().splitlines()[-1:]}")
    ref = torch.load(tmp_path / "ref.pt")
    ours = load_vae(path)
    torch.testing.assert_close(ours.decode(ref["mu"]), ref["out"], rtol=0, atol=5e-5)
    torch.testing.assert_close(ours.encode(ref["video"]), ref["enc"], rtol=0, atol=5e-5)
