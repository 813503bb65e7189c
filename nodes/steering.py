"""Live prompts for a running Stream Sampler: a route of the pack on ComfyUI's server.

    POST /selfforcing/steer   {"node_id": "5", "text": "...", "client_id": "...", "prompt_id": "..." (optional)}

The handler runs on the server's event loop and only hands the text to the stream's `PromptInbox` (a lock and a
list: it never waits for the sampler); the sampler encodes it with its CLIP and switches at the next chunk
boundary. Only a stream of the posting client's running prompt is affected. Answers: 200 with the chunk that was
running; 400 for empty text or a malformed body; 403 for another client's stream; 409 when no such stream runs;
413 for an oversized body.

The registry of running streams is the one piece of process-wide state of the pack: ComfyUI's server and its
routes are process-wide, and a stream is registered only while its sampler executes.
"""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from dataclasses import dataclass

from ..sf_core.errors import SelfForcingError
from ..sf_core.steering import MAX_PROMPT_CHARS, PromptInbox

ROUTE = "/selfforcing/steer"
MAX_BODY = 16 * 1024


@dataclass
class Running:
    prompt_id: str
    node_id: str
    client_id: str | None
    inbox: PromptInbox


class RunningStreams:
    """Streams that accept live prompts, by (prompt id, node id); thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._streams: dict[tuple[str, str], Running] = {}

    @contextmanager
    def register(self, prompt_id: str, node_id: str, client_id: str | None, inbox: PromptInbox):
        key = (str(prompt_id), str(node_id))
        with self._lock:
            self._streams[key] = Running(key[0], key[1], client_id, inbox)
        try:
            yield
        finally:
            with self._lock:
                self._streams.pop(key, None)
            inbox.close()

    def find(self, node_id: str, client_id: str | None, prompt_id: str | None) -> tuple[Running | None, int, str]:
        """(the stream, 200, "") or (None, status, what is wrong)."""
        with self._lock:
            found = [r for r in self._streams.values()
                     if r.node_id == node_id and (prompt_id is None or r.prompt_id == prompt_id)]
        which = f"prompt {prompt_id}" if prompt_id else "the running prompt"
        if not found:
            return None, 409, (f"no Self-Forcing stream is running on node {node_id} in {which}: the prompt has "
                               "finished, has not started yet, or was cancelled; queue it and send while it streams")
        mine = [r for r in found if r.client_id is None or r.client_id == client_id]
        if not mine:
            return None, 403, f"the stream on node {node_id} belongs to another client's prompt; it was not changed"
        return mine[-1], 200, ""


RUNNING = RunningStreams()


async def steer(request):
    from aiohttp import web

    def answer(status: int, **body):
        return web.json_response({"ok": status == 200, **body}, status=status)

    if request.content_length is not None and request.content_length > MAX_BODY:
        return answer(413, error=f"the request body is over {MAX_BODY} bytes")
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        return answer(413, error=f"the request body is over {MAX_BODY} bytes")
    try:
        body = json.loads(raw or b"null")
    except ValueError:
        return answer(400, error="the body must be JSON: {\"node_id\": ..., \"text\": ..., \"client_id\": ...}")
    if not isinstance(body, dict):
        return answer(400, error="the body must be a JSON object with node_id, text and client_id")
    text, node_id = body.get("text"), body.get("node_id")
    if not isinstance(text, str) or not text.strip():
        return answer(400, error="the prompt text is empty; write what the video should show next")
    if len(text) > MAX_PROMPT_CHARS:
        return answer(400, error=f"the prompt has {len(text)} characters; the limit is {MAX_PROMPT_CHARS}")
    if node_id is None or str(node_id) == "":
        return answer(400, error="node_id is missing: which Stream Sampler node should switch")
    prompt_id = body.get("prompt_id")
    running, status, error = RUNNING.find(str(node_id), body.get("client_id"), None if prompt_id is None else str(prompt_id))
    if running is None:
        return answer(status, error=error)
    try:
        ticket = running.inbox.post(text)
    except SelfForcingError as e:
        return answer(409, error=str(e))
    return answer(200, prompt_id=running.prompt_id, node_id=running.node_id, message=ticket.id,
                  posted_during_chunk=ticket.posted_during, applies_at_chunk=max(1, ticket.posted_during + 1))


def add_routes() -> None:
    """Register the route on ComfyUI's server (once; nothing when there is no server, e.g. in plain imports)."""
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is None:
        return
    if any(getattr(r, "path", None) == ROUTE for r in server.routes):
        return
    server.routes.post(ROUTE)(steer)
