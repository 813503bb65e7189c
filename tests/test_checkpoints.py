"""Every published DiT layout loads to the same Wan-named weights; foreign files get clear errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sf_core.checkpoints import load_dit, load_dit_checkpoint, normalize_keys
from sf_core.config import WanConfig
from sf_core.errors import CheckpointError
from fixtures import key_list
from fixtures.dit import LAYOUTS, tiny_dit_state_dict, write_dit
from sf_core.wan import WanBackbone, WanModel

ROOT = Path(__file__).resolve().parents[1]


def _meta_keys(name):
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in WanModel(WanConfig.preset(name)).state_dict().items()}


@pytest.mark.parametrize("fname, preset", [
    ("selfforcing_official_1.3B", "1.3B"),
    ("wan21_t2v_1.3B_original", "1.3B"),
    ("wan21_t2v_1.3B_diffusers", "1.3B"),
    ("wan21_t2v_14B_original", "14B"),
])
def test_real_key_lists_normalise_to_wan_names(fname, preset):
    sd = {k: torch.empty(shape, device="meta") for k, (shape, _dtype) in key_list(fname).items()}
    wan, _ = normalize_keys(sd, fname)
    expected = _meta_keys(preset)
    assert set(wan) == set(expected)
    assert all(tuple(wan[k].shape) == expected[k] for k in expected)
    assert WanConfig.from_state_dict(wan) == WanConfig.preset(preset)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tiny_files_in_every_layout_load_identically(tmp_path, layout):
    sd = tiny_dit_state_dict(seed=2)
    path = write_dit(tmp_path / ("m.pt" if layout == "official_pt" else "m.safetensors"), sd, layout)
    ckpt = load_dit_checkpoint(path)
    assert set(ckpt.state_dict) == set(sd)
    assert all(torch.equal(ckpt.state_dict[k], sd[k]) for k in sd)
    assert ckpt.config == WanConfig.preset("tiny")
    if layout == "official_pt":
        assert ckpt.source == "generator_ema"  # preferred over 'generator' (zeros in this file)


def test_diffusers_folder(tmp_path):
    sd = tiny_dit_state_dict(seed=3)
    (tmp_path / "transformer").mkdir()
    write_dit(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors", sd, "diffusers")
    ckpt = load_dit_checkpoint(tmp_path)
    assert all(torch.equal(ckpt.state_dict[k], sd[k]) for k in sd)


def test_half_and_fp8_weights(tmp_path, text):
    sd = tiny_dit_state_dict(seed=4)
    ref_model, _ = load_dit(write_dit(tmp_path / "f32.safetensors", sd))
    x = torch.randn(1, 16, 3, 8, 8)
    t = torch.full((1, 3), 400.0)
    ref = WanBackbone(ref_model)(x, t, text)

    bf16 = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    m, ck = load_dit(write_dit(tmp_path / "bf16.safetensors", bf16), dtype=None)
    assert ck.dtype == "bfloat16" and m.blocks[0].ffn[0].weight.dtype == torch.bfloat16
    out = WanBackbone(m, dtype=torch.float32)(x, t, text)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()

    fp8 = {}
    for k, v in sd.items():
        if k.endswith(".weight") and v.ndim == 2:
            scale = v.abs().max() / 448.0
            fp8[k] = (v / scale).to(torch.float8_e4m3fn)
            fp8[k[: -len("weight")] + "scale_weight"] = scale.reshape(1)
        else:
            fp8[k] = v
    fp8["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    path = write_dit(tmp_path / "fp8.safetensors", fp8)
    deq, ck = load_dit(path)
    assert ck.summary()["fp8_scaled"] and deq.blocks[0].ffn[0].weight.dtype == torch.float32
    kept, _ = load_dit(path, keep_fp8=True)
    assert kept.blocks[0].ffn[0].weight.dtype == torch.float8_e4m3fn
    out_deq = WanBackbone(deq)(x, t, text)
    out_kept = WanBackbone(kept)(x, t, text)
    assert (out_deq - out_kept).abs().max() < 1e-5  # casting at use == dequantising at load
    assert (out_deq - ref).abs().max() < 0.15 * ref.abs().max()  # within fp8 error of the fp32 model
    assert (out_deq - ref).abs().max() > 0  # and really quantised


def test_foreign_files_are_named(tmp_path):
    vae = tmp_path / "wan_2.1_vae.safetensors"
    save_file({"encoder.conv1.weight": torch.zeros(96, 3, 3, 3, 3), "decoder.conv1.weight": torch.zeros(384, 16, 3, 3, 3)}, str(vae))
    with pytest.raises(CheckpointError, match=r"wan_2\.1_vae\.safetensors.*not a Wan2\.1 DiT.*VAE.*expected"):
        load_dit_checkpoint(vae)
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4), "conditioner.x": torch.zeros(1)}, str(sdxl))
    with pytest.raises(CheckpointError, match="SDXL"):
        load_dit_checkpoint(sdxl)


def test_truncated_and_incomplete_files(tmp_path):
    path = write_dit(tmp_path / "full.safetensors", tiny_dit_state_dict())
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors.*truncated"):
        load_dit_checkpoint(cut)
    pt = tmp_path / "cut.pt"
    torch.save({"generator_ema": {"model." + k: v for k, v in tiny_dit_state_dict().items()}}, pt)
    pt.write_bytes(pt.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="cut.pt"):
        load_dit_checkpoint(pt)
    sd = tiny_dit_state_dict()
    del sd["blocks.1.ffn.2.weight"]
    with pytest.raises(CheckpointError, match=r"partial.safetensors: .*Wan DiT.*missing 1: blocks\.1\.ffn\.2\.weight"):
        load_dit_checkpoint(write_dit(tmp_path / "partial.safetensors", sd))
    empty = tmp_path / "empty.safetensors"
    empty.touch()
    with pytest.raises(CheckpointError, match="empty"):
        load_dit_checkpoint(empty)


def test_inspect_cli(tmp_path):
    path = write_dit(tmp_path / "sf.pt", tiny_dit_state_dict(), "official_pt")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "sf_core", "inspect", str(path)], capture_output=True, text=True,
                         env=env, check=True)
    info = json.loads(out.stdout)
    assert info["source"] == "generator_ema" and info["dtype"] == "float32"
    assert info["config"]["dim"] == WanConfig.preset("tiny").dim
    bad = tmp_path / "x.safetensors"
    save_file({"foo": torch.zeros(2)}, str(bad))
    res = subprocess.run([sys.executable, "-m", "sf_core", "inspect", str(bad)], capture_output=True, text=True, env=env)
    assert res.returncode == 2 and "not a Wan2.1 DiT" in res.stderr and "Traceback" not in res.stderr


def test_convert_cli_writes_plain_wan_safetensors(tmp_path):
    from safetensors.torch import load_file

    sd = tiny_dit_state_dict(seed=6)
    src = write_dit(tmp_path / "sf.pt", sd, "official_pt")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = tmp_path / "self_forcing_dmd.safetensors"
    subprocess.run([sys.executable, "-m", "sf_core", "convert", str(src), str(out), "--dtype", "bf16"],
                   check=True, env=env, capture_output=True)
    plain = load_file(str(out))
    assert set(plain) == set(sd) and all(plain[k].dtype == torch.bfloat16 for k in sd)
    assert all(torch.equal(plain[k], sd[k].to(torch.bfloat16)) for k in sd)
