"""Video-to-video on the stream: strength, the cache's context, input length and size, encoded input."""

import pytest
import torch

from sf_core.errors import SelfForcingError
from sf_core.schedule import FlowSchedule, add_noise, restyle_steps
from sf_core.sources import EncodedVideo, LatentVideo, frame_batches
from sf_core.stream import Stream, StreamSettings

H = W = 8


def _input(frames=9, seed=11):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, frames, H, W, generator=g)


def _run(backbone, text, frames=9, seed=0, video=None, **settings):
    s = Stream(backbone, text, latent_height=H, latent_width=W, num_frames=frames,
               settings=StreamSettings(**settings), generator=seed, video=video)
    return [c for c in s], s


def test_restyle_steps_map_strength_onto_the_step_list():
    steps = (1000.0, 750.0, 500.0, 250.0)
    assert restyle_steps(steps, 1.0) == steps
    assert restyle_steps(steps, 0.0) == ()
    assert restyle_steps(steps, 0.5) == (500.0, 250.0)
    assert restyle_steps(steps, 0.6) == (600.0, 500.0, 250.0)
    assert restyle_steps(steps, 0.1) == (100.0,)
    assert restyle_steps(steps, start_step=1) == (750.0, 500.0, 250.0)
    assert restyle_steps(steps, 0.3, start_step=4) == ()
    for bad in (dict(strength=1.5), dict(strength=-0.1), dict(start_step=5)):
        with pytest.raises(ValueError):
            restyle_steps(steps, **bad)


def test_strength_zero_reproduces_the_input_through_the_cache(backbone, text):
    z = _input()
    chunks, s = _run(backbone, text, video=z, strength=0.0)
    assert torch.equal(torch.cat([c.latents for c in chunks], 2), z)
    # the cache holds what a stream that was handed the input as clean context holds
    ref = Stream(backbone, text, latent_height=H, latent_width=W, num_frames=3, prefix=z[:, :, :6])
    ref._prefill(ref._prompt(0))
    tpf = backbone.config.tokens_per_frame(H, W)
    assert torch.allclose(s.cache.k[:, :, : 6 * tpf], ref.cache.k[:, :, : 6 * tpf], atol=1e-5)
    assert torch.equal(s.cache.latents[:, :, :6], z[:, :, :6])


def test_start_step_past_the_list_is_strength_zero(backbone, text):
    z = _input(6)
    chunks, _ = _run(backbone, text, frames=6, video=z, start_step=4, strength=0.9)
    assert torch.equal(torch.cat([c.latents for c in chunks], 2), z)


@pytest.mark.parametrize("kw", [dict(strength=1.0), dict(start_step=0)])
def test_full_strength_equals_text_to_video(backbone, text, kw):
    t2v, _ = _run(backbone, text, seed=5)
    v2v, _ = _run(backbone, text, seed=5, video=_input(), **kw)
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(t2v, v2v))
    other, _ = _run(backbone, text, seed=5, video=_input(), strength=0.5)
    assert (other[0].latents - t2v[0].latents).abs().max() > 1e-3


def test_partial_strength_is_the_few_step_sampler_from_the_noised_input(backbone, text):
    """Chunk 0 at strength 0.5 by hand: the input noised to step 500 with the chunk's reference noise, then
    the steps 500 and 250 under the prompt (the per-step noise comes from the stream's second generator)."""
    z = _input(3)
    chunks, _ = _run(backbone, text, frames=3, seed=2, video=z, strength=0.5)
    g = torch.Generator().manual_seed(2)
    steps_g = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=g)))
    sched = FlowSchedule(5.0)
    ts = sched.warp([500, 250])
    sig = [sched.sigma_of(t) for t in ts]
    ref = torch.randn(1, 3, 16, H, W, generator=g).transpose(1, 2)
    step_noise = torch.randn(3, 1, 16, 3, H, W, generator=steps_g)
    from sf_core.cache import KVCache

    cache = KVCache(backbone.config, 1, H, W, 3)
    prompt = backbone.encode_text(text)
    x = add_noise(z, ref, sig[0])
    for i in range(2):
        x0 = x - sig[i] * backbone(x, torch.full((1, 3), ts[i]), prompt, range(3), cache.write_plan(0, 3))
        if i == 0:
            x = add_noise(x0, step_noise[0], sig[1])
    assert torch.allclose(chunks[0].latents, x0, atol=1e-5)


def test_context_input_puts_the_input_frames_in_the_cache(backbone, text):
    z = _input()
    gen, sg = _run(backbone, text, video=z, strength=0.5)
    inp, si = _run(backbone, text, video=z, strength=0.5, context="input")
    assert torch.equal(gen[0].latents, inp[0].latents)  # chunk 0 sees an empty cache either way
    assert (gen[1].latents - inp[1].latents).abs().max() > 1e-4  # chunk 1 attends to different context
    assert torch.equal(si.cache.latents[:, :, :6], z[:, :, :6])
    assert torch.equal(sg.cache.latents[:, :, :3], gen[0].latents)
    ref = Stream(backbone, text, latent_height=H, latent_width=W, num_frames=3, prefix=z[:, :, :6])
    ref._prefill(ref._prompt(0))
    tpf = backbone.config.tokens_per_frame(H, W)
    assert torch.allclose(si.cache.k[:, :, : 6 * tpf], ref.cache.k[:, :, : 6 * tpf], atol=1e-5)


def test_short_input_ends_the_stream(backbone, text):
    chunks, s = _run(backbone, text, frames=12, video=_input(5), strength=0.5)
    assert [(c.start, c.latents.shape[2], c.last) for c in chunks] == [(0, 3, False), (3, 2, True)]
    assert s.input_ended
    chunks, s = _run(backbone, text, frames=12, video=_input(6), strength=0.5)
    assert [c.start for c in chunks] == [0, 3] and s.input_ended  # ends at a chunk boundary too


def test_input_of_another_size_is_refused(backbone, text):
    with pytest.raises(SelfForcingError, match=r"input video is 128x64 pixels .* this stream makes 64x64"):
        _run(backbone, text, video=torch.zeros(1, 16, 9, 8, 16))
    with pytest.raises(SelfForcingError, match="cannot be combined"):
        Stream(backbone, text, latent_height=H, latent_width=W, num_frames=3, prefix=_input(1), video=_input())
    with pytest.raises(SelfForcingError, match="strength"):
        StreamSettings(strength=2.0)
    with pytest.raises(SelfForcingError, match="context"):
        StreamSettings(context="teacher")


def test_encoded_pixel_input_equals_pre_encoded_latents(backbone, text):
    """Pixels encoded chunk by chunk as the stream asks equal the whole video encoded up front."""
    from sf_core.vae import WanVAE
    from fixtures.vae import make_tiny_wan_vae_state_dict

    vae = WanVAE.from_state_dict(make_tiny_wan_vae_state_dict(base_dim=8, seed=1))
    g = torch.Generator().manual_seed(3)
    frames = (torch.rand(33, H * 8, W * 8, 3, generator=g) * 255).round().to(torch.uint8)
    video = (frames.float() / 255 * 2 - 1).permute(3, 0, 1, 2)[None]
    whole = vae.encode_normalized(video)
    source = EncodedVideo(frame_batches(frames), vae.stream_encoder())
    a, _ = _run(backbone, text, video=source, strength=0.6)
    b, _ = _run(backbone, text, video=LatentVideo(whole), strength=0.6)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        torch.testing.assert_close(x.latents, y.latents, rtol=0, atol=1e-4)
    assert source.frames_read <= 33
