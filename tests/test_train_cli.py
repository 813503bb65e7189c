"""`python -m sf_core train` end to end on tiny files, and its early errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sf_core.cli import build_parser
from sf_core.config import WanConfig
from sf_core.errors import CheckpointError, SelfForcingError
from fixtures.dit import tiny_dit_state_dict, write_dit

ROOT = Path(__file__).resolve().parents[1]
CFG = WanConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=32, freq_dim=64)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from fixtures.text import write_tiny_umt5

    d = tmp_path_factory.mktemp("train")
    (d / "prompts.txt").write_text("a red fox in the snow\n\na cat on a roof\n")
    (d / "empty.txt").write_text("\n  \n")
    odd = WanConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=32, freq_dim=64, in_dim=32, out_dim=32)
    return {
        "model": write_dit(d / "sf.pt", tiny_dit_state_dict(CFG, 0), "official_pt"),
        "teacher": write_dit(d / "wan.safetensors", tiny_dit_state_dict(CFG, 1)),
        "odd_teacher": write_dit(d / "odd.safetensors", tiny_dit_state_dict(odd, 1)),
        "te": write_tiny_umt5(d / "umt5.safetensors", "comfy_hf"),
        "prompts": d / "prompts.txt",
        "empty": d / "empty.txt",
    }


def _argv(f, out, *extra) -> list[str]:
    return ["train", "--model", str(f["model"]), "--teacher", str(f["teacher"]), "--text-encoder", str(f["te"]),
            "--prompts", str(f["prompts"]), "--output", str(out), "--iterations", "2", "--rank", "4",
            "--frames", "9", "--width", "32", "--height", "32", "--critic-ratio", "1", "--no-checkpointing", *extra]


def test_train_writes_a_comfyui_lora_and_a_resumable_checkpoint(files, tmp_path):
    out = tmp_path / "my_style.safetensors"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "sf_core", *_argv(files, out)], capture_output=True, text=True,
                         env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    sd = load_file(str(out))
    downs = [k for k in sd if k.endswith(".lora_down.weight")]
    assert len(downs) == CFG.num_layers * 10  # q,k,v,o x2 + ffn.0/2 in every block
    assert all(k.startswith("diffusion_model.blocks.") for k in sd)
    assert any(sd[k.replace("lora_down", "lora_up")].abs().max() > 0 for k in downs)  # trained, not a no-op
    ckpt = tmp_path / "my_style.ckpt.pt"
    assert torch.load(ckpt, weights_only=True)["iteration"] == 2
    assert '"generator_loss"' in res.stdout and '"critic_loss"' in res.stdout

    from sf_core.train.cli import run

    argv = _argv(files, out, "--resume")
    argv[argv.index("--iterations") + 1] = "3"
    lines = []
    run(build_parser().parse_args(argv), log=lines.append)
    assert lines[0].startswith("resumed") and "at iteration 2/3" in lines[0]
    assert torch.load(ckpt, weights_only=True)["iteration"] == 3


@pytest.mark.parametrize("change, error, words", [
    (dict(prompts="empty"), SelfForcingError, "holds no prompts"),
    (dict(teacher="odd_teacher"), SelfForcingError, "channel latents"),
    (dict(teacher="te"), CheckpointError, "not a Wan2.1 DiT"),
])
def test_bad_training_inputs_fail_before_training(files, tmp_path, monkeypatch, change, error, words):
    from sf_core.train import trainer as trainer_mod

    monkeypatch.setattr(trainer_mod.Trainer, "train", lambda *a, **k: pytest.fail("training started"))
    f = {**files, **{k: files[v] for k, v in change.items()}}
    from sf_core.train.cli import run

    with pytest.raises(error, match=words):
        run(build_parser().parse_args(_argv(f, tmp_path / "l.safetensors")))
    assert not list(tmp_path.iterdir())


def test_rank_zero_and_missing_output_folder(files, tmp_path):
    from sf_core.train.cli import run

    with pytest.raises(SelfForcingError, match="rank must be at least 1"):
        run(build_parser().parse_args(_argv(files, tmp_path / "l.safetensors", "--rank", "0")))
    with pytest.raises(SelfForcingError, match="does not exist"):
        run(build_parser().parse_args(_argv(files, tmp_path / "nope" / "l.safetensors")))
