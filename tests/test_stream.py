"""The chunk loop: determinism, schedule, prompt switching, prefixes, bad settings."""

import pytest
import torch

from sf_core.cache import KVCache
from sf_core.errors import SelfForcingError
from sf_core.schedule import FlowSchedule, add_noise, flow_to_x0, x0_to_flow
from sf_core.stream import PromptSegment, PromptTimeline, Stream, StreamSettings, chunk_at_seconds
from sf_core.wan import BlockCausal

H = W = 8


def _run(backbone, prompts, frames=9, seed=0, **settings):
    s = Stream(backbone, prompts, latent_height=H, latent_width=W, num_frames=frames,
               settings=StreamSettings(**settings), generator=seed)
    return [c for c in s], s


def test_warped_steps_match_the_paper():
    sched = FlowSchedule(shift=5.0)
    assert sched.warp([1000, 750, 500, 250]) == pytest.approx([1000.0, 937.5, 833.333, 625.0], abs=1e-2)
    assert [sched.sigma_of(t) for t in sched.warp([1000, 750, 500, 250])] == pytest.approx(
        [1.0, 0.9375, 0.8333, 0.625], abs=1e-3)


def test_flow_conversions_round_trip():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 16, 3, 4, 4, generator=g), torch.randn(2, 16, 3, 4, 4, generator=g)
    xt = add_noise(x0, eps, 0.7)
    v = eps - x0
    assert torch.allclose(flow_to_x0(xt, v, 0.7), x0, atol=1e-5)
    assert torch.allclose(x0_to_flow(xt, x0, 0.7), v, atol=1e-5)


def test_chunks_have_the_right_frames_and_flags(backbone, text):
    chunks, stream = _run(backbone, text, frames=8)  # 3 + 3 + 2
    assert [(c.index, c.start, c.latents.shape[2], c.last) for c in chunks] == [
        (0, 0, 3, False), (1, 3, 3, False), (2, 6, 2, True)]
    assert all(torch.isfinite(c.latents).all() for c in chunks)


def test_same_seed_same_output_other_seed_differs(backbone, text):
    a, _ = _run(backbone, text, seed=7)
    b, _ = _run(backbone, text, seed=7)
    c, _ = _run(backbone, text, seed=8)
    assert all(torch.equal(x.latents, y.latents) for x, y in zip(a, b))
    assert (a[0].latents - c[0].latents).abs().max() > 1e-2


