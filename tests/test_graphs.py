"""Preconditions of graph-captured chunk steps, checked on CPU: with the window full, every forward of a chunk
runs on preallocated buffers at fixed addresses, allocates the same whatever the chunk, never waits for the
device, and gives the eager result; where it cannot (cache filling, hooks, grad) the forward runs eagerly."""

import pytest
import torch

from sf_core.stream import Stream, StreamSettings
from sf_core.wan import WanBackbone

# window 6 / sink 1 / 2-frame chunks: full from the 3rd chunk on; the 5-slot ring makes chunks wrap around it
SETTINGS = StreamSettings(frames_per_chunk=2, window=6, sink=1)
CHUNKS = 8


def _stream(bb, text, chunks=CHUNKS, seed=0):
    return Stream(bb, text, latent_height=8, latent_width=8, num_frames=2 * chunks, settings=SETTINGS, generator=seed)


def _full_window_forwards(chunks=CHUNKS):
    """Forwards that see a full window: chunks whose end frame reaches the window; 4 steps + clean pass each
    (the last chunk has no clean pass)."""
    steps = len(SETTINGS.steps)
    full = [i for i in range(chunks) if 2 * (i + 1) >= SETTINGS.window]
    return sum(steps + (i < chunks - 1) for i in full)


def test_static_steps_give_the_eager_video(tiny_model, text):
    eager = torch.cat([c.latents for c in _stream(WanBackbone(tiny_model, attn="sdpa"), text)], dim=2)
    bb = WanBackbone(tiny_model, attn="sdpa", graphs=True)
    static = torch.cat([c.latents for c in _stream(bb, text)], dim=2)
    assert torch.equal(static, eager)
    assert bb.graphs.stats["static"] == _full_window_forwards()
    assert bb.graphs.stats["steps"] == 1  # one set of buffers serves every step and clean pass of every chunk
    assert bb.graphs.stats["eager"] > 0 and "filling" in bb.graphs.last_reason


SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


class NoHostSync:
    """Raise on any tensor -> host read while active."""

    def __init__(self, monkeypatch):
        self.mp, self.on = monkeypatch, False
        for name in SYNCS:
            orig = getattr(torch.Tensor, name)

            def guard(t, *a, _orig=orig, _name=name, **k):
                if self.on:
                    raise AssertionError(f"host sync: Tensor.{_name} in a static chunk step")
                return _orig(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, guard)


def test_full_window_chunks_use_fixed_addresses_and_never_sync(tiny_model, text, monkeypatch):
    bb = WanBackbone(tiny_model, attn="sdpa", graphs=True)
    guard = NoHostSync(monkeypatch)
    addresses, outputs = [], []
    run = bb.graphs.run

    def recording(*a, **k):
        out = run(*a, **k)
        if out is not None:
            addresses.append({n: t.data_ptr() for n, t in bb.graphs.step.buffers().items()})
            outputs.append(bb.graphs.step.out.data_ptr())
        return out

    monkeypatch.setattr(bb.graphs, "run", recording)
    it = iter(_stream(bb, text))
    for i in range(CHUNKS):
        guard.on = 2 * (i + 1) > SETTINGS.window  # chunks after the first full one: the whole chunk, not only the step
        next(it)
        guard.on = False
    assert len(addresses) == _full_window_forwards()
    assert all(a == addresses[0] for a in addresses), "a buffer moved between chunks"
    assert len(set(outputs)) == 1
    assert {"x", "t", "cos", "sin", "index", "cache_k", "prompt_k0", "out"} <= set(addresses[0])


def _allocations(bb, text, chunks):
    """Per full-window chunk: the (op, bytes) sequence of every CPU allocation made during it."""
    from torch.profiler import ProfilerActivity, profile

    per_chunk = []
    it = iter(_stream(bb, text, chunks))
    for i in range(chunks):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            next(it)
        if 2 * (i + 1) > SETTINGS.window and i < chunks - 1:
            per_chunk.append([(e.name, e.cpu_memory_usage) for e in prof.events()
                              if e.cpu_memory_usage > 0 and e.name.startswith("aten::")])
    return per_chunk


def test_allocations_do_not_depend_on_the_chunk(tiny_model, text):
    bb = WanBackbone(tiny_model, attn="sdpa", graphs=True)
    per_chunk = _allocations(bb, text, 7)
    assert len(per_chunk) == 3 and per_chunk[0]
    assert all(p == per_chunk[0] for p in per_chunk), "allocations changed from one full-window chunk to the next"


