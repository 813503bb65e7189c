"""Overlapped decode (worker threads on CPU) against in-line decode: same frames, same order, same previews."""

import threading

import pytest
import torch

from sf_core.pipeline import Timings, decode_stream
from sf_core.stream import Stream, StreamSettings


@pytest.fixture(scope="module")
def decoders():
    from sf_core.vae import decoder_from_state_dict, vae_from_state_dict
    from fixtures.vae import make_tiny_taehv_state_dict, make_tiny_wan_vae_state_dict

    return vae_from_state_dict(make_tiny_wan_vae_state_dict(8)), decoder_from_state_dict(make_tiny_taehv_state_dict())


def _run(backbone, text, decoders, overlap, chunks=5):
    wan, taehv = decoders
    stream = Stream(backbone, text, latent_height=8, latent_width=8, num_frames=3 * chunks,
                    settings=StreamSettings(window=6, sink=1), generator=4)
    t = Timings()
    steps = list(decode_stream(stream, wan.stream_decoder(), t, overlap=overlap,
                               preview=taehv.stream_decoder()))
    return steps, t


def test_overlapped_decode_gives_the_inline_frames_in_order(backbone, text, decoders):
    inline, t_in = _run(backbone, text, decoders, overlap=False)
    over, t_over = _run(backbone, text, decoders, overlap=True)
    assert [s.chunk.index for s in over] == [s.chunk.index for s in inline] == list(range(5))
    for a, b in zip(over, inline):
        assert torch.equal(a.chunk.latents, b.chunk.latents)
        assert torch.equal(a.frames, b.frames)
        assert torch.equal(a.preview, b.preview)
        assert a.preview.shape[0] == a.frames.shape[0]  # the preview covers the same frames
    assert t_over.frames == t_in.frames == 1 + 4 * 14 and t_over.latent_frames == 15
    assert 0 < t_over.first_chunk_s <= t_over.first_frame_s <= t_over.total_s
    assert all(a.clean_at <= b.clean_at for a, b in zip(over, over[1:]))


def test_breaking_out_stops_the_workers_and_errors_reach_the_caller(backbone, text, decoders):
    wan, _ = decoders
    stream = Stream(backbone, text, latent_height=8, latent_width=8, num_frames=None,
                    settings=StreamSettings(window=6, sink=1), generator=4)
    for i, step in enumerate(decode_stream(stream, wan.stream_decoder(), overlap=True)):
        if i == 1:
            break
    assert not [th for th in threading.enumerate() if th.name.startswith("sf-")]

    class Broken:
        def decode_normalized(self, z):
            raise RuntimeError("decoder out of memory")

    stream = Stream(backbone, text, latent_height=8, latent_width=8, num_frames=9, generator=4)
    with pytest.raises(RuntimeError, match="decoder out of memory"):
        list(decode_stream(stream, Broken(), overlap=True))
    assert not [th for th in threading.enumerate() if th.name.startswith("sf-")]


def test_overlap_without_a_decoder_yields_the_chunks_in_order(backbone, text):
    def run(overlap):
        stream = Stream(backbone, text, latent_height=8, latent_width=8, num_frames=9, generator=5)
        return list(decode_stream(stream, None, overlap=overlap))

    inline, over = run(False), run(True)
    assert [s.chunk.index for s in over] == [0, 1, 2] and all(s.frames is None for s in over)
    assert all(torch.equal(a.chunk.latents, b.chunk.latents) for a, b in zip(over, inline))
