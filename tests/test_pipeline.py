"""Stream + decode pipeline: timings, frame counts, and the background runner the nodes use."""

import threading
import time

import pytest
import torch

from sf_core.pipeline import Background, Timings, decode_stream
from sf_core.video import to_uint8_frames
from sf_core.stream import Stream


def test_decode_stream_yields_frames_per_chunk_and_sums_timings(backbone, text):
    from sf_core.vae import vae_from_state_dict
    from fixtures.vae import make_tiny_wan_vae_state_dict

    vae = vae_from_state_dict(make_tiny_wan_vae_state_dict(8))
    stream = Stream(backbone, text, latent_height=8, latent_width=8, num_frames=7, generator=0)
    t = Timings()
    steps = list(decode_stream(stream, vae.stream_decoder(), t))
    assert [s.frames.shape[0] for s in steps] == [9, 12, 4]  # 1+4*2, 4*3, 4*1
    assert steps[0].frames.dtype == torch.uint8 and tuple(steps[0].frames.shape[1:]) == (64, 64, 3)
    assert t.frames == 25 and t.latent_frames == 7 and len(t.per_chunk_s) == 3
    assert 0 < t.first_chunk_s <= t.first_frame_s <= t.total_s
    assert all(a.clean_at <= b.clean_at for a, b in zip(steps, steps[1:]))
    whole = to_uint8_frames(vae.decode_normalized(torch.cat([s.chunk.latents for s in steps], 2)))
    assert (torch.cat([s.frames for s in steps]).int() - whole.int()).abs().max() <= 1


def test_background_counts_only_real_items_and_reraises():
    release = threading.Event()

    def produce():
        yield 1
        yield 2
        release.wait(5)
        yield 3

    with Background(produce) as bg:
        it = iter(bg)
        assert next(it) == 1
        deadline = time.monotonic() + 5
        while bg.pending() < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert bg.pending() == 1  # item 2 waits; the end marker is not an item
        assert next(it) == 2 and bg.pending() == 0
        release.set()
        assert list(it) == [3] and bg.pending() == 0

    def broken():
        yield "ok"
        raise RuntimeError("device lost")

    with pytest.raises(RuntimeError, match="device lost"), Background(broken) as bg:
        list(bg)


def test_background_stop_ends_an_endless_producer():
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    with Background(endless, max_ahead=2) as bg:
        for x in bg:
            if x == 3:
                break
    n = len(produced)
    time.sleep(0.2)
    assert len(produced) == n and n <= 3 + 2 + 2  # stopped, with at most the read-ahead produced
