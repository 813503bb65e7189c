"""Self Forcing DMD training: what each step may touch, the DMD gradient, exit steps, resume, bad input."""

import pytest
import torch

from sf_core.config import WanConfig
from sf_core.errors import SelfForcingError
from sf_core.lora import LoRA
from sf_core.schedule import FlowSchedule
from fixtures.dit import tiny_dit_state_dict
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
    for i in range(6):
        tr.iteration = i  # the exit step is drawn per iteration
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


def test_a_short_run_lowers_the_critic_loss():
    from sf_core.train.trainer import evaluate

    tr, _, _ = _trainer(lr=1e-12, critic_lr=3e-3, critic_ratio=1, iterations=20)  # generator ~frozen
    before = evaluate(tr)["critic_loss"]
    tr.train()
    assert evaluate(tr)["critic_loss"] < 0.99 * before


def _channel_mean(tr, prompt, channel=0, seeds=(11, 12, 13)):
    from sf_core.stream import Stream

    s = tr.settings
    means = []
    for seed in seeds:
        st = Stream(tr.student, prompt, latent_height=s.latent_height, latent_width=s.latent_width,
                    num_frames=s.latent_frames, settings=tr.stream_settings, generator=seed)
        with torch.no_grad():
            means.append(torch.cat([c.latents for c in st], 2)[:, channel].mean())
    return float(torch.stack(means).mean())


def test_dmd_moves_the_generator_toward_the_teacher():
    """Teacher = the generator's own weights with a planted flow offset on channel 0, so the teacher's
    samples sit lower on that channel; DMD must pull the generator's samples toward them."""
    g, t = _models(0, 0)
    offset = 1.5
    with torch.no_grad():
        t.head.head.bias[0::16] += offset  # flow +b -> x0 lower by sigma * b on channel 0
    p, n = _prompts()
    settings = TrainSettings(**{**SMALL, "lr": 1e-2, "critic_lr": 1e-2, "critic_ratio": 1, "iterations": 12,
                                "guidance": 0.0})
    tr = Trainer(g, t, p, n, settings)
    teacher_mean = _channel_mean_teacher(tr, p[:1])
    before = abs(_channel_mean(tr, p[:1]) - teacher_mean)
    tr.train()
    after = abs(_channel_mean(tr, p[:1]) - teacher_mean)
    assert teacher_mean < -0.5 * offset  # the plant is visible in the teacher's samples
    assert after < 0.8 * before


def _channel_mean_teacher(tr, prompt, channel=0, seeds=(11, 12, 13), steps=12):
    """Teacher samples by Euler integration of its flow on the same shifted grid (no CFG)."""
    s = tr.settings
    sched = FlowSchedule(5.0)
    sig = [float(sched.sigmas[int(i)]) for i in torch.linspace(0, 999, steps)] + [0.0]
    means = []
    with torch.no_grad(), tr.critic_lora.disabled():
        kv = tr.teacher.encode_text(prompt)
        for seed in seeds:
            x = torch.randn(1, 16, s.latent_frames, s.latent_height, s.latent_width,
                            generator=torch.Generator().manual_seed(seed))
            for i in range(steps):
                t = torch.full((1, x.shape[2]), sig[i] * 1000)
                x = x + (sig[i + 1] - sig[i]) * tr.teacher(x, t, kv)
            means.append(x[:, channel].mean())
    return float(torch.stack(means).mean())


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


class _Stop(Exception):
    pass


