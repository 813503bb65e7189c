"""Streaming encode: the Wan VAE and TAEHV encoders fed frames chunk by chunk equal a whole-video encode."""

from __future__ import annotations

import pytest
import torch

from sf_core.errors import SelfForcingError
from sf_core.latents import normalize
from sf_core.vae import TAEHV, WanVAE
from fixtures.vae import make_tiny_taehv_state_dict, make_tiny_wan_vae_state_dict


@pytest.fixture(scope="module")
def wan():
    return WanVAE.from_state_dict(make_tiny_wan_vae_state_dict(base_dim=8, seed=3))


@pytest.fixture(scope="module")
def tae():
    return TAEHV.from_state_dict(make_tiny_taehv_state_dict(seed=4))


def _video(t, seed=0, h=16, w=24):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, t, h, w, generator=g) * 2 - 1


def _feed(enc, video, splits, normalized=False):
    outs, counts, start = [], [], 0
    for n in splits:
        part = video[:, :, start : start + n]
        o = enc.encode_normalized(part) if normalized else enc.encode(part)
        outs.append(o)
        counts.append(o.shape[2])
        start += n
    assert start == video.shape[2]
    return outs, counts


@pytest.mark.parametrize("splits", [(9, 12, 12), (1, 4, 4, 4, 4, 4, 4, 4, 4), (3, 7, 2, 11, 10), (33,)])
def test_wan_stream_encode_equals_whole(wan, splits):
    video = _video(33)
    whole = wan.encode_all_at_once(video)  # every frame through each layer in one pass: no state carried
    enc = wan.stream_encoder()
    outs, counts = _feed(enc, video, splits)
    assert enc.flush().shape[2] == 0 and enc.dropped == 0
    got = torch.cat(outs, dim=2)
    assert got.shape == whole.shape == (1, 16, 9, 2, 3)
    torch.testing.assert_close(got, whole, rtol=0, atol=2e-5)
    if splits == (9, 12, 12):  # 1 + 4k frames give 1 + k latent frames at once, then 4k give k
        assert counts == [3, 3, 3]


def test_wan_stream_encode_normalized_and_leftover_frames(wan):
    video = _video(15, seed=1)
    enc = wan.stream_encoder()
    z = torch.cat([enc.encode_normalized(video[:, :, :9]), enc.encode_normalized(video[:, :, 9:])], dim=2)
    assert z.shape[2] == 4 and enc.pending == 2  # 1 + 4 + 4 + 4 frames used; frames 13, 14 wait for more
    torch.testing.assert_close(z, normalize(wan.encode_all_at_once(video[:, :, :13])), rtol=0, atol=2e-5)
    assert enc.flush().shape[2] == 0 and enc.dropped == 2


def test_taehv_stream_encode_equals_whole(tae):
    video = _video(33, seed=2)
    whole = tae.encode_normalized(video)  # the published parallel mode: frames padded at the end
    enc = tae.stream_encoder()
    outs, counts = _feed(enc, video, (9, 12, 12), normalized=True)
    assert counts == [2, 3, 3] and enc.pending == 1  # latent k needs frames 4k..4k+3: one frame waits
    outs.append(enc.flush_normalized())
    got = torch.cat(outs, dim=2)
    assert got.shape == whole.shape == (1, 16, 9, 2, 3)
    torch.testing.assert_close(got, whole, rtol=0, atol=2e-5)


@pytest.mark.parametrize("splits", [(1,) * 21, (5, 16), (4, 4, 4, 4, 4, 1)])
def test_taehv_stream_encode_any_split(tae, splits):
    video = _video(21, seed=5)
    enc = tae.stream_encoder()
    outs, _ = _feed(enc, video, splits)
    got = torch.cat(outs + [enc.flush()], dim=2)
    torch.testing.assert_close(got, tae.encode(video), rtol=0, atol=2e-5)


def test_stream_encoders_are_causal(wan, tae):
    """Changing frame 20 changes no latent frame before the one that holds it."""
    video = _video(25, seed=6)
    other = video.clone()
    other[:, :, 20] = -other[:, :, 20]
    for model, first_changed in ((wan, 5), (tae, 5)):  # wan: frame 20 is in latent 5 (17..20); taehv: 20..23
        a, b = model.stream_encoder(), model.stream_encoder()
        za = torch.cat([a.encode(video), a.flush()], dim=2)
        zb = torch.cat([b.encode(other), b.flush()], dim=2)
        diff = (za - zb).abs().amax(dim=(0, 1, 3, 4))
        assert diff[:first_changed].max() == 0 and diff[first_changed] > 1e-4


def test_stream_encoder_refuses_bad_frames(wan, tae):
    enc = wan.stream_encoder()
    enc.encode(_video(1))
    with pytest.raises(SelfForcingError, match="started with batch 1 and frames of 24x16"):
        enc.encode(_video(4, h=32))
    with pytest.raises(SelfForcingError, match="multiple of 8"):
        tae.stream_encoder().encode(_video(4, h=12))
    with pytest.raises(SelfForcingError, match=r"\[B, 3, n, H, W\]"):
        wan.stream_encoder().encode(torch.zeros(3, 4, 16, 16))
