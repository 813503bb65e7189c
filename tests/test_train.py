"""Self Forcing DMD training: what each step may touch, the DMD gradient, exit steps, resume, bad input."""

import copy

import pytest
import torch

from sf_core.config import WanConfig
from sf_core.errors import SelfForcingError
from sf_core.lora import LoRA
from sf_core.schedule import FlowSchedule
from sf_core.testing import tiny_dit_state_dict
from sf_core.train import TrainSettings, Trainer, dmd_gradient, dmd_loss
from sf_core.wan import WanBackbone, WanModel

SMALL = dict(rank=4, latent_frames=6, latent_height=2, latent_width=2, checkpointing=False, ema=None)


def _models(seed_g=0, seed_t=1, cfg=None):
    cfg = cfg or WanConfig.preset("tiny")
    g, t = WanModel(cfg), WanModel(cfg)
    g.load_state_dict(tiny_dit_state_dict(cfg, seed_g))
    t.load_state_dict(tiny_dit_state_dict(cfg, seed_t))
    return g.requires_grad_(False), t.requires_grad_(False)


def _prompts(n=2, width=64):
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, 16, width, generator=g), torch.randn(1, 16, width, generator=g)


def _trainer(**kw):
    g, t = _models()
    p, n = _prompts()
    return Trainer(g, t, p, n, TrainSettings(**{**SMALL, **kw})), g, t


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_each_step_changes_only_its_own_lora_and_models_are_restored():
    tr, g, t = _trainer()
    g0, t0 = _snapshot(g), _snapshot(t)
    flags = {n: p.requires_grad for n, p in g.named_parameters()}
    gen0, crit0 = _snapshot(tr.gen_lora), _snapshot(tr.critic_lora)

    tr._update(tr.generator_loss, tr.gen_lora, tr.gen_opt)
    gen1, crit1 = _snapshot(tr.gen_lora), _snapshot(tr.critic_lora)
    assert not _same(gen0, gen1) and _same(crit0, crit1)
    assert _same(g0, _snapshot(g)) and _same(t0, _snapshot(t))  # base weights bitwise untouched

    tr._update(tr.critic_loss, tr.critic_lora, tr.critic_opt)
    assert _same(gen1, _snapshot(tr.gen_lora)) and not _same(crit1, _snapshot(tr.critic_lora))
    assert _same(g0, _snapshot(g)) and _same(t0, _snapshot(t))

    tr.close()
    assert all(not m._forward_hooks for m in list(g.modules()) + list(t.modules()))
    assert {n: p.requires_grad for n, p in g.named_parameters()} == flags
    x = torch.randn(1, 16, 3, 2, 2)
    ref_g, _ = _models()
    assert torch.equal(WanBackbone(g)(x, torch.full((1, 3), 300.0), _prompts()[0][:1]),
                       WanBackbone(ref_g)(x, torch.full((1, 3), 300.0), _prompts()[0][:1]))


def test_dmd_gradient_is_zero_when_fake_equals_real_and_points_the_right_way():
    sched = FlowSchedule(5.0)
    x = torch.randn(2, 16, 3, 4, 4, requires_grad=True)
    den = lambda x_t, t: 0.5 * x_t  # noqa: E731
    loss, _ = dmd_loss(x, den, den, den, torch.Generator().manual_seed(0), sched, guidance=3.0)
    loss.backward()
    assert loss.item() == 0 and x.grad.abs().max() == 0

    x.grad = None
    delta = 0.3
    loss, _ = dmd_loss(x, den, den, lambda x_t, t: den(x_t, t) + delta, torch.Generator().manual_seed(0), sched)
    loss.backward()
    # fake predicts larger x0 than real: the generator must move down, i.e. the loss gradient is positive
    assert (x.grad > 0).all()
    # guidance follows the recipe's convention: real = cond + g (cond - uncond)
    real = torch.ones(1, 4) * (2 + 3 * (2 - 1))
    assert torch.allclose(dmd_gradient(torch.zeros(1, 4), real, real + 1), torch.full((1, 4), 1 / 5))


