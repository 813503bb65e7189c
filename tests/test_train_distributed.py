"""Data-parallel training under torchrun (gloo, 2 CPU processes, tiny files): equal to one process with the same
samples per step, killed and resumed, FSDP2-sharded base, a rank that stops answering, per-sample randomness."""

import json
import os
import subprocess
import time
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sf_core.cli import build_parser
from sf_core.config import WanConfig
from sf_core.errors import SelfForcingError
from sf_core.train import TrainSettings, Trainer
from sf_core.train.cli import run
from sf_core.train.distributed import World
from sf_core.wan import WanModel

from fixtures.dit import tiny_dit_state_dict, write_dit

ROOT = Path(__file__).resolve().parents[1]
CFG = WanConfig(dim=256, ffn_dim=256, num_heads=2, num_layers=2, text_dim=32, freq_dim=64)
TIMEOUT = 240

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="this PyTorch has no torch.distributed")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from fixtures.text import write_tiny_umt5

    d = tmp_path_factory.mktemp("dist")
    (d / "prompts.txt").write_text("a red fox in the snow\na cat on a roof\nwaves at night\nrain on a window\n")
    return {
        "model": write_dit(d / "sf.safetensors", tiny_dit_state_dict(CFG, 0)),
        "teacher": write_dit(d / "wan.safetensors", tiny_dit_state_dict(CFG, 1)),
        "te": write_tiny_umt5(d / "umt5.safetensors", "comfy_hf"),
        "prompts": d / "prompts.txt",
        "dir": d,
    }


def _argv(f, out, *extra, iterations=3, batch=1, checkpointing=False) -> list[str]:
    return ["train", "--model", str(f["model"]), "--teacher", str(f["teacher"]), "--text-encoder", str(f["te"]),
            "--prompts", str(f["prompts"]), "--output", str(out), "--iterations", str(iterations), "--rank", "4",
            "--frames", "9", "--width", "16", "--height", "16", "--frames-per-chunk", "1", "--critic-ratio", "2",
            "--ema", "0.5", "--ema-start", "1", "--save-every", "2",
            "--batch", str(batch), "--device", "cpu", *extra] + ([] if checkpointing else ["--no-checkpointing"])


