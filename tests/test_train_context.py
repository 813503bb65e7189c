"""Teacher / Diffusion Forcing rollouts: the cache holds ground truth (clean, or noised per chunk) instead of the
generated chunks, through the one chunk loop and the trainer."""

import pytest
import torch

from sf_core.config import WanConfig
from sf_core.errors import SelfForcingError
from sf_core.schedule import FlowSchedule
from sf_core.stream import Stream
from sf_core.train import TrainSettings, Trainer
from sf_core.train.context import diffusion_forcing, teacher_forcing
from sf_core.wan import WanBackbone, WanModel

CFG = WanConfig.preset("tiny")


def _model(seed):
    torch.manual_seed(seed)
    return WanModel(CFG).requires_grad_(False)


def _chunks(bb, text, context=None, seed=3):
    s = Stream(bb, text, latent_height=2, latent_width=2, num_frames=6, generator=seed, context_source=context)
    chunks = [c.latents for c in s]
    return chunks, s.cache.latents.clone()


def test_teacher_forcing_cache_holds_the_ground_truth_and_it_steers_the_next_chunk():
    bb = WanBackbone(_model(0))
    text = torch.randn(1, 8, CFG.text_dim)
    gt_a, gt_b = torch.randn(1, 16, 6, 2, 2), torch.randn(1, 16, 6, 2, 2)
    own, own_cache = _chunks(bb, text)
    a, cache_a = _chunks(bb, text, teacher_forcing(gt_a))
    b, _ = _chunks(bb, text, teacher_forcing(gt_b))
    assert torch.equal(a[0], own[0]) and torch.equal(a[0], b[0])  # the first chunk sees no context
    assert not torch.allclose(a[1], b[1]) and not torch.allclose(a[1], own[1])  # the second sees the ground truth
    torch.testing.assert_close(cache_a[:, :, :3], gt_a[:, :, :3])  # what re-cache would re-encode
    torch.testing.assert_close(own_cache[:, :, :3], own[0])


def test_diffusion_forcing_noises_each_chunk_to_its_own_level():
    gt = torch.randn(4, 16, 6, 2, 2)
    src = diffusion_forcing(gt, torch.Generator().manual_seed(0), FlowSchedule(5.0))
    x1, t1 = src(0, torch.zeros(4, 16, 3, 2, 2))
    x2, t2 = src(3, torch.zeros(4, 16, 3, 2, 2))
    assert t1.shape == (4, 3) and (t1 > 0).all() and (t1 <= 1000).all() and not torch.equal(t1, t2)
    assert (t1 == t1[:, :1]).all()  # one level per chunk and sample
    sigma = FlowSchedule(5.0).sigmas_of(t1)[:, 0].view(4, 1, 1, 1, 1)
    resid = x1 - (1 - sigma) * gt[:, :, :3]  # what is left must be sigma * unit noise
    torch.testing.assert_close((resid / sigma).std(), torch.tensor(1.0), atol=0.2, rtol=0)


def test_trainer_forcing_needs_ground_truth_and_runs():
    g, t = _model(0), _model(1)
    prompts, neg = torch.randn(3, 8, CFG.text_dim), torch.randn(1, 8, CFG.text_dim)
    kw = dict(rank=4, latent_frames=6, latent_height=2, latent_width=2, checkpointing=False, ema=None, iterations=2,
              critic_ratio=1)
    with pytest.raises(SelfForcingError, match="ground-truth latents"):
        Trainer(g, t, prompts, neg, TrainSettings(**kw, context="teacher"))
    with pytest.raises(SelfForcingError, match="rollout context"):
        TrainSettings(**kw, context="mirror")
    videos = torch.randn(3, 16, 6, 2, 2)
    tr = Trainer(g, t, prompts, neg, TrainSettings(**kw, context="diffusion"), videos=videos)
    hist = tr.train()
    assert len(hist) == 2 and all(torch.isfinite(torch.tensor(h["generator_loss"])) for h in hist)
    tr.close()
