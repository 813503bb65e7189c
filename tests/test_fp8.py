"""fp8 linear layers: quantisation round trip, the fp8 matmul against a dequantised reference (CPU)."""

import pytest
import torch

from sf_core.errors import SelfForcingError
from sf_core.wan import WanBackbone
from sf_core.wan.fp8 import Fp8Linear, dequantize, fp8_matmul_unavailable, quantize, quantize_linears
from sf_core.wan.modules import Linear

E4M3_MAX = 448.0
E4M3_REL = 2.0**-4  # 3 mantissa bits: round-to-nearest relative error at most 2^-4


def test_quantize_round_trip_within_e4m3_precision():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g) * 0.05
    w8, scale = quantize(w)
    assert w8.dtype == torch.float8_e4m3fn and scale.ndim == 0
    assert w8.float().abs().max() == E4M3_MAX  # the largest magnitude uses the whole range
    back = dequantize(w8, scale)
    normal = w.abs() > scale * 2.0**-6  # e4m3 normals (below: absolute error at most half a subnormal step)
    assert ((back - w).abs()[normal] <= w.abs()[normal] * E4M3_REL).all()
    assert ((back - w).abs()[~normal] <= scale * 2.0**-10).all()
    w8b, scale_b = quantize(back)  # quantising a dequantised tensor changes nothing
    assert torch.equal(w8b.view(torch.uint8), w8.view(torch.uint8)) and torch.allclose(scale_b, scale)


def test_fp8_linear_equals_a_dequantised_reference():
    g = torch.Generator().manual_seed(1)
    lin = Linear(96, 64)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05, generator=g)
        lin.bias.normal_(0, 0.05, generator=g)
    x = torch.randn(2, 7, 96, generator=g)
    fp8 = Fp8Linear.from_linear(lin, "scaled_mm")
    assert fp8.weight.dtype == torch.float8_e4m3fn
    # reference: both operands quantised per tensor, dequantised by hand, plain fp32 matmul
    xs = x.abs().max() / E4M3_MAX
    x_dq = (x / xs).to(torch.float8_e4m3fn).float() * xs
    w_dq = fp8.weight.float() * fp8.scale_weight
    want = x_dq @ w_dq.T + lin.bias
    torch.testing.assert_close(fp8(x).detach(), want.detach(), rtol=1e-5, atol=1e-5)
    # and both are close to the full-precision layer
    exact = lin(x).detach()
    assert (fp8(x).detach() - exact).abs().max() < 0.1 * exact.abs().max()
    deq = Fp8Linear.from_linear(lin, "dequant")
    torch.testing.assert_close(deq(x).detach(), (x @ w_dq.T + lin.bias).detach(), rtol=1e-5, atol=1e-5)


def test_quantized_model_close_to_the_reference(tiny_model, tiny_config, text):
    import copy

    ref = WanBackbone(tiny_model, dtype=torch.float32, attn="sdpa")
    model = copy.deepcopy(tiny_model)
    n = quantize_linears(model, matmul="scaled_mm")
    assert n == 10 * tiny_config.num_layers
    assert isinstance(model.blocks[0].ffn[2], Fp8Linear) and not isinstance(model.head.head, Fp8Linear)
    fp8 = WanBackbone(model, dtype=torch.float32, attn="sdpa")
    x = torch.randn(1, 16, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([500.0])
    want, got = ref(x, t, text), fp8(x, t, text)
    rel = (got - want).norm() / want.norm()
    assert 0 < rel < 0.05, rel


def test_fp8_file_weights_are_kept_not_requantized(tmp_path, tiny_config):
    from sf_core.checkpoints import load_dit
    from fixtures.dit import tiny_dit_state_dict, write_dit

    sd = tiny_dit_state_dict(tiny_config)
    key = "blocks.0.ffn.0.weight"
    stored = {}
    for k, v in sd.items():
        if k.startswith("blocks.") and k.endswith(".weight") and v.ndim == 2:
            w8, scale = quantize(v)
            stored[k], stored[k[: -len("weight")] + "scale_weight"] = w8, scale * 1.5  # a scale quantize() would not pick
        else:
            stored[k] = v
    path = write_dit(tmp_path / "fp8.safetensors", stored)
    model, _ = load_dit(path, keep_fp8=True)
    quantize_linears(model, matmul="dequant")
    lin = model.blocks[0].ffn[0]
    assert isinstance(lin, Fp8Linear)
    assert torch.equal(lin.weight.view(torch.uint8), stored[key].view(torch.uint8))
    assert torch.equal(lin.scale_weight, stored["blocks.0.ffn.0.scale_weight"].reshape(()))


def test_gpu_without_fp8_matmul_gets_a_clear_message(monkeypatch, tiny_model):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA RTX A6000")
    reason = fp8_matmul_unavailable("cuda")
    assert "A6000" in reason and "8.9" in reason
    from sf_core.wan.fp8 import resolve_matmul

    with pytest.raises(SelfForcingError, match="8.9 or newer.*without fp8"):
        resolve_matmul("auto", "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8_matmul_unavailable("cuda") is None and resolve_matmul("auto", "cuda") == "scaled_mm"
