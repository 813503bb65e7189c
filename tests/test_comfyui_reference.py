"""Our Wan forward against an independent implementation: ComfyUI's own WanModel.forward (subprocess,
COMFYUI_DIR), on the same tiny weights, with per-frame timesteps and a text context shorter than 512."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from sf_core.config import WanConfig
from fixtures.dit import tiny_dit_state_dict
from sf_core.wan import WanBackbone, WanModel

_SCRIPT = """
import sys, torch
sys.argv = [sys.argv[0], "--cpu"]
sys.path.insert(0, {comfy!r})
import comfy.options
comfy.options.enable_args_parsing()
import comfy.ops
from comfy.ldm.wan.model import WanModel
from safetensors.torch import load_file
sd = load_file({weights!r})
m = WanModel(dim=256, ffn_dim=512, freq_dim=64, text_dim=64, num_heads=2, num_layers=2,
             operations=comfy.ops.disable_weight_init, dtype=torch.float32, device="cpu")
m.load_state_dict(sd, strict=True)
inp = torch.load({inputs!r})
ctx = torch.cat([inp["ctx"], inp["ctx"].new_zeros(1, 512 - inp["ctx"].shape[1], 64)], 1)  # Wan pads to 512
with torch.no_grad():
    out = m(inp["x"], inp["t"], ctx)
torch.save(out, {out!r})
"""


@pytest.mark.skipif(not os.environ.get("COMFYUI_DIR"), reason="set COMFYUI_DIR to a ComfyUI checkout to run")
def test_our_forward_equals_comfyuis_wan_forward(tmp_path):
    sd = tiny_dit_state_dict(seed=8)
    save_file(sd, str(tmp_path / "w.safetensors"))
    g = torch.Generator().manual_seed(0)
    inputs = {"x": torch.randn(1, 16, 3, 8, 8, generator=g), "t": torch.tensor([[937.5, 500.0, 0.0]]),
              "ctx": torch.randn(1, 20, 64, generator=g)}
    torch.save(inputs, tmp_path / "in.pt")
    script = _SCRIPT.format(comfy=os.environ["COMFYUI_DIR"], weights=str(tmp_path / "w.safetensors"),
                            inputs=str(tmp_path / "in.pt"), out=str(tmp_path / "out.pt"))
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                       cwd=os.environ["COMFYUI_DIR"], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    theirs = torch.load(tmp_path / "out.pt")
    model = WanModel(WanConfig.preset("tiny"))
    model.load_state_dict(sd)
    ours = WanBackbone(model)(inputs["x"], inputs["t"], inputs["ctx"])
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() < 1e-4 * max(1.0, theirs.abs().max().item())
    # and the per-frame timesteps matter: the same frames at one shared timestep differ
    flat = WanBackbone(model)(inputs["x"], torch.tensor([500.0]), inputs["ctx"])
    assert (flat - theirs).abs().max() > 1e-3
