"""Bad inputs to every command: exit 2, a one-line message naming the problem, before any model load, and
nothing on disk changed or added. Run in-process through `sf_core.cli.main(argv)`."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
import torch

from sf_core.cli import main
from sf_core.config import WanConfig
from fixtures.dit import tiny_dit_state_dict, write_dit

CFG = WanConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=32, freq_dim=64)  # text width of the tiny UMT5
BOUND_S = 5.0  # a check that reads headers only takes well under a second here; loading + running takes longer


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    """Tiny valid files, foreign / damaged ones, and one real training checkpoint (rank 4)."""
    from fixtures.text import write_tiny_umt5
    from fixtures.vae import write_tiny_taehv, write_tiny_wan_vae

    d = tmp_path_factory.mktemp("bad_inputs")
    write_dit(d / "sf.pt", tiny_dit_state_dict(CFG, 0), "official_pt")
    write_dit(d / "wan.safetensors", tiny_dit_state_dict(CFG, 1))
    write_dit(d / "wide_text.safetensors", tiny_dit_state_dict(WanConfig.preset("tiny"), 2))  # 64-wide text
    write_dit(d / "deeper.safetensors", tiny_dit_state_dict(
        WanConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=3, text_dim=32, freq_dim=64), 3))
    write_tiny_umt5(d / "umt5.safetensors", "comfy_hf")
    write_tiny_wan_vae(d / "vae.safetensors")
    write_tiny_taehv(d / "taew2_1.pth")
    (d / "prompts.txt").write_text("a red fox in the snow\na cat on a roof\n")
    (d / "one_prompt.txt").write_text("a red fox in the snow\n")
    (d / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (d / "a_folder").mkdir()
    (d / "two_models").mkdir()
    write_dit(d / "two_models" / "a.safetensors", tiny_dit_state_dict(CFG, 4))
    write_dit(d / "two_models" / "b.safetensors", tiny_dit_state_dict(CFG, 5))
    (d / "garbage.pt").write_bytes(b"not a pickle at all " * 50)
    (d / "empty.pt").write_bytes(b"")
    import datetime

    torch.save({"when": datetime.datetime(2020, 1, 1)}, d / "foreign.pt")
    data = (d / "wan.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    os.link(d / "sf.pt", d / "sf_alias.latent")  # the same file under another name
    (d / "exists.mp4").write_bytes(b"an older video")
    (d / "exists.safetensors").write_bytes(b"an older LoRA")
    (d / "a_file").write_text("x")
    (d / "model_copy.ckpt.pt").write_bytes((d / "sf.pt").read_bytes())
    train = _train_argv(d, d / "trained.safetensors")
    assert main([*train, "--iterations", "1"]) == 0
    ckpt = (d / "trained.ckpt.pt").read_bytes()
    (d / "trained_truncated.ckpt.pt").write_bytes(ckpt[: len(ckpt) // 3])
    return d


def _gen_argv(d: Path, out) -> list[str]:
    return ["generate", "--model", str(d / "sf.pt"), "--text-encoder", str(d / "umt5.safetensors"),
            "--vae", str(d / "vae.safetensors"), "--width", "32", "--height", "32", "--frames", "9",
            "--prompt", "a fox", "--device", "cpu", "--output", str(out)]


def _train_argv(d: Path, out) -> list[str]:
    return ["train", "--model", str(d / "sf.pt"), "--teacher", str(d / "wan.safetensors"),
            "--text-encoder", str(d / "umt5.safetensors"), "--prompts", str(d / "prompts.txt"), "--output", str(out),
            "--iterations", "2", "--rank", "4", "--frames", "9", "--width", "32", "--height", "32",
            "--critic-ratio", "1", "--no-checkpointing", "--device", "cpu"]


def _set(argv: list[str], flag: str, value: str) -> list[str]:
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


# (id, argv builder (d, out folder) -> argv, words the message must hold, loaders allowed)
G, T = _gen_argv, _train_argv
CASES = [
    # generate: inputs are never outputs, existing outputs kept
    ("gen-latents-out-is-model", lambda d, o: G(d, o / "v.mp4") + ["--latents-out", str(d / "sf.pt")], "same file as --model"),
    ("gen-latents-out-hardlink-of-model", lambda d, o: G(d, o / "v.mp4") + ["--latents-out", str(d / "sf_alias.latent")],
     "same file as --model"),
    ("gen-output-equals-latents-out", lambda d, o: G(d, o / "v.mp4") + ["--latents-out", str(o / "v.mp4")], "same file"),
    ("gen-existing-output", lambda d, o: G(d, d / "exists.mp4"), "already exists; pass --overwrite"),
    ("gen-output-not-mp4", lambda d, o: G(d, o / "v.avi"), "should end in .mp4"),
    ("gen-output-folder-missing", lambda d, o: G(d, o / "nope" / "v.mp4"), "does not exist"),
    ("gen-output-unwritable", lambda d, o: G(d, "/proc/sf_core_test.mp4"), "cannot write"),
    ("gen-frames-dir-is-a-file", lambda d, o: G(d, o / "v.mp4") + ["--frames-dir", str(d / "a_file")], "is a file"),
    # generate: values
    ("gen-device-foo", lambda d, o: _set(G(d, o / "v.mp4"), "--device", "foo"), "not a device"),
    ("gen-device-cuda-99", lambda d, o: _set(G(d, o / "v.mp4"), "--device", "cuda:99"), "cuda"),
    ("gen-attn-foo", lambda d, o: G(d, o / "v.mp4") + ["--attn", "foo"], "attention backend 'foo'"),
    ("gen-shift-0", lambda d, o: G(d, o / "v.mp4") + ["--shift", "0"], "--shift must be"),
    ("gen-steps-abc", lambda d, o: G(d, o / "v.mp4") + ["--steps", "abc"], "denoising steps must be numbers"),
    ("gen-steps-increasing", lambda d, o: G(d, o / "v.mp4") + ["--steps", "250,500"], "decrease"),
    ("gen-steps-above-1000", lambda d, o: G(d, o / "v.mp4") + ["--steps", "1200,750,500"], "timesteps in (0, 1000]"),
    ("gen-steps-zero", lambda d, o: G(d, o / "v.mp4") + ["--steps", "1000,500,0"], "timesteps in (0, 1000]"),
    ("gen-toy-prompt-not-a-caption", lambda d, o: ["generate", "--prompt", "a fox in the snow", "-o", str(o / "v.mp4")],
     "read captions of the toy world"),
    ("gen-fps-nan", lambda d, o: G(d, o / "v.mp4") + ["--fps", "nan"], "--fps must be"),
    ("gen-fps-inf", lambda d, o: G(d, o / "v.mp4") + ["--fps", "inf"], "--fps must be"),
    ("gen-seconds-0", lambda d, o: [a for a in G(d, o / "v.mp4") if a not in ("--frames", "9")] + ["--seconds", "0"],
     "--seconds must be"),
    ("gen-seconds-negative", lambda d, o: [a for a in G(d, o / "v.mp4") if a not in ("--frames", "9")]
     + ["--seconds=-2"], "--seconds must be"),
    ("gen-seconds-1e9", lambda d, o: [a for a in G(d, o / "v.mp4") if a not in ("--frames", "9")] + ["--seconds", "1e9"],
     "set a window"),
    ("gen-latents-out-kept-for-1e9-seconds", lambda d, o: [a for a in G(d, o / "v.mp4") if a not in ("--frames", "9")]
     + ["--seconds", "1e9", "--window", "6", "--latents-out", str(o / "v.latent")], "--latents-out keeps every latent"),
    ("gen-frames-400001-no-window", lambda d, o: _set(_set(_set(G(d, o / "v.mp4"), "--frames", "400001"), "--width", "832"),
                                                     "--height", "480"), "set a window"),
    ("gen-frames-not-1-plus-4k", lambda d, o: _set(G(d, o / "v.mp4"), "--frames", "10"), "1 + 4*k"),
    # generate: files that are not what they should be
    ("gen-timeline-binary", lambda d, o: [a for a in G(d, o / "v.mp4") if a not in ("--prompt", "a fox")]
     + ["--timeline-file", str(d / "binary.txt")], "not a UTF-8 text file"),
    ("gen-timeline-folder", lambda d, o: [a for a in G(d, o / "v.mp4") if a not in ("--prompt", "a fox")]
     + ["--timeline-file", str(d / "a_folder")], "is a folder"),
    ("gen-text-width-mismatch", lambda d, o: _set(G(d, o / "v.mp4"), "--model", str(d / "wide_text.safetensors")),
     "32-wide text embeddings but"),
    ("gen-model-folder-of-two", lambda d, o: _set(G(d, o / "v.mp4"), "--model", str(d / "two_models")),
     "2 separate models"),
    ("gen-model-truncated", lambda d, o: _set(G(d, o / "v.mp4"), "--model", str(d / "truncated.safetensors")),
     "truncated"),
    # train: inputs are never outputs, checkpoints kept
    ("train-output-is-teacher", lambda d, o: T(d, d / "wan.safetensors"), "same file as --teacher"),
    ("train-checkpoint-is-output", lambda d, o: T(d, o / "l.safetensors") + ["--checkpoint", str(o / "l.safetensors")],
     "--output and --checkpoint are the same file"),
    ("train-checkpoint-is-model", lambda d, o: T(d, o / "l.safetensors") + ["--checkpoint", str(d / "sf.pt")],
     "same file as --model"),
    ("train-existing-checkpoint-no-resume", lambda d, o: T(d, d / "trained.safetensors"),
     "checkpoint already exists at"),
    ("train-existing-output", lambda d, o: T(d, d / "exists.safetensors"), "already exists; pass --overwrite"),
    # train: values
    ("train-save-every-0", lambda d, o: T(d, o / "l.safetensors") + ["--save-every", "0"], "--save-every must be at least 1"),
    ("train-device-foo", lambda d, o: T(d, o / "l.safetensors") + ["--device", "foo"], "not a device"),
    ("train-lr-nan", lambda d, o: T(d, o / "l.safetensors") + ["--lr", "nan"], "--lr must be"),
    ("train-switch-share-2", lambda d, o: T(d, o / "l.safetensors") + ["--switch-share", "2"], "--switch-share must be"),
    ("train-switch-one-prompt", lambda d, o: _set(T(d, o / "l.safetensors"), "--prompts", str(d / "one_prompt.txt"))
     + ["--switch-share", "0.5", "--frames", "25"], "two prompts or more"),
    ("train-switch-one-chunk", lambda d, o: T(d, o / "l.safetensors") + ["--switch-share", "0.5"], "two chunks per video"),
    ("train-prompts-binary", lambda d, o: _set(T(d, o / "l.safetensors"), "--prompts", str(d / "binary.txt")),
     "not a UTF-8 text file"),
    ("train-prompts-folder", lambda d, o: _set(T(d, o / "l.safetensors"), "--prompts", str(d / "a_folder")),
     "is a folder"),
    # train: resume checkpoints that cannot resume this run
    ("train-resume-garbage", lambda d, o: T(d, o / "l.safetensors") + ["--resume", "--checkpoint", str(d / "garbage.pt")],
     "not a readable training checkpoint"),
    ("train-resume-empty", lambda d, o: T(d, o / "l.safetensors") + ["--resume", "--checkpoint", str(d / "empty.pt")],
     "is empty"),
    ("train-resume-truncated", lambda d, o: T(d, o / "l.safetensors")
     + ["--resume", "--checkpoint", str(d / "trained_truncated.ckpt.pt")], "not a readable training checkpoint"),
    ("train-resume-a-model", lambda d, o: T(d, o / "l.safetensors") + ["--resume", "--checkpoint", str(d / "sf.pt")],
     "same file as --model"),
    ("train-resume-foreign-pickle", lambda d, o: T(d, o / "l.safetensors") + ["--resume", "--checkpoint",
                                                                             str(d / "foreign.pt")], "Unsupported global"),
    ("train-resume-a-model-copy", lambda d, o: T(d, o / "l.safetensors") + ["--resume", "--checkpoint",
                                                                           str(d / "model_copy.ckpt.pt")],
     "not a training checkpoint"),
    ("train-resume-other-rank", lambda d, o: _set(T(d, d / "trained.safetensors"), "--rank", "8") + ["--resume"],
     "rank=4"),
    ("train-resume-other-model", lambda d, o: _set(T(d, d / "trained.safetensors"), "--model",
                                                   str(d / "deeper.safetensors")) + ["--resume"], "does not fit this model"),
    ("train-resume-missing", lambda d, o: T(d, o / "l.safetensors") + ["--resume"], "no checkpoint at"),
    # convert
    ("convert-output-is-input", lambda d, o: ["convert", str(d / "wan.safetensors"), str(d / "wan.safetensors")],
     "same file as the input"),
    ("convert-pt-name", lambda d, o: ["convert", str(d / "wan.safetensors"), str(o / "x.pt")], "name the output .safetensors"),
    ("convert-existing-output", lambda d, o: ["convert", str(d / "wan.safetensors"), str(d / "exists.safetensors")],
     "already exists; pass --overwrite"),
    ("convert-garbage-input", lambda d, o: ["convert", str(d / "garbage.pt"), str(o / "x.safetensors")],
     "not a readable PyTorch checkpoint", True),
    # inspect
    ("inspect-missing", lambda d, o: ["inspect", str(d / "nope.safetensors")], "no such file", True),
    ("inspect-folder-no-weights", lambda d, o: ["inspect", str(d / "a_folder")], "holds no .safetensors", True),
    ("inspect-empty", lambda d, o: ["inspect", str(d / "empty.pt")], "empty", True),
    ("inspect-truncated", lambda d, o: ["inspect", str(d / "truncated.safetensors")], "truncated", True),
    ("inspect-foreign-pickle", lambda d, o: ["inspect", str(d / "foreign.pt")], "Unsupported global", True),
    ("inspect-a-text-encoder", lambda d, o: ["inspect", str(d / "umt5.safetensors")], "not a Wan2.1 DiT", True),
]

LOADERS = [("sf_core.checkpoints", "load_dit"), ("sf_core.checkpoints", "load_dit_checkpoint"),
           ("sf_core.generate", "load_dit"), ("sf_core.train.cli", "load_dit"), ("sf_core.text", "load_text_encoder"),
           ("sf_core.generate", "load_text_encoder"), ("sf_core.train.cli", "load_text_encoder"),
           ("sf_core.vae", "load_decoder"), ("sf_core.generate", "load_decoder")]


def _snapshot(*folders: Path) -> dict[str, tuple[str, int]]:
    out = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                out[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mode)
            else:
                out[str(p)] = ("dir", 0)
    return out


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_early_with_nothing_changed(case, d, tmp_path, monkeypatch, capsys):
    import importlib

    name, build, words, *rest = case
    loads_allowed = bool(rest and rest[0])
    calls = []
    if not loads_allowed:
        for mod, attr in LOADERS:
            m = importlib.import_module(mod)
            if hasattr(m, attr):
                monkeypatch.setattr(m, attr, lambda *a, _n=f"{mod}.{attr}", **k: calls.append(_n) or pytest.fail(_n))
    argv = build(d, tmp_path)
    before = _snapshot(d, tmp_path)
    start = time.perf_counter()
    code = main(argv)
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err
    assert "Traceback" not in err and "weights_only=False" not in err
    assert calls == [], f"a loader ran before the error: {calls}"
    assert elapsed < BOUND_S, f"{elapsed:.1f} s to the error"
    assert _snapshot(d, tmp_path) == before  # no file changed, none appeared (no partial files either)


def test_at_least_30_cases_over_every_command():
    commands = {c[1](Path("/x"), Path("/y"))[0] for c in CASES}
    assert len(CASES) >= 30 and commands == {"generate", "train", "convert", "inspect"}