def test_hooks_and_grad_run_eagerly_with_the_same_result(tiny_model, text):
    from sf_core.lora import LoRA

    eager = torch.cat([c.latents for c in _stream(WanBackbone(tiny_model, attn="sdpa"), text, 4)], dim=2)
    lora = LoRA.create(tiny_model, rank=2)
    with lora.applied(tiny_model):  # LoRA layers run as forward hooks: no static step
        bb = WanBackbone(tiny_model, attn="sdpa", graphs=True)
        with_lora = torch.cat([c.latents for c in _stream(bb, text, 4)], dim=2)
        assert bb.graphs.stats["static"] == 0 and "hooks" in bb.graphs.last_reason
    torch.testing.assert_close(with_lora, eager)  # a fresh LoRA is zero: same video
    bb = WanBackbone(tiny_model, attn="sdpa", graphs=True)
    x = torch.randn(1, 16, 2, 8, 8)
    with torch.enable_grad():
        assert bb.graphs.run(x, torch.zeros(1, 2), None, range(2), None) is None
    assert "grad" in bb.graphs.last_reason


def test_changed_module_tree_gets_a_new_static_step(tiny_model, text):
    import copy

    model = copy.deepcopy(tiny_model)
    bb = WanBackbone(model, attn="sdpa", graphs=True)
    it = iter(_stream(bb, text, 6))
    for _ in range(4):
        next(it)
    old = model.blocks[1].ffn[2]
    new = copy.deepcopy(old)
    with torch.no_grad():
        new.weight.mul_(1.5)
    model.blocks[1].ffn[2] = new  # e.g. a LoRA merged into a copy of a layer between chunks
    rest = torch.cat([c.latents for c in it], dim=2)
    assert bb.graphs.stats["steps"] == 2

    ref_model = copy.deepcopy(tiny_model)
    ref = WanBackbone(ref_model, attn="sdpa")
    it = iter(_stream(ref, text, 6))
    for _ in range(4):
        next(it)
    ref_model.blocks[1].ffn[2] = copy.deepcopy(new)
    torch.testing.assert_close(rest, torch.cat([c.latents for c in it], dim=2), rtol=0, atol=0)


def record_once():
    """A CPU stand-in for CUDA graph capture, given to ChunkGraphs as its `capture`: the forward is recorded
    once as a fixed op sequence (make_fx; every tensor it touches is a constant of the recording, by
    reference), and replay() runs that recording into the output buffer, as a captured graph does - only the
    buffers' contents change between replays. Returns (capture, log of calls)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    calls = []

    def capture(forward, device):
        recorded = make_fx(forward)()
        out = recorded()
        calls.append("capture")

        def replay():
            calls.append("replay")
            out.copy_(recorded())

        return replay, out

    return capture, calls


def _stream_with_capture(tiny_model, text, capture):
    bb = WanBackbone(tiny_model, attn="sdpa", graphs=True)
    bb.graphs.capture = capture
    return bb, torch.cat([c.latents for c in _stream(bb, text)], dim=2)


def test_one_captured_step_replayed_gives_the_eager_video(tiny_model, text):
    eager = torch.cat([c.latents for c in _stream(WanBackbone(tiny_model, attn="sdpa"), text)], dim=2)
    capture, calls = record_once()
    bb, replayed = _stream_with_capture(tiny_model, text, capture)
    torch.testing.assert_close(replayed, eager, rtol=1e-5, atol=1e-5)
    assert calls.count("capture") == 1 == bb.graphs.stats["captures"]
    assert calls.count("replay") == _full_window_forwards() == bb.graphs.stats["static"]


def test_a_value_fed_around_the_buffers_goes_stale_on_replay(tiny_model, text):
    """Negative control of the stand-in: a recording that reads the RoPE angles of the captured chunk
    instead of the static buffers replays them for every later chunk, and the video is wrong."""
    eager = torch.cat([c.latents for c in _stream(WanBackbone(tiny_model, attn="sdpa"), text)], dim=2)
    capture, _ = record_once()
    holder = {}

    def stale(forward, device):
        bb, step = holder["bb"], holder["bb"].graphs.step
        return capture(lambda: bb._run(step.x, step.t, step.prompt, step._rope_src, step.plan), device)

    bb = WanBackbone(tiny_model, attn="sdpa", graphs=True)
    holder["bb"], bb.graphs.capture = bb, stale
    wrong = torch.cat([c.latents for c in _stream(bb, text)], dim=2)
    assert (wrong - eager).abs().max() > 1e-3


def test_a_failed_capture_falls_back_to_eager_for_good(tiny_model, text, caplog):
    eager = torch.cat([c.latents for c in _stream(WanBackbone(tiny_model, attn="sdpa"), text)], dim=2)

    def impossible(forward, device):
        raise RuntimeError("operation not permitted when stream is capturing")

    bb, got = _stream_with_capture(tiny_model, text, impossible)
    assert torch.equal(got, eager)
    assert bb.graphs.stats["static"] == 0 and "capture failed" in bb.graphs.last_reason
    assert any("capture failed" in r.message for r in caplog.records)