def _torchrun(argv, *, script=None, env_extra=None, timeout=TIMEOUT):
    """`torchrun --standalone --nproc_per_node 2` of `python -m sf_core` (or a script) in a subprocess."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(env_extra or {}))
    entry = [str(script)] if script else ["-m", "sf_core"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *entry, *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=str(ROOT))


def _loras(*paths):
    return [load_file(str(p)) for p in paths]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _ckpt_loras(path):
    state = torch.load(path, weights_only=True)
    return state, {**{"g." + k: v for k, v in state["gen_lora"].items()},
                   **{"c." + k: v for k, v in state["critic_lora"].items()}}


def _history(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def two_ranks(files):
    """The uninterrupted run: 2 ranks x batch 1, 3 iterations."""
    out = files["dir"] / "ddp.safetensors"
    res = _torchrun(_argv(files, out))
    assert res.returncode == 0, res.stdout + res.stderr
    return out, res


def test_two_ranks_equal_one_process_with_both_samples(files, two_ranks, tmp_path):
    out, res = two_ranks
    single = tmp_path / "single.safetensors"
    history = run(build_parser().parse_args(_argv(files, single, batch=2)), log=lambda *a: None)["history"]
    ddp, one = _loras(out, single)
    assert any(v.abs().max() > 5e-5 for k, v in one.items() if "lora_up" in k)  # it trained
    assert _max_diff(ddp, one) <= 1e-5
    s_ddp, l_ddp = _ckpt_loras(out.with_name("ddp.ckpt.pt"))
    s_one, l_one = _ckpt_loras(single.with_name("single.ckpt.pt"))
    assert s_ddp["world_size"] == 2 and s_one["world_size"] == 1 and s_ddp["iteration"] == 3
    assert _max_diff(l_ddp, l_one) <= 1e-5  # generator and critic LoRAs
    # rank 0 alone logs, and reports the loss averaged over both ranks
    logged = _history(res.stdout)
    assert [h["iteration"] for h in logged] == [1, 2, 3]
    for a, b in zip(logged, history):
        assert abs(a["critic_loss"] - b["critic_loss"]) <= 1e-5 * max(1.0, abs(b["critic_loss"]))


def test_kill_and_resume_under_torchrun_equals_the_uninterrupted_run(files, two_ranks, tmp_path):
    out, _ = two_ranks
    killed = files["dir"] / "killed.safetensors"
    ckpt = killed.with_name("killed.ckpt.pt")
    res = _torchrun(_argv(files, killed), script=ROOT / "tests" / "dist_worker.py",
                    env_extra={"SF_TEST_FAIL": "1:2:kill"})  # rank 1 dies (SIGKILL) as iteration 3 starts
    assert res.returncode != 0
    assert not killed.exists() and torch.load(ckpt, weights_only=True)["iteration"] == 2
    other = tmp_path / "other.safetensors"
    other.with_name("other.ckpt.pt").write_bytes(ckpt.read_bytes())
    res = _torchrun(_argv(files, killed, "--resume"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "at iteration 2/3" in res.stdout
    assert _max_diff(*_loras(out, killed)) <= 1e-6
    assert _max_diff(_ckpt_loras(ckpt)[1], _ckpt_loras(out.with_name("ddp.ckpt.pt"))[1]) <= 1e-6
    # a refused resume: another number of samples per step (1 process x batch 1), nothing changed on disk
    before = other.with_name("other.ckpt.pt").read_bytes()
    with pytest.raises(SelfForcingError, match=r"2 process\(es\) x batch 1 = 2 samples per step.*1 x batch 1"):
        run(build_parser().parse_args(_argv(files, other, "--resume", batch=1)), log=lambda *a: None)
    assert other.with_name("other.ckpt.pt").read_bytes() == before and not other.exists()
    # another world size with the same samples per step (1 process x batch 2) continues the same run
    lines = []
    run(build_parser().parse_args(_argv(files, other, "--resume", batch=2)), log=lines.append)
    assert "at iteration 2/3" in lines[0]
    assert _max_diff(*_loras(out, other)) <= 1e-5


def test_fsdp2_sharded_base_equals_replicated_base(files, two_ranks):
    out, _ = two_ranks
    sharded = files["dir"] / "fsdp.safetensors"
    res = _torchrun(_argv(files, sharded, "--shard-base", checkpointing=True))  # with gradient checkpointing too
    assert res.returncode == 0, res.stdout + res.stderr
    assert "base weights sharded (FSDP2)" in res.stdout
    assert _max_diff(*_loras(out, sharded)) <= 1e-5


def test_a_rank_that_stops_answering_fails_the_job_after_the_timeout(files, tmp_path):
    """Rank 1 sleeps instead of running iteration 2: rank 0 waits in the all-reduce for --dist-timeout seconds,
    then fails with that error, and torchrun ends the job (the subprocess timeout would catch a hang). A rank
    that dies outright (SIGKILL) is the kill-and-resume test above."""
    res = _torchrun(_argv(files, tmp_path / "f.safetensors", "--dist-timeout", "5"),
                    script=ROOT / "tests" / "dist_worker.py", env_extra={"SF_TEST_FAIL": "1:1:hang"}, timeout=120)
    assert res.returncode != 0
    assert "timed out waiting 5000ms" in (res.stdout + res.stderr).lower()
    assert not (tmp_path / "f.safetensors").exists()


def test_ctrl_c_on_one_rank_stops_every_rank_at_the_same_iteration(files, tmp_path):
    """Rank 1 alone receives SIGINT as iteration 2 starts: it finishes that iteration, and at the next boundary
    every rank agrees to stop, so rank 0 does not wait in a collective for --dist-timeout (60 s here). The
    checkpoint holds iteration 2 and no LoRA is written."""
    out = tmp_path / "stopped.safetensors"
    start = time.monotonic()
    res = _torchrun(_argv(files, out, "--dist-timeout", "60"), script=ROOT / "tests" / "dist_worker.py",
                    env_extra={"SF_TEST_FAIL": "1:1:sigint"}, timeout=120)
    elapsed = time.monotonic() - start
    text = res.stdout + res.stderr
    assert res.returncode != 0 and "timed out" not in text.lower(), text[-2000:]
    assert elapsed < 60, f"{elapsed:.0f} s: a rank waited for the timeout"
    assert "stopped by SIGINT at iteration 2/3" in text
    assert torch.load(out.with_name("stopped.ckpt.pt"), weights_only=True)["iteration"] == 2 and not out.exists()


def test_shard_base_without_torchrun_is_refused_before_work(files, tmp_path):
    with pytest.raises(SelfForcingError, match="torchrun --nproc_per_node"):
        run(build_parser().parse_args(_argv(files, tmp_path / "l.safetensors", "--shard-base")))
    assert not list(tmp_path.iterdir())


# ---- per-sample randomness, in one process ---------------------------------------------------------------
def _trainer(batch, world=None):
    cfg = WanConfig.preset("tiny")
    g, t = WanModel(cfg), WanModel(cfg)
    g.load_state_dict(tiny_dit_state_dict(cfg, 0))
    t.load_state_dict(tiny_dit_state_dict(cfg, 1))
    gen = torch.Generator().manual_seed(5)
    prompts, negative = torch.randn(5, 16, cfg.text_dim, generator=gen), torch.randn(1, 16, cfg.text_dim, generator=gen)
    settings = TrainSettings(rank=4, latent_frames=4, latent_height=2, latent_width=2, frames_per_chunk=2,
                             checkpointing=False, ema=None, batch=batch, seed=3)
    return Trainer(g.requires_grad_(False), t.requires_grad_(False), prompts, negative, settings, world=world)


def test_a_batch_of_two_is_the_two_ranks_samples_side_by_side():
    """Rank r of 2 with batch 1 draws exactly sample r of a one-process batch of 2: the same prompt, rollout
    noise, exit step and DMD noise, so its loss gradient is that sample's share of the batch gradient."""
    both = _trainer(2)
    ranks = [_trainer(1, World(rank=r, size=2)) for r in range(2)]
    loss = both.generator_loss()
    loss.backward()
    rank_losses = []
    for tr in ranks:
        rank_losses.append(tr.generator_loss())
        rank_losses[-1].backward()
        assert tr.last_exit_step == both.last_exit_step
    assert abs(float(loss.detach()) - float(sum(rank_losses).detach()) / 2) <= 1e-6
    for p, p0, p1 in zip(both.gen_lora.parameters(), *(tr.gen_lora.parameters() for tr in ranks)):
        assert torch.allclose(p.grad, (p0.grad + p1.grad) / 2, atol=1e-7, rtol=1e-5)
    # the two samples differ (different prompts or noise), so the equality is not trivial
    v0, v1 = (tr.rollout(tr._sample_prompts(g := tr.sample_generators("critic")), 3, g, grad=False) for tr in ranks)
    assert (v0 - v1).abs().max() > 1e-3
