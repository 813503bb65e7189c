"""The streaming KV-cache path computes exactly the block-causal attention it stands for."""

import pytest
import torch
import torch.nn.functional as F

from sf_core.cache import KVCache
from sf_core.wan import Bidirectional, BlockCausal

H = W = 8  # latent size -> 16 tokens per frame


def _video(frames, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, frames, H, W, generator=g)
    t = torch.rand(1, frames, generator=g) * 1000
    return x, t


class DenseMask:
    """Independent reference: a dense token mask built from a frame rule, plain SDPA."""

    def __init__(self, visible, frames, tpf):
        fm = torch.tensor([[visible(i, j) for j in range(frames)] for i in range(frames)])
        self.mask = fm.repeat_interleave(tpf, 0).repeat_interleave(tpf, 1)

    def attend(self, layer, q, k, v, attn):
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=self.mask[None, None]
        )
        return out.transpose(1, 2)


def _stream_through_cache(backbone, x, t, text, chunk, capacity, sink=0, rolling=False, read_first=False,
                          sink_positions="adjacent"):
    cfg = backbone.config
    cache = KVCache(cfg, 1, H, W, capacity, sink=sink, rolling=rolling, sink_positions=sink_positions)
    prompt = backbone.encode_text(text)
    outs, reads = [], []
    for s in range(0, x.shape[2], chunk):
        n = min(chunk, x.shape[2] - s)
        xs, ts, frames = x[:, :, s : s + n], t[:, s : s + n], range(s, s + n)
        if read_first:
            reads.append(backbone(xs, ts, prompt, frames, cache.read_plan(s, n)))
        outs.append(backbone(xs, ts, prompt, frames, cache.write_plan(s, n)))
    return torch.cat(outs, 2), (torch.cat(reads, 2) if read_first else None)