def test_session_interrupted_keeps_a_checkpoint_and_resumes_to_the_same_lora(tmp_path):
    """The runner the CLI and the node share: an interrupt raised by the progress callback saves the checkpoint and
    writes no LoRA; a resumed session ends with the LoRA an uninterrupted session writes."""
    from sf_core.train.session import run_session

    settings = dict(iterations=3, critic_ratio=2, save_every=100)
    whole, _, _ = _trainer(**settings)
    done = run_session(whole, tmp_path / "whole.ckpt.pt", tmp_path / "whole.safetensors")
    assert done.finished and [h["iteration"] for h in done.history] == [1, 2, 3]

    def interrupt_at_2(info):
        if info["iteration"] == 2:
            raise _Stop

    cut, _, _ = _trainer(**settings)
    stopped = run_session(cut, tmp_path / "cut.ckpt.pt", tmp_path / "cut.safetensors", on_step=interrupt_at_2,
                          interrupts=(_Stop,))
    assert not stopped.finished and stopped.lora is None and not (tmp_path / "cut.safetensors").exists()
    assert torch.load(tmp_path / "cut.ckpt.pt", weights_only=True)["iteration"] == 2  # saved although save_every=100

    again, _, _ = _trainer(**settings)
    log = []
    resumed = run_session(again, tmp_path / "cut.ckpt.pt", tmp_path / "cut.safetensors", resume=True, log=log.append)
    assert resumed.finished and "at iteration 2/3" in log[0] and [h["iteration"] for h in resumed.history] == [3]
    a, b = LoRA.load(tmp_path / "whole.safetensors"), LoRA.load(tmp_path / "cut.safetensors")
    for p in a.paths:
        assert (a.layer(p).B - b.layer(p).B).abs().max() <= 1e-6


def test_resume_refuses_another_rollout_context():
    """A Teacher Forcing checkpoint must not continue as Self Forcing; checkpoints that predate the setting ran
    Self Forcing."""
    import dataclasses

    from sf_core.train.state import check_state

    settings = TrainSettings(**SMALL)
    saved = dataclasses.asdict(settings)
    with pytest.raises(SelfForcingError, match="context=teacher"):
        check_state({"settings": {**saved, "context": "teacher"}, "world_size": 1}, settings)
    older = {k: v for k, v in saved.items() if k != "context"}
    check_state({"settings": older, "world_size": 1}, settings)  # no LoRA configs given: settings only


def test_switch_rollouts_change_prompt_at_the_drawn_chunk(monkeypatch):
    with pytest.raises(SelfForcingError, match="self context"):
        TrainSettings(**SMALL, switch=0.5, context="teacher")
    g, t = _models()
    p, n = _prompts()
    with pytest.raises(SelfForcingError, match="two prompts or more"):
        Trainer(g, t, p[:1], n, TrainSettings(**SMALL, switch=0.5))
    tr, _, _ = _trainer(frames_per_chunk=2, switch=1.0)
    at = tr.switch_chunk("generator")
    assert at in (1, 2)  # 6 latent frames in chunks of 2: a switch at the second or third chunk
    gens = tr.sample_generators("generator")
    text = tr._sample_prompts(gens)
    other = -text
    plain = tr.rollout(text, 3, tr.sample_generators("generator"), grad=False)
    switched = tr.rollout(text, 3, tr.sample_generators("generator"), grad=False, switch=(other, at))
    assert torch.equal(plain[:, :, : 2 * at], switched[:, :, : 2 * at])  # the same video up to the switch
    assert (plain[:, :, 2 * at :] - switched[:, :, 2 * at :]).abs().max() > 1e-4  # another prompt after it
    # DMD and the critic judge the frames made after the switch as a clip of their own, under the new prompt
    seen = []
    x0 = tr._x0
    tr._x0 = lambda backbone, prompt, x_t, t: seen.append(x_t.shape[2]) or x0(backbone, prompt, x_t, t)
    at = tr.switch_chunk("generator")
    loss = tr.generator_loss()
    loss.backward()
    assert torch.isfinite(loss) and seen and set(seen) == {6 - 2 * at}, (seen, at)
    seen.clear()
    at = tr.switch_chunk("critic")
    from sf_core.train import trainer as trainer_module
    critic = trainer_module.critic_loss
    monkeypatch.setattr(trainer_module, "critic_loss", lambda x, *a: seen.append(x.shape[2]) or critic(x, *a))
    tr.critic_loss()
    assert seen == [6 - 2 * at], (seen, at)
    tr.close()
