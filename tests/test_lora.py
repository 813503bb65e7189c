"""LoRA adapter: reversible injection, hooks, merge - on a small stand-in with Wan module names."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sf_core.errors import SelfForcingError
from sf_core.lora import DEFAULT_TARGETS, LoRA, find_targets

from fixtures.lora_model import (DIM, FFN, assert_restored, make_inputs, make_model, merged_copy, randomize, snapshot,
                                  target_paths)


# ----------------------------------------------------------------------------- tests
def test_default_targets_are_every_block_linear():
    model = make_model(layers=3)
    assert sorted(find_targets(model, DEFAULT_TARGETS)) == sorted(target_paths(3))
    lora = LoRA.create(model, rank=4)
    assert lora.paths == sorted(target_paths(3))
    assert sorted(find_targets(model, ["blocks.*.self_attn.*"])) == sorted(
        f"blocks.{i}.self_attn.{n}" for i in range(3) for n in "qkvo")


def test_fresh_lora_is_a_noop_and_b_starts_at_zero():
    model = make_model()
    inputs = make_inputs()
    ref = model(*inputs)
    lora = LoRA.inject(model, rank=4, alpha=8, generator=torch.Generator().manual_seed(0))
    for path in lora.paths:
        assert torch.count_nonzero(lora.layer(path).B) == 0
        assert torch.count_nonzero(lora.layer(path).A) > 0  # A initialised, so B's gradient is nonzero
    assert torch.equal(model(*inputs), ref)
    lora.remove()


def test_hooked_output_equals_independently_merged_weights():
    rank, alpha = 4, 12.0
    model = make_model()
    inputs = make_inputs()
    base = model(*inputs)
    lora = LoRA.inject(model, rank=rank, alpha=alpha)
    randomize(lora)
    deltas = {p: (alpha / rank) * lora.layer(p).B.detach() @ lora.layer(p).A.detach() for p in lora.paths}
    expected = merged_copy(model, deltas)(*inputs)
    out = model(*inputs)
    assert not torch.allclose(out, base, atol=1e-3)  # the LoRA does something
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # one Linear checked by hand: x W^T + b + s * x A^T B^T
    lin = dict(model.named_modules())["blocks.1.ffn.0"]
    x = torch.randn(3, DIM)
    L = lora.layer("blocks.1.ffn.0")
    torch.testing.assert_close(lin(x), x @ lin.weight.T + lin.bias + (alpha / rank) * (x @ L.A.T) @ L.B.T)
    lora.strength = 0.5
    half = merged_copy(model, {p: 0.5 * d for p, d in deltas.items()})(*inputs)
    torch.testing.assert_close(model(*inputs), half, rtol=1e-5, atol=1e-5)
    lora.remove()


def test_remove_restores_model_bitwise_even_after_training_steps():
    model = make_model()
    model.blocks[0].norm3.weight.requires_grad_(False)  # mixed flags, to see they come back as they were
    model.head.head.bias.requires_grad_(False)
    snap = snapshot(model)
    inputs = make_inputs()
    ref = model(*inputs).detach()
    lora = LoRA.inject(model, rank=4)
    assert all(not p.requires_grad for p in model.parameters())  # frozen while attached
    opt = torch.optim.SGD(lora.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(*inputs).square().mean().backward()
        opt.step()
    assert not torch.allclose(model(*inputs), ref)
    lora.remove()
    assert_restored(model, snap)
    assert torch.equal(model(*inputs), ref)
    assert not lora.attached_to(model)


def test_only_lora_parameters_get_gradients():
    model = make_model()
    lora = LoRA.inject(model, rank=4)
    model(*make_inputs()).square().mean().backward()
    assert all(p.grad is None for p in model.parameters())
    for path in lora.paths:
        L = lora.layer(path)
        assert L.A.grad is not None and L.B.grad is not None
        assert torch.count_nonzero(L.B.grad) > 0
    assert {id(p) for p in lora.parameters()}.isdisjoint(id(p) for p in model.parameters())
    assert len(list(lora.parameters())) == 2 * len(target_paths())
    lora.remove()


def test_enabled_toggle_and_disabled_context_share_one_base():
    model = make_model()
    inputs = make_inputs()
    base = model(*inputs)
    critic = LoRA.inject(model, rank=4)
    randomize(critic)
    with_lora = model(*inputs)
    assert not torch.allclose(with_lora, base)
    with critic.disabled():
        assert torch.equal(model(*inputs), base)  # the teacher: the same base, no LoRA
    assert critic.enabled
    critic.enabled = False
    assert torch.equal(model(*inputs), base)
    critic.enabled = True
    assert torch.equal(model(*inputs), with_lora)
    critic.remove()


def test_two_lora_sets_at_different_times_and_stacked():
    model = make_model()
    model.blocks[1].modulation.requires_grad_(False)
    snap = snapshot(model)
    inputs = make_inputs()
    a, b = LoRA.create(model, rank=4), LoRA.create(model, rank=2, alpha=6, targets=["blocks.*.ffn.*"])
    randomize(a, seed=1)
    randomize(b, seed=2)
    da = {p: a.layer(p).B.detach() @ a.layer(p).A.detach() for p in a.paths}
    db = {p: 3.0 * b.layer(p).B.detach() @ b.layer(p).A.detach() for p in b.paths}
    with a.applied(model):
        out_a = model(*inputs)
    assert_restored(model, snap)
    with b.applied(model):
        out_b = model(*inputs)
    assert_restored(model, snap)
    torch.testing.assert_close(out_a, merged_copy(model, da)(*inputs), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_b, merged_copy(model, db)(*inputs), rtol=1e-5, atol=1e-5)
    both = {p: da.get(p, 0) + db.get(p, 0) for p in set(da) | set(db)}
    for order in ("lifo", "fifo"):
        a.attach(model)
        b.attach(model)
        torch.testing.assert_close(model(*inputs), merged_copy(model, both)(*inputs), rtol=1e-5, atol=1e-5)
        first, second = (b, a) if order == "lifo" else (a, b)
        first.remove()
        assert all(not p.requires_grad for p in model.parameters())  # the other LoRA is still training
        second.remove()
        assert_restored(model, snap)


def test_applied_removes_on_error_and_double_attach_is_refused():
    model = make_model()
    snap = snapshot(model)
    lora = LoRA.create(model, rank=2)
    with pytest.raises(RuntimeError, match="boom"):
        with lora.applied(model):
            raise RuntimeError("boom")
    assert_restored(model, snap)
    lora.attach(model)
    with pytest.raises(SelfForcingError, match="already attached"):
        lora.attach(model)
    lora.remove()
    assert_restored(model, snap)


def test_merge_equals_hooks_and_unmerge_restores():
    model = make_model()
    inputs = make_inputs()
    snap = snapshot(model)
    lora = LoRA.inject(model, rank=4, alpha=2)
    randomize(lora)
    hooked = model(*inputs)
    lora.merge(model)  # hooks go quiet while merged: the delta must not be added twice
    torch.testing.assert_close(model(*inputs), hooked, rtol=1e-5, atol=1e-5)
    with lora.disabled():  # the merged weights alone carry the LoRA
        torch.testing.assert_close(model(*inputs), hooked, rtol=1e-5, atol=1e-5)
    lora.unmerge(model)
    torch.testing.assert_close(model(*inputs), hooked, rtol=1e-5, atol=1e-5)  # hooks active again
    lora.remove()
    for k, v in snap["tensors"].items():  # subtraction: exact up to fp32 rounding
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=1e-6)
    with pytest.raises(SelfForcingError, match="not merged"):
        lora.unmerge(model)


def test_merge_with_backup_restores_bitwise():
    model = make_model()
    model_ref = copy.deepcopy(model)
    lora = LoRA.create(model, rank=4)
    randomize(lora)
    lora.merge(model, backup=True)
    assert not torch.equal(model.blocks[0].self_attn.q.weight, model_ref.blocks[0].self_attn.q.weight)
    lora.remove()
    for (k, v), (k2, v2) in zip(model.state_dict().items(), model_ref.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k


def test_attach_to_model_missing_paths_or_wrong_shapes_is_a_clear_error():
    lora = LoRA.create(make_model(layers=3), rank=2)
    small = make_model(layers=2)
    snap = snapshot(small)
    with pytest.raises(SelfForcingError) as e:
        lora.attach(small)
    msg = str(e.value)
    assert "missing" in msg and "blocks.2.self_attn.q" in msg and "blocks.2.ffn.2" in msg
    assert "blocks.1.self_attn.q" not in msg
    assert_restored(small, snap)  # nothing half-attached
    wide = make_model(layers=3, ffn=FFN * 2)
    with pytest.raises(SelfForcingError, match=r"blocks\.0\.ffn\.0.*\(in, out\)"):
        lora.attach(wide)
    with pytest.raises(SelfForcingError, match=r"matched no Linear.*self_attn\.qq"):
        LoRA.create(small, rank=2, targets=["blocks.*.self_attn.qq"])
    with pytest.raises(SelfForcingError, match="non-Linear.*blocks.0.norm3"):
        LoRA.create(small, rank=2, targets=["blocks.*.norm3"])
    # a wildcard over a Sequential takes its Linears and skips the GELU
    assert sorted(find_targets(small, ["blocks.*.ffn.*"])) == [f"blocks.{i}.ffn.{j}" for i in range(2) for j in (0, 2)]


@pytest.mark.parametrize("rank", [0, -1, 1.5, True])
def test_bad_rank_is_a_clear_error(rank):
    with pytest.raises(SelfForcingError, match="rank"):
        LoRA.create(make_model(), rank=rank)


def test_bad_alpha_and_dtype_are_clear_errors():
    with pytest.raises(SelfForcingError, match="alpha"):
        LoRA.create(make_model(), rank=2, alpha=0)
    with pytest.raises(SelfForcingError, match="dtype"):
        LoRA.create(make_model(), rank=2, dtype=torch.float8_e4m3fn)


def test_bf16_base_with_fp32_lora():
    rank, alpha = 4, 4.0
    model = make_model().to(torch.bfloat16)
    snap = snapshot(model)
    inputs = make_inputs(torch.bfloat16)
    lora = LoRA.inject(model, rank=rank, alpha=alpha)
    randomize(lora, std=0.3)
    L = lora.layer("blocks.0.self_attn.k")
    assert L.A.dtype == torch.float32 and model.blocks[0].self_attn.k.weight.dtype == torch.bfloat16
    lin = model.blocks[0].self_attn.k
    x = torch.randn(5, DIM).to(torch.bfloat16)
    y = lin(x)
    assert y.dtype == torch.bfloat16
    want = F.linear(x, lin.weight, lin.bias).float() + (x.float() @ L.A.T) @ L.B.T  # delta in fp32
    torch.testing.assert_close(y.float(), want, rtol=2e-2, atol=2e-2)
    out = model(*inputs)
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert L.B.grad is not None and L.B.grad.dtype == torch.float32 and torch.count_nonzero(L.B.grad) > 0
    lora.merge(model)  # merging into bf16 weights works (rounded once)
    assert model.blocks[0].self_attn.k.weight.dtype == torch.bfloat16
    torch.testing.assert_close(model(*inputs).float(), out.detach().float(), rtol=5e-2, atol=5e-2)
    lora.remove()
    assert snapshot(model)["flags"] == snap["flags"]


class CastLinear(nn.Linear):
    """Like comfy.ops: weight stored in fp8, cast to the input dtype inside forward."""

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def test_hooks_work_on_fp8_cast_linear_and_merge_refuses_fp8():
    model = make_model()
    for block in model.blocks:
        for attn in (block.self_attn, block.cross_attn):
            for n in "qkvo":
                old = getattr(attn, n)
                new = CastLinear(DIM, DIM)
                new.weight = nn.Parameter(old.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
                new.bias = nn.Parameter(old.bias.detach())
                setattr(attn, n, new)
    snap = snapshot(model)
    inputs = make_inputs()
    lora = LoRA.inject(model, rank=4)
    randomize(lora)
    q = model.blocks[1].cross_attn.q
    L = lora.layer("blocks.1.cross_attn.q")
    x = torch.randn(3, DIM)
    torch.testing.assert_close(q(x), x @ q.weight.float().T + q.bias + (x @ L.A.T) @ L.B.T)
    model(*inputs).square().mean().backward()
    assert torch.count_nonzero(L.B.grad) > 0
    with pytest.raises(SelfForcingError, match="fp8"):
        lora.merge(model)
    lora.remove()
    assert_restored(model, snap)


def test_trainer_state_dict_round_trip():
    model = make_model()
    inputs = make_inputs()
    lora = LoRA.create(model, rank=4, alpha=2)
    randomize(lora)
    sd = lora.state_dict()
    assert all(type(v) is torch.Tensor for v in sd.values()) and len(sd) == 2 * len(target_paths())
    fresh = LoRA.create(model, rank=4, alpha=2)
    fresh.load_state_dict(sd)
    with lora.applied(model):
        a = model(*inputs)
    with fresh.applied(model):
        assert torch.equal(model(*inputs), a)


def test_deepcopy_of_an_attached_lora_is_unattached():
    model = make_model()
    inputs = make_inputs()
    lora = LoRA.inject(model, rank=4)
    randomize(lora)
    out = model(*inputs)
    ema = copy.deepcopy(lora)  # what a trainer does for EMA weights
    assert lora.attached_to(model) and not ema.attached_to(model)
    ema.remove()  # must not take the original's hooks off
    assert torch.equal(model(*inputs), out)
    for p in lora.paths:
        assert torch.equal(ema.layer(p).B, lora.layer(p).B) and ema.layer(p).B is not lora.layer(p).B
    lora.remove()


def test_init_is_seeded_by_the_generator():
    model = make_model()
    a = LoRA.create(model, rank=4, generator=torch.Generator().manual_seed(11))
    b = LoRA.create(model, rank=4, generator=torch.Generator().manual_seed(11))
    c = LoRA.create(model, rank=4, init="normal", generator=torch.Generator().manual_seed(11))
    for p in a.paths:
        assert torch.equal(a.layer(p).A, b.layer(p).A)
        assert not torch.equal(a.layer(p).A, c.layer(p).A)
    assert LoRA.create(model, rank=4, dtype=torch.bfloat16).layer(a.paths[0]).A.dtype == torch.bfloat16


def test_on_sf_core_wan_model():
    """The engine's own WanModel (comfy-style casting Linears, real forward): same contract."""
    wan = pytest.importorskip("sf_core.wan")
    from sf_core.config import WanConfig

    torch.manual_seed(0)
    cfg = WanConfig.preset("tiny")
    model = wan.WanModel(cfg)
    snap = snapshot(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.in_dim, 2, 4, 4, generator=g)
    t = torch.tensor([500.0])
    text = torch.randn(1, 7, cfg.text_dim, generator=g)
    with torch.no_grad():
        base = model(x, t, text)
    lora = LoRA.inject(model, rank=4, alpha=8)
    assert lora.paths == sorted(target_paths(cfg.num_layers))
    randomize(lora, std=0.05)
    deltas = {p: 2.0 * lora.layer(p).B.detach() @ lora.layer(p).A.detach() for p in lora.paths}
    with torch.no_grad():
        out = model(x, t, text)
        want = merged_copy(model, deltas)(x, t, text)
    assert not torch.allclose(out, base, atol=1e-4)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    model(x, t, text).square().mean().backward()
    assert all(p.grad is None for p in model.parameters())
    assert torch.count_nonzero(lora.layer("blocks.1.cross_attn.v").B.grad) > 0
    lora.remove()
    assert_restored(model, snap)