def test_each_chunk_is_the_few_step_sampler(backbone, text):
    """Each chunk by the definition, without a cache: reference noise frame by frame from the seed, per-step noise
    from a second generator seeded by the first; every step sees the earlier chunks' clean latents at t = 0 through
    block-causal attention over the whole sequence."""
    chunks, stream = _run(backbone, text, frames=6, seed=3)
    g = torch.Generator().manual_seed(3)
    steps_g = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=g)))
    sched = FlowSchedule(5.0)
    ts = sched.warp([1000, 750, 500, 250])
    sig = [sched.sigma_of(t) for t in ts]
    tpf = backbone.config.tokens_per_frame(H, W)
    clean = torch.zeros(1, 16, 0, H, W)
    for start, chunk in zip((0, 3), chunks):
        x = torch.randn(1, 3, 16, H, W, generator=g).transpose(1, 2)  # frames in order: [B, F, C, ...]
        step_noise = torch.randn(3, 1, 16, 3, H, W, generator=steps_g)
        plan = BlockCausal([3] * (start // 3 + 1), tpf)
        for i in range(4):
            t = torch.cat([torch.zeros(1, start), torch.full((1, 3), ts[i])], dim=1)
            v = backbone(torch.cat([clean, x], dim=2), t, text, plan=plan)[:, :, start:]
            x0 = x - sig[i] * v
            if i < 3:
                x = add_noise(x0, step_noise[i], sig[i + 1])
        assert torch.allclose(x0, chunk.latents, atol=1e-4)
        clean = torch.cat([clean, x0], dim=2)


def test_reference_noise_does_not_depend_on_steps_or_chunking(backbone, text):
    """A frame's starting noise is the same whatever the step list and chunk size (drawn frame by frame)."""
    seen = {}
    for steps, n in (((1000, 750, 500, 250), 3), ((1000, 500), 2), ((1000,), 1)):
        s = Stream(backbone, text, latent_height=H, latent_width=W, num_frames=6, generator=9,
                   settings=StreamSettings(frames_per_chunk=n, steps=steps))
        seen[(steps, n)] = torch.cat([s._noise(n)[0] for _ in range(6 // n)], dim=2)
    a, b, c = seen.values()
    assert torch.equal(a, b) and torch.equal(a, c)


def _timeline(text, other, at=2):
    return PromptTimeline([PromptSegment(0, text), PromptSegment(at, other)])


def test_prompt_switch_recache_refreshes_exactly_the_cached_frames(backbone, text):
    other = torch.randn_like(text)
    base, _ = _run(backbone, text, frames=12)
    sw, stream = _run(backbone, _timeline(text, other), frames=12)
    # before the switch nothing changes; from the switch on the video follows the new prompt
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(base[:2], sw[:2]))
    assert (base[2].latents - sw[2].latents).abs().max() > 1e-3
    assert [c.prompt for c in sw] == [0, 0, 1, 1]

    # the re-cached K/V of frames 0..5 equal a fresh block-causal pass of their clean latents under the new prompt
    captured = {}

    class Capture(BlockCausal):
        def attend(self, layer, q, k, v, attn):
            captured[layer] = k
            return super().attend(layer, q, k, v, attn)

    tpf = backbone.config.tokens_per_frame(H, W)
    clean = torch.cat([sw[0].latents, sw[1].latents], 2)
    # replay the stream up to the switch, then compare its cache with the reference
    s = Stream(backbone, _timeline(text, other), latent_height=H, latent_width=W, num_frames=12, generator=0)
    it = s.rollout()
    next(it), next(it), next(it)  # chunk 2 triggered the re-cache
    backbone(clean, torch.zeros(1, 6), other, range(6), Capture([3, 3], tpf))
    for layer, k in captured.items():
        assert (s.cache.k[layer, :, : 6 * tpf] - k).abs().max() < 1e-4


def test_prompt_switch_cut_forgets_the_past(backbone, text):
    p1, p2, p3 = text, torch.randn_like(text), torch.randn_like(text)
    a, _ = _run(backbone, _timeline(p1, p3), frames=12, switch="cut")
    b, _ = _run(backbone, _timeline(p2, p3), frames=12, switch="cut")
    assert (a[0].latents - b[0].latents).abs().max() > 1e-3  # different pasts
    cut_gap = max((a[i].latents - b[i].latents).abs().max() for i in (2, 3))
    assert cut_gap < 1e-6  # the cut flushed the past: identical from the switch on
    c, _ = _run(backbone, _timeline(p1, p3), frames=12, switch="recache")
    d, _ = _run(backbone, _timeline(p2, p3), frames=12, switch="recache")
    assert (c[2].latents - d[2].latents).abs().max() > 100 * cut_gap + 1e-5  # re-cache keeps the scene


def test_prefix_continuation_reproduces_the_cache(backbone, text):
    chunks, ref = _run(backbone, text, frames=9, seed=0)
    s = Stream(backbone, text, latent_height=H, latent_width=W, num_frames=6,
               prefix=chunks[0].latents, generator=0)
    out = list(s)
    assert out[0].is_prefix and torch.equal(out[0].latents, chunks[0].latents)
    assert [c.start for c in out[1:]] == [3, 6]
    # after prefill the cache holds what the original stream had after its first clean pass
    s2 = Stream(backbone, text, latent_height=H, latent_width=W, num_frames=6, prefix=chunks[0].latents)
    s2._prefill(s2._prompt(0))
    r = Stream(backbone, text, latent_height=H, latent_width=W, num_frames=9, generator=0)
    it = r.rollout()
    next(it), next(it)  # chunk 0 written, chunk 1 generated (only chunk 0's clean pass matters)
    tpf = backbone.config.tokens_per_frame(H, W)
    assert torch.allclose(s2.cache.k[:, :, : 3 * tpf], r.cache.k[:, :, : 3 * tpf], atol=1e-5)


def test_single_image_prefix(backbone, text):
    img = torch.randn(1, 16, 1, H, W)
    out = list(Stream(backbone, text, latent_height=H, latent_width=W, num_frames=6, prefix=img, generator=0))
    other = list(Stream(backbone, text, latent_height=H, latent_width=W, num_frames=6, prefix=img * -1, generator=0))
    assert [c.start for c in out] == [0, 1, 4]
    assert (out[1].latents - other[1].latents).abs().max() > 1e-3  # generation depends on the image


def test_unbounded_stream_runs_past_the_window(backbone, text):
    s = Stream(backbone, text, latent_height=H, latent_width=W, num_frames=None,
               settings=StreamSettings(frames_per_chunk=1, window=3, sink=1), generator=0)
    starts = []
    for c in s:
        starts.append(c.start)
        if len(starts) == 12:
            break
    assert starts == list(range(12))
    assert sorted(s.cache.slot_frame) == [0, 10, 11]  # chunk 11's clean pass was not needed yet


def test_seconds_to_chunks():
    assert chunk_at_seconds(0) == 0
    assert chunk_at_seconds(5.0, fps=16, frames_per_chunk=3) == (1 + (80 - 1) // 4) // 3


@pytest.mark.parametrize("kw, words", [
    (dict(window=2, sink=0, frames_per_chunk=3), "less than one chunk"),
    (dict(window=6, sink=6), "must be smaller than the window"),
    (dict(sink=2), "needs a window"),
    (dict(steps=(500, 750)), "must decrease"),
    (dict(switch="blend"), "switch mode"),
    (dict(frames_per_chunk=0), "at least 1"),
])
def test_bad_settings_are_refused(kw, words):
    with pytest.raises(SelfForcingError, match=words):
        StreamSettings(**kw)


def test_bad_stream_inputs(backbone, text):
    with pytest.raises(SelfForcingError, match="unbounded stream needs a window"):
        Stream(backbone, text, latent_height=H, latent_width=W, num_frames=None)
    with pytest.raises(ValueError, match="not divisible by the patch"):
        Stream(backbone, text, latent_height=7, latent_width=W, num_frames=3)
    with pytest.raises(ValueError, match=r"\[batch, tokens, 64\]"):
        list(Stream(backbone, torch.randn(1, 8, 32), latent_height=H, latent_width=W, num_frames=3))
    cache = KVCache(backbone.config, 1, H, W, 6)
    with pytest.raises(ValueError, match="does not fit a whole-video cache"):
        cache.write_plan(6, 3)
