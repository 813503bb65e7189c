"""Regional compile of the transformer block (inductor's CPU backend) against the eager reference."""

import pytest
import torch

from sf_core.stream import Stream, StreamSettings
from sf_core.wan import WanBackbone
from sf_core.wan.compile import compile_unavailable

pytestmark = pytest.mark.skipif(compile_unavailable("cpu") is not None, reason=str(compile_unavailable("cpu")))

# Window 6 / sink 1 with 2-frame chunks: the window fills at chunk 3 and the ring wraps after it.
SETTINGS = StreamSettings(frames_per_chunk=2, window=6, sink=1)


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def test_compiled_stream_equals_eager_and_never_recompiles_once_running(tiny_model, text):
    import torch._dynamo

    torch._dynamo.reset()
    eager = WanBackbone(tiny_model, dtype=torch.float32, attn="sdpa")
    compiled = WanBackbone(tiny_model, dtype=torch.float32, attn="sdpa", compile=True)
    assert compiled.kernels.compiled and not eager.kernels.compiled

    def run(bb, after_first=None):
        out = []
        for chunk in Stream(bb, text, latent_height=8, latent_width=8, num_frames=12, settings=SETTINGS, generator=3):
            out.append(chunk.latents)
            if after_first is not None and len(out) == 1:
                after_first.append(_graphs())
        return torch.cat(out, dim=2)

    before = _graphs()
    first = []
    got = run(compiled, first)
    assert first[0] > before, "the first chunk must build compiled graphs"
    assert _graphs() == first[0], "chunks after the first (window filling, full, wrapping) must reuse the graphs"
    want = run(eager)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert got.std() > 0.1  # a real output, not zeros


def test_compile_refused_clearly_where_it_cannot_run(tiny_model, monkeypatch):
    import shutil

    from sf_core.errors import SelfForcingError

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(SelfForcingError, match="C\\+\\+ compiler.*turn compile off"):
        WanBackbone(tiny_model, dtype=torch.float32, compile=True)
