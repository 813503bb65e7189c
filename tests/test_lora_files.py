"""LoRA files: ComfyUI / lora_A-B / LongLive PEFT layouts, save and load - on a small stand-in with Wan module names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sf_core.errors import CheckpointError, SelfForcingError
from sf_core.lora import DEFAULT_TARGETS, LoRA, find_targets

from fixtures.lora_model import DIM, FFN, LINEARS, make_inputs, make_model, merged_copy, randomize, target_paths


def test_save_writes_exact_comfyui_keys(tmp_path):
    rank, alpha = 4, 8.0
    model = make_model()
    lora = LoRA.create(model, rank=rank, alpha=alpha)
    path = tmp_path / "out.safetensors"
    lora.save(path)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        tensors = {k: f.get_tensor(k) for k in keys}
    expected_shapes = {}
    for i in range(2):
        for lin in LINEARS:
            fan_in, fan_out = {"ffn.0": (DIM, FFN), "ffn.2": (FFN, DIM)}.get(lin, (DIM, DIM))
            base = f"diffusion_model.blocks.{i}.{lin}"
            expected_shapes[base + ".lora_down.weight"] = (rank, fan_in)
            expected_shapes[base + ".lora_up.weight"] = (fan_out, rank)
            expected_shapes[base + ".alpha"] = ()
    assert keys == set(expected_shapes)
    for k, shape in expected_shapes.items():
        assert tuple(tensors[k].shape) == shape, k
        if k.endswith(".alpha"):
            assert tensors[k].item() == alpha
    assert int(meta["rank"]) == rank and float(meta["alpha"]) == alpha
    assert json.loads(meta["targets"]) == list(DEFAULT_TARGETS)
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]  # no temp file left


def test_save_load_attach_gives_identical_outputs(tmp_path):
    model = make_model()
    inputs = make_inputs()
    lora = LoRA.create(model, rank=3, alpha=5)
    randomize(lora)
    with lora.applied(model):
        out = model(*inputs)
    lora.save(tmp_path / "l.safetensors")
    loaded = LoRA.load(tmp_path / "l.safetensors")
    assert loaded.paths == lora.paths and loaded.rank == 3 and loaded.alpha == 5
    with loaded.applied(model):
        assert torch.equal(model(*inputs), out)
    other = make_model()  # a separate copy of the same base works too
    with loaded.applied(other):
        assert torch.equal(other(*inputs), out)
    with pytest.raises(SelfForcingError, match="safetensors"):
        lora.save(tmp_path / "l.pt")


def test_load_comfy_lora_a_b_naming(tmp_path):
    from safetensors.torch import save_file

    model = make_model()
    inputs = make_inputs()
    g = torch.Generator().manual_seed(5)
    sd, deltas = {}, {}
    for path, mod in find_targets(model).items():
        A = torch.randn(2, mod.in_features, generator=g) * 0.1
        B = torch.randn(mod.out_features, 2, generator=g) * 0.1
        sd[f"diffusion_model.{path}.lora_A.weight"] = A
        sd[f"diffusion_model.{path}.lora_B.weight"] = B
        sd[f"diffusion_model.{path}.alpha"] = torch.tensor(1.0)
        deltas[path] = 0.5 * B @ A
    save_file(sd, str(tmp_path / "ab.safetensors"))
    lora = LoRA.load(tmp_path / "ab.safetensors")
    with lora.applied(model):
        torch.testing.assert_close(model(*inputs), merged_copy(model, deltas)(*inputs), rtol=1e-5, atol=1e-5)


def _peft_dict(model, rank, seed):
    g = torch.Generator().manual_seed(seed)
    sd, prods = {}, {}
    for path, mod in find_targets(model).items():
        A = torch.randn(rank, mod.in_features, generator=g) * 0.05
        B = torch.randn(mod.out_features, rank, generator=g) * 0.05
        sd[f"base_model.model.{path}.lora_A.weight"] = A.to(torch.bfloat16)
        sd[f"base_model.model.{path}.lora_B.weight"] = B.to(torch.bfloat16)
        prods[path] = B.to(torch.bfloat16).float() @ A.to(torch.bfloat16).float()
    return sd, prods


def test_load_longlive_peft_flat_and_nested(tmp_path):
    from safetensors.torch import save_file

    rank = 8
    model = make_model()
    inputs = make_inputs()
    gen, prods = _peft_dict(model, rank, seed=7)
    critic, _ = _peft_dict(model, rank, seed=8)
    save_file(gen, str(tmp_path / "flat.safetensors"))
    torch.save({"generator_lora": gen, "critic_lora": critic, "step": 100}, tmp_path / "longlive.pt")
    expected_scale1 = merged_copy(model, prods)(*inputs)
    expected_scale2 = merged_copy(model, {p: 2.0 * d for p, d in prods.items()})(*inputs)
    for file in ("flat.safetensors", "longlive.pt"):
        lora = LoRA.load(tmp_path / file)  # alpha not in the file: default alpha = rank (scale 1)
        assert lora.rank == rank and lora.alpha == rank
        assert lora.layer("blocks.0.self_attn.q").A.dtype == torch.float32
        with lora.applied(model):
            torch.testing.assert_close(model(*inputs), expected_scale1, rtol=1e-4, atol=1e-5)
        lora2 = LoRA.load(tmp_path / file, alpha=2 * rank)
        with lora2.applied(model):
            torch.testing.assert_close(model(*inputs), expected_scale2, rtol=1e-4, atol=1e-5)
    crit = LoRA.load(tmp_path / "longlive.pt", key="critic_lora")
    want_b = critic["base_model.model.blocks.1.ffn.2.lora_B.weight"].float()
    torch.testing.assert_close(crit.layer("blocks.1.ffn.2").B, want_b)


def test_load_rejects_foreign_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"blocks.0.self_attn.q.weight": torch.zeros(4, 4)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="not LoRA weights"):
        LoRA.load(tmp_path / "model.safetensors")
    half = {"diffusion_model.blocks.0.ffn.0.lora_down.weight": torch.zeros(2, 4)}
    save_file(half, str(tmp_path / "half.safetensors"))
    with pytest.raises(CheckpointError, match="only one of"):
        LoRA.load(tmp_path / "half.safetensors")
    save_file({"lora_unet_blocks_0_ffn_0.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_blocks_0_ffn_0.lora_up.weight": torch.zeros(4, 2)}, str(tmp_path / "kohya.safetensors"))
    with pytest.raises(CheckpointError, match="kohya"):
        LoRA.load(tmp_path / "kohya.safetensors")


_COMFY_CHECK = """
import logging, sys, torch
sys.argv = [sys.argv[0], "--cpu"]
sys.path.insert(0, {comfy!r})
import comfy.options
comfy.options.enable_args_parsing()
import comfy.lora, comfy.utils
from safetensors.torch import load_file
sd = comfy.utils.load_torch_file({lora!r}, safe_load=True)
base = load_file({base!r})
key_map = {{"diffusion_model." + k[:-7]: "diffusion_model." + k for k in base if k.endswith(".weight")}}
patches = comfy.lora.load_lora(sd, key_map)
out = {{}}
for wkey, p in patches.items():
    w = base[wkey[len("diffusion_model."):]]
    out[wkey] = comfy.lora.calculate_weight([(1.0, p, 1.0, None, None)], w.clone(), wkey)
