"""Live steering: prompt changes posted while a stream runs, applied at the next chunk boundary, replayable."""

import threading

import pytest
import torch

from sf_core.errors import SelfForcingError
from sf_core.pipeline import Background
from sf_core.steering import PromptInbox, blend_text
from sf_core.stream import PromptSegment, PromptTimeline, Stream, StreamSettings

H = W = 8


def _stream(backbone, prompts, frames=15, inbox=None, seed=0, **settings):
    return Stream(backbone, prompts, latent_height=H, latent_width=W, num_frames=frames,
                  settings=StreamSettings(**settings), generator=seed, inbox=inbox)


def _latents(chunks):
    return torch.cat([c.latents for c in chunks], 2)


def test_a_prompt_posted_mid_stream_switches_at_the_next_chunk(backbone, text):
    """The stream runs in its own thread; a post from this thread lands at the next chunk boundary, and the
    run equals a scripted timeline that switches at that chunk."""
    other = torch.randn_like(text)
    inbox = PromptInbox()
    s = _stream(backbone, text, inbox=inbox)
    chunks = []
    with Background(lambda: iter(s), max_ahead=1) as items:
        for c in items:
            chunks.append(c)
            if c.index == 1:
                ticket = inbox.post(other, label="other")
    applied = inbox.applied[ticket.id]
    assert applied == ticket.posted_during + 1  # the next boundary after the chunk that was running
    assert 2 <= applied <= 4
    assert [c.label for c in chunks] == [""] * applied + ["other"] * (5 - applied)
    assert [(w.chunk, w.source, w.label) for w in s.switches] == [(applied, "live", "other")]
    assert chunks[applied].switch is s.switches[0]
    scripted = _stream(backbone, PromptTimeline([PromptSegment(0, text), PromptSegment(applied, other)]))
    assert torch.equal(_latents(chunks), _latents(list(scripted)))
    replay = _stream(backbone, s.replay_timeline())
    assert torch.equal(_latents(chunks), _latents(list(replay)))


@pytest.mark.parametrize("switch, blend", [("recache", "linear"), ("cut", "slerp"), ("recache", "slerp")])
def test_blended_change_is_recorded_and_replays_exactly(backbone, text, switch, blend):
    other = torch.randn_like(text)
    inbox = PromptInbox()
    s = _stream(backbone, text, frames=18, inbox=inbox, switch=switch, blend=blend, blend_chunks=3)
    chunks = []
    for c in s:
        chunks.append(c)
        if c.index == 0:
            inbox.post(other, label="b")
    assert [(w.chunk, w.step, w.steps) for w in s.switches] == [(1, 1, 3), (2, 2, 3), (3, 3, 3)]
    assert torch.equal(s._text, other)  # the move ends on the new prompt
    replay = list(_stream(backbone, s.replay_timeline(), frames=18, switch=switch, blend=blend, blend_chunks=3))
    assert torch.equal(_latents(chunks), _latents(replay))
    plain = list(_stream(backbone, s.replay_timeline(), frames=18, switch=switch))  # no blend: differs at chunk 1
    assert (plain[1].latents - chunks[1].latents).abs().max() > 1e-4


def test_texts_are_encoded_at_the_boundary_and_superseded_posts_are_reported(backbone, text):
    seen = []

    def encode(t):
        seen.append((t, threading.current_thread().name))
        return torch.full_like(text, float(len(t)))

    inbox = PromptInbox(encode=encode)
    s = _stream(backbone, text, frames=9, inbox=inbox)
    it = iter(s)
    next(it)
    a, b = inbox.post("first"), inbox.post("  second one ")
    c1 = next(it)
    assert c1.label == "second one" and inbox.superseded == [a.id] and inbox.applied == {b.id: 1}
    assert seen == [("second one", threading.current_thread().name)]
    list(it)
    with pytest.raises(SelfForcingError, match="has ended"):
        inbox.post("too late")


def test_bad_posts_are_refused():
    inbox = PromptInbox(encode=lambda t: torch.zeros(1, 2, 3), max_chars=10)
    for bad, words in (("   ", "empty"), ("x" * 11, "limit is 10"), (torch.zeros(3), "embeddings")):
        with pytest.raises(SelfForcingError, match=words):
            inbox.post(bad)
    with pytest.raises(SelfForcingError, match="not text"):
        PromptInbox().post("a fox")


def test_blend_text():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 4, 8, generator=g), torch.randn(1, 6, 8, generator=g)
    mid = blend_text(a, b, 0.5)
    assert mid.shape == (1, 6, 8)
    assert torch.allclose(mid[:, :4], (a + b[:, :4]) / 2) and torch.allclose(mid[:, 4:], b[:, 4:] / 2)
    assert torch.equal(blend_text(a, b, 1.0), b) and torch.equal(blend_text(a, b, 0.0)[:, :4], a)
    u, v = torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[0.0, 2.0]]])
    s = blend_text(u, v, 0.5, "slerp")[0, 0]
    angle = torch.atan2(s[1], s[0])
    assert torch.isclose(angle, torch.tensor(torch.pi / 4), atol=1e-5)  # halfway in angle
    assert torch.isclose(s.norm(), torch.tensor(1.5)) and torch.isclose(blend_text(u, v, 0.5)[0, 0].norm(), torch.tensor(1.25 ** 0.5))