_COMFY_WAN_CHECK = """
import sys, torch
sys.argv = [sys.argv[0], "--cpu"]
sys.path.insert(0, {comfy!r})
sys.path.insert(0, {repo!r})
import comfy.options
comfy.options.enable_args_parsing()
import comfy.ops
from comfy.ldm.wan.model import WanModel
from sf_core.lora import LoRA
torch.manual_seed(0)
m = WanModel(dim=256, ffn_dim=512, freq_dim=64, text_dim=64, num_heads=2, num_layers=2,
             operations=comfy.ops.manual_cast, dtype=torch.float32, device="cpu")
with torch.no_grad():
    for p in m.parameters():
        p.normal_(0, 0.05)
x, t, ctx = torch.randn(1, 16, 2, 4, 4), torch.tensor([500.0]), torch.randn(1, 7, 64)
with torch.no_grad():
    base = m(x, t, ctx)
lora = LoRA.inject(m, rank=4)
assert type(m.blocks[0].self_attn.q).__module__ == "comfy.ops", type(m.blocks[0].self_attn.q)
with torch.no_grad():
    for p in lora.parameters():
        p.normal_(0, 0.05)
    hooked = m(x, t, ctx)
    lora.merge(m)
    merged = m(x, t, ctx)
lora.remove()
with torch.no_grad():
    after = m(x, t, ctx)
assert len(lora.paths) == 20, lora.paths
assert (hooked - base).abs().max() > 1e-3, "the LoRA changed nothing"
torch.testing.assert_close(merged, hooked, rtol=1e-4, atol=1e-5)
torch.testing.assert_close(after, base, rtol=0, atol=1e-5)
for mod in m.modules():
    assert not mod._forward_hooks and not mod._forward_hooks_with_kwargs
print("OK")
"""


@pytest.mark.skipif(not os.environ.get("COMFYUI_DIR"), reason="set COMFYUI_DIR to a ComfyUI checkout to run")
def test_hooks_on_comfyui_wan_model_with_comfy_ops():
    """ComfyUI's own WanModel built with comfy.ops.manual_cast Linears: the Wan names match our default
    targets, the hooks fire through comfy's casting forward, merge == hooks, remove restores."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = _COMFY_WAN_CHECK.format(comfy=os.environ["COMFYUI_DIR"], repo=repo)
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                       cwd=os.environ["COMFYUI_DIR"], timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