def test_cache_path_equals_block_causal_masked_forward(backbone, text):
    x, t = _video(12)
    tpf = backbone.config.tokens_per_frame(H, W)
    masked = backbone(x, t, text, plan=BlockCausal([3, 3, 3, 3], tpf))
    cached, read = _stream_through_cache(backbone, x, t, text, chunk=3, capacity=12, read_first=True)
    reference = backbone(x, t, text, plan=DenseMask(lambda i, j: j // 3 <= i // 3, 12, tpf))
    assert (cached - masked).abs().max() < 1e-4
    assert (read - masked).abs().max() < 1e-4  # the training read path sees the same keys
    assert (masked - reference).abs().max() < 1e-4
    # and causality matters: the bidirectional forward differs on all but the last chunk
    full = backbone(x, t, text)
    assert (full[:, :, :9] - masked[:, :, :9]).abs().max() > 1e-3


def test_first_chunk_with_empty_cache_equals_bidirectional(backbone, text):
    x, t = _video(3, seed=3)
    cache = KVCache(backbone.config, 1, H, W, 9)
    out = backbone(x, t, text, range(3), cache.write_plan(0, 3))
    assert (out - backbone(x, t, text, plan=Bidirectional())).abs().max() < 1e-5


class SinkNextToWindow:
    """Independent reference for window-relative positions: per chunk, plain SDPA over the sink keys turned
    (as complex numbers) by delta frames on RoPE's frame pairs, followed by the window's keys."""

    def __init__(self, chunk, window, sink, frames, tpf):
        self.chunk, self.window, self.sink, self.frames, self.tpf = chunk, window, sink, frames, tpf

    def attend(self, layer, q, k, v, attn):
        D, tpf, S = k.shape[-1], self.tpf, self.sink
        dt = D - 4 * (D // 6)
        omega = 1.0 / 10000.0 ** (torch.arange(0, dt, 2, dtype=torch.float64) / dt)
        outs = []
        for e in range(self.chunk, self.frames + 1, self.chunk):
            lo = max(S, e - (self.window - S))
            turn = torch.ones(D // 2, dtype=torch.complex128)
            turn[: dt // 2] = torch.polar(torch.ones_like(omega), (lo - S) * omega)
            sink_k = k[:, : S * tpf].double()  # [B, S*tpf, H, D] -> complex pairs [B, S*tpf, H, D/2]
            ks = torch.view_as_complex(sink_k.reshape(*sink_k.shape[:3], D // 2, 2).contiguous())
            ks = torch.view_as_real(ks * turn).flatten(-2).float()
            kk = torch.cat([ks, k[:, lo * tpf : e * tpf]], 1) if lo > S else k[:, : e * tpf]
            vv = torch.cat([v[:, : S * tpf], v[:, lo * tpf : e * tpf]], 1) if lo > S else v[:, : e * tpf]
            qq = q[:, (e - self.chunk) * tpf : e * tpf]
            out = F.scaled_dot_product_attention(qq.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2))
            outs.append(out.transpose(1, 2))
        return torch.cat(outs, 1)


@pytest.mark.parametrize("sink_positions", ["absolute", "adjacent"])
def test_rolling_window_with_sink_matches_independent_reference(backbone, text, sink_positions):
    window, sink, chunk, frames = 5, 1, 2, 16  # a video more than three windows long
    x, t = _video(frames, seed=4)
    tpf = backbone.config.tokens_per_frame(H, W)

    def visible(i, j):  # query frame i (chunk ending at e) sees the sink and the last window-sink frames up to e
        e = (i // chunk + 1) * chunk
        return j < e and (j < sink or j >= e - (window - sink))

    if sink_positions == "absolute":  # the sink keeps its own frame positions: a dense mask says it all
        reference = backbone(x, t, text, plan=DenseMask(visible, frames, tpf))
    else:
        reference = backbone(x, t, text, plan=SinkNextToWindow(chunk, window, sink, frames, tpf))
    cached, read = _stream_through_cache(backbone, x, t, text, chunk, capacity=window, sink=sink, rolling=True,
                                         read_first=True, sink_positions=sink_positions)
    masked = backbone(x, t, text, plan=BlockCausal([chunk] * (frames // chunk), tpf, window=window, sink=sink,
                                                   sink_positions=sink_positions))
    assert (cached - reference).abs().max() < 1e-4
    assert (read - reference).abs().max() < 1e-4
    assert (masked - reference).abs().max() < 1e-4
    # the window really drops frames: the whole-history result differs for late chunks
    whole = backbone(x, t, text, plan=BlockCausal([chunk] * (frames // chunk), tpf))
    assert (whole[:, :, -chunk:] - reference[:, :, -chunk:]).abs().max() > 1e-3
    if sink_positions == "adjacent":  # and moving the sink matters once the window has left it
        absolute = backbone(x, t, text, plan=DenseMask(visible, frames, tpf))
        assert (absolute[:, :, -chunk:] - reference[:, :, -chunk:]).abs().max() > 1e-4
        assert (absolute[:, :, :window - 1] - reference[:, :, :window - 1]).abs().max() < 1e-5


def test_rolling_cache_memory_is_fixed(backbone, text):
    cache = KVCache(backbone.config, 1, H, W, 6, sink=2, rolling=True)
    ptr, size = cache.k.data_ptr(), cache.nbytes
    for s in range(0, 300, 3):
        cache.write_plan(s, 3)
    assert cache.k.data_ptr() == ptr and cache.nbytes == size
    # slots hold exactly the sink and the most recent frames
    assert sorted(f for f in cache.slot_frame) == [0, 1, 296, 297, 298, 299]


def test_positions_are_unbounded(backbone, text):
    """RoPE depends on frame differences only: a video placed at frame 5000 (past any table) gives the same output."""
    x, t = _video(6, seed=5)
    tpf = backbone.config.tokens_per_frame(H, W)
    plan = BlockCausal([3, 3], tpf)
    near = backbone(x, t, text, frames=range(6), plan=plan)
    far = backbone(x, t, text, frames=range(5000, 5006), plan=plan)
    assert (near - far).abs().max() < 1e-4
