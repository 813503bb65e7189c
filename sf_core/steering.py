"""Steering a running stream: prompt changes posted from any thread, applied at chunk boundaries.

    inbox = PromptInbox(encode=text_encoder.encode_one)   # str -> embeddings [1, Lt, D]
    stream = Stream(..., inbox=inbox)
    # another thread (a UI, stdin, a server route):
    ticket = inbox.post("the fox turns into a wolf")       # returns at once
    # the stream takes it before its next chunk (chunk 1 at the earliest), switches (re-cache or cut, optionally blended over a few
    # chunks) and records the change; stream.replay_timeline() is a PromptTimeline that replays the run.

A post never waits for the stream; the stream never waits for a post. Only the latest message waiting at a
boundary is applied (earlier ones are superseded and reported so). Blending interpolates the text embeddings
from the prompt in effect to the new one over `blend_chunks` chunks, linearly or by slerp per token.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import SelfForcingError

BLEND_MODES = ("linear", "slerp")
MAX_PROMPT_CHARS = 4000


@dataclass(frozen=True)
class Ticket:
    """What `PromptInbox.post` returns: the message id and the chunk being computed when it arrived
    (-1: before the first chunk began)."""

    id: int
    posted_during: int


@dataclass
class Message:
    id: int
    prompt: str | torch.Tensor  # text, or embeddings [1, Lt, D]
    label: str
    posted_during: int


class PromptInbox:
    """A thread-safe mailbox of prompt changes for one stream (see the module docstring).

    encode: turns a text into embeddings [1, Lt, D] (called by the stream at a chunk boundary, on the stream's
    thread). Needed only when texts (not embeddings) are posted.
    """

    def __init__(self, encode: Callable[[str], torch.Tensor] | None = None, max_chars: int = MAX_PROMPT_CHARS,
                 no_encoder: str = "this stream takes prompt embeddings, not text (no text encoder was given)"):
        self.encode = encode
        self.no_encoder = no_encoder
        self.max_chars = max_chars
        self._lock = threading.Lock()
        self._waiting: list[Message] = []
        self._next_id = 0
        self._chunk = -1
        self._closed = False
        self.applied: dict[int, int] = {}  # message id -> chunk it took effect at
        self.superseded: list[int] = []  # ids replaced by a later message before they were applied

    def post(self, prompt: str | torch.Tensor, label: str | None = None) -> Ticket:
        """Queue a new prompt (text or embeddings [1, Lt, D]); returns at once. Raises SelfForcingError for an
        empty or oversized text, a text without an encoder, or a stream that has ended."""
        if isinstance(prompt, str):
            prompt = prompt.strip()
            if not prompt:
                raise SelfForcingError("the new prompt is empty; write what the video should show next")
            if len(prompt) > self.max_chars:
                raise SelfForcingError(f"the new prompt has {len(prompt)} characters; the limit is {self.max_chars}")
            if self.encode is None:
                raise SelfForcingError(self.no_encoder)
            label = prompt if label is None else label
        elif not (isinstance(prompt, torch.Tensor) and prompt.ndim == 3):
            raise SelfForcingError("a prompt must be a text or embeddings [1, tokens, dim]")
        with self._lock:
            if self._closed:
                raise SelfForcingError("this stream has ended; the prompt was not applied")
            ticket = Ticket(self._next_id, self._chunk)
            self._next_id += 1
            self._waiting.append(Message(ticket.id, prompt, label or "", ticket.posted_during))
        return ticket

    def take(self, chunk: int) -> Message | None:
        """Called by the stream right before it starts `chunk`: the newest waiting message (or None). Chunk 0
        always follows the stream's own first prompt: what was posted before it waits for chunk 1."""
        with self._lock:
            self._chunk = chunk
            if chunk == 0:
                return None
            waiting, self._waiting = self._waiting, []
        if not waiting:
            return None
        self.superseded.extend(m.id for m in waiting[:-1])
        return waiting[-1]

    def embeddings(self, message: Message) -> torch.Tensor:
        if isinstance(message.prompt, torch.Tensor):
            return message.prompt
        return self.encode(message.prompt)

    @property
    def running(self) -> bool:
        return not self._closed

    def close(self) -> None:
        """The stream has ended: later posts are refused."""
        with self._lock:
            self._closed = True
            self._waiting.clear()


@dataclass(frozen=True)
class Switch:
    """A prompt change as applied: from chunk `chunk` on, the prompt moves to `text` (reached at step
    `step` of `steps`; steps > 1 when blended). `source` is 'timeline' or 'live'."""

    chunk: int
    label: str
    text: torch.Tensor  # the target embeddings [1 or B, Lt, D]
    source: str
    step: int = 1
    steps: int = 1
    message: int | None = None  # inbox message id (live changes)
    posted_during: int | None = None

    @property
    def begins(self) -> bool:
        return self.step == 1


def blend_text(a: torch.Tensor, b: torch.Tensor, alpha: float, mode: str = "linear") -> torch.Tensor:
    """Embeddings a, b [B, La, D], [B, Lb, D] -> the mix at `alpha` (0: a, 1: b), [B, max(La, Lb), D].

    The shorter one is padded with zero tokens (as text encoders pad). slerp works per token vector: the direction
    moves along the great circle, the length linearly; it falls back to linear where a token is zero or the two
    are (anti)parallel.
    """
    if mode not in BLEND_MODES:
        raise SelfForcingError(f"blend must be one of {BLEND_MODES}, got {mode!r}")
    n = max(a.shape[1], b.shape[1])
    a, b = _pad_tokens(a, n), _pad_tokens(b, n)
    if alpha >= 1:
        return b
    if alpha <= 0:
        return a
    if a.shape[0] != b.shape[0]:
        a, b = torch.broadcast_tensors(a, b)
    lin = (1 - alpha) * a + alpha * b
    if mode == "linear":
        return lin
    af, bf = a.float(), b.float()
    na, nb = af.norm(dim=-1, keepdim=True), bf.norm(dim=-1, keepdim=True)
    cos = ((af * bf).sum(-1, keepdim=True) / (na * nb).clamp_min(1e-12)).clamp(-1, 1)
    omega = torch.acos(cos)
    so = torch.sin(omega)
    ok = (so > 1e-4) & (na > 1e-8) & (nb > 1e-8)
    safe = torch.where(ok, so, torch.ones_like(so))
    ua, ub = af / na.clamp_min(1e-12), bf / nb.clamp_min(1e-12)
    direction = (torch.sin((1 - alpha) * omega) / safe) * ua + (torch.sin(alpha * omega) / safe) * ub
    sl = direction * ((1 - alpha) * na + alpha * nb)
    return torch.where(ok, sl, lin.float()).to(a.dtype)


def _pad_tokens(x: torch.Tensor, n: int) -> torch.Tensor:
    if x.shape[1] == n:
        return x
    return torch.cat([x, x.new_zeros(x.shape[0], n - x.shape[1], x.shape[2])], dim=1)