torch.save(out, {out!r})
"""


@pytest.mark.skipif(not os.environ.get("COMFYUI_DIR"), reason="set COMFYUI_DIR to a ComfyUI checkout to run")
def test_comfyui_stock_loader_applies_our_file(tmp_path):
    """ComfyUI's own LoRA code (run in a subprocess) consumes every key we write and patches each
    weight to W + scale * up @ down."""
    from safetensors.torch import save_file

    model = make_model()
    lora = LoRA.create(model, rank=4, alpha=8)
    randomize(lora)
    lora.save(tmp_path / "l.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "base.safetensors"))
    script = _COMFY_CHECK.format(comfy=os.environ["COMFYUI_DIR"], lora=str(tmp_path / "l.safetensors"),
                                 base=str(tmp_path / "base.safetensors"), out=str(tmp_path / "out.pt"))
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                       cwd=os.environ["COMFYUI_DIR"], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "lora key not loaded" not in r.stderr + r.stdout
    patched = torch.load(tmp_path / "out.pt")
    assert sorted(patched) == sorted(f"diffusion_model.{p}.weight" for p in target_paths())
    weights = dict(model.named_parameters())
    for p in target_paths():
        L = lora.layer(p)
        want = weights[p + ".weight"].detach() + 2.0 * L.B.detach() @ L.A.detach()
        torch.testing.assert_close(patched[f"diffusion_model.{p}.weight"], want, rtol=1e-5, atol=1e-6)