class _Recorder:
    """Proxy of a WanBackbone that records (grad enabled?, timestep) of every forward."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, x, t, *args, **kw):
        self.calls.append((torch.is_grad_enabled(), round(float(t.flatten()[0]), 3)))
        return self.inner(x, t, *args, **kw)


def test_exit_step_varies_and_only_the_exit_forward_gets_gradients():
    tr, g, _ = _trainer()
    rec = tr.student = _Recorder(tr.student)
    backward_calls = []
    g.blocks[1].ffn[0].register_full_backward_hook(lambda *a: backward_calls.append(1))
    timesteps = FlowSchedule(5.0).warp(tr.settings.denoising_steps)
    exits = []
    for _ in range(6):
        rec.calls.clear()
        backward_calls.clear()
        tr.generator_loss().backward()
        exits.append(tr.last_exit_step)
        grad_calls = [c for c in rec.calls if c[0]]
        assert len(grad_calls) == 2  # one per chunk
        assert all(abs(ts - timesteps[tr.last_exit_step]) < 1e-3 for _, ts in grad_calls)
        assert len(backward_calls) == 2  # the gradient reached only those two forwards
        assert all(ts == 0.0 for grad, ts in rec.calls if not grad and ts < 1)  # clean passes at t = 0, no grad
    assert len(set(exits)) > 1


def test_training_moves_the_critic_and_the_generator():
    from sf_core.train.trainer import evaluate

    tr, _, _ = _trainer(lr=1e-2, critic_lr=1e-2, critic_ratio=1, iterations=12)
    before = evaluate(tr)
    tr.train()
    after = evaluate(tr)
    assert after["critic_loss"] < before["critic_loss"]
    assert after["teacher_distance"] < before["teacher_distance"]


def test_saved_lora_reproduces_the_trained_generator(tmp_path):
    tr, g, _ = _trainer(iterations=2, critic_ratio=1)
    tr.train()
    x, t, p = torch.randn(1, 16, 3, 2, 2), torch.full((1, 3), 700.0), _prompts()[0][:1]
    trained = WanBackbone(g)(x, t, p)
    tr.final_lora().save(tmp_path / "sf_lora.safetensors")
    tr.close()
    plain = WanBackbone(g)(x, t, p)
    assert (trained - plain).abs().max() > 1e-6  # the LoRA does something
    lora = LoRA.load(tmp_path / "sf_lora.safetensors")
    with lora.applied(g):
        assert torch.allclose(WanBackbone(g)(x, t, p), trained, atol=1e-6)
    lora.merge(g, backup=True)
    assert torch.allclose(WanBackbone(g)(x, t, p), trained, atol=1e-5)  # merged == hooked
    lora.remove(g)


def test_resume_continues_the_identical_trajectory(tmp_path):
    settings = dict(iterations=4, critic_ratio=2, ema=0.9, ema_start=1, save_every=2)
    full, _, _ = _trainer(**settings)
    full.train()
    first, _, _ = _trainer(**{**settings, "iterations": 2})
    first.train(checkpoint=tmp_path / "ckpt.pt")
    second, _, _ = _trainer(**settings)
    second.resume(tmp_path / "ckpt.pt")
    assert second.iteration == 2
    second.train()
    for a, b in zip(full.final_lora().parameters(), second.final_lora().parameters()):
        assert (a - b).abs().max() <= 1e-6
    for a, b in zip(full.critic_lora.parameters(), second.critic_lora.parameters()):
        assert (a - b).abs().max() <= 1e-6


def test_bad_training_input_is_refused_before_work(tmp_path):
    g, _ = _models()
    odd = WanModel(WanConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=64, freq_dim=64, in_dim=32, out_dim=32))
    p, n = _prompts()
    with pytest.raises(SelfForcingError, match="channel latents"):
        Trainer(g, odd, p, n, TrainSettings(**SMALL))
    with pytest.raises(SelfForcingError, match="no prompts"):
        Trainer(g, _models()[1], p[:0], n, TrainSettings(**SMALL))
    with pytest.raises(SelfForcingError, match="rank must be at least 1"):
        TrainSettings(**{**SMALL, "rank": 0})
    tr, _, _ = _trainer()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tr.train(checkpoint=tmp_path / "missing" / "ckpt.pt")
    assert tr.iteration == 0 and not (tmp_path / "missing").exists()
