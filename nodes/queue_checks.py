"""Queue-time checks that need more than one input, or more than one node, of a queued prompt.

ComfyUI attributes a failed `validate_inputs` to every input the function takes, so each node's
`validate_inputs` takes only the size pair. Everything else that needs no model is checked here, on the
whole API prompt, when it is queued (POST /prompt), and reported in ComfyUI's own error format on exactly
the inputs concerned: a video length that is not 1 + 4k frames, a step list or window/sink that cannot
sample, the timeline rules of sf_core.timeline against the sampler it feeds (nothing at 0s, two prompts in
one chunk, a prompt after the video's end) and empty prompts. Values that come from links are only known
at run time, where the nodes check them again with the same messages.
"""

from __future__ import annotations

import logging
from typing import Any

from ..sf_core.errors import SelfForcingError
from ..sf_core.latents import latent_frames_for
from ..sf_core.stream import StreamSettings
from ..sf_core.timeline import check_prompt, parse_entries, resolve
from ..sf_core.options import parse_steps, stream_settings

log = logging.getLogger(__name__)

SAMPLER, BENCHMARK, TRAIN, TIMELINE = ("SelfForcingStreamSampler", "SelfForcingBenchmark", "SelfForcingTrainLoRA",
                                       "SelfForcingPromptTimeline")
TEXT_ENCODE = "CLIPTextEncode"
_UNKNOWN = object()


class _Errors:
    def __init__(self):
        self.by_node: dict[str, list[tuple[str, str]]] = {}

    def add(self, node_id: str, inputs: list[str], message: str) -> None:
        for name in inputs:
            self.by_node.setdefault(str(node_id), []).append((name, message))


def _value(node: dict, name: str, kind=None) -> Any:
    """A widget value of an API-prompt node, or _UNKNOWN when it is linked, absent or not convertible."""
    v = (node.get("inputs") or {}).get(name, _UNKNOWN)
    if v is _UNKNOWN or isinstance(v, list):
        return _UNKNOWN
    try:
        return kind(v) if kind is not None else v
    except (TypeError, ValueError):
        return _UNKNOWN


def _source(prompt: dict, node: dict, name: str) -> tuple[str, dict] | None:
    """The (id, node) an input is linked to, or None."""
    v = (node.get("inputs") or {}).get(name)
    if isinstance(v, list) and len(v) == 2 and str(v[0]) in prompt:
        return str(v[0]), prompt[str(v[0])]
    return None


def _known(*values) -> bool:
    return all(v is not _UNKNOWN for v in values)


def _check(errors: _Errors, node_id: str, inputs: list[str], fn) -> Any:
    try:
        return fn()
    except (SelfForcingError, ValueError) as e:
        errors.add(node_id, inputs, str(e))
        return None


def _settings(errors: _Errors, node_id: str, node: dict) -> StreamSettings | None:
    fpc, steps, shift = _value(node, "frames_per_chunk", int), _value(node, "denoising_steps", str), _value(node, "shift", float)
    window, sink = _value(node, "window", int), _value(node, "sink", int)
    positions = _value(node, "sink_positions", str)
    if not _known(fpc, steps, shift, window, sink):
        return None
    if _check(errors, node_id, ["denoising_steps"], lambda: StreamSettings(frames_per_chunk=fpc, steps=parse_steps(steps),
                                                                            shift=shift)) is None:
        return None
    values = {"frames_per_chunk": fpc, "denoising_steps": steps, "shift": shift, "window": window, "sink": sink}
    if positions is not _UNKNOWN:
        values["sink_positions"] = positions
    return _check(errors, node_id, ["window", "sink"], lambda: stream_settings(values))


def _latent_frames(errors: _Errors, node_id: str, node: dict) -> int | None:
    length = _value(node, "length", int)
    return None if length is _UNKNOWN else _check(errors, node_id, ["length"], lambda: latent_frames_for(length))


def _prompt_source(errors: _Errors, prompt: dict, node: dict, name: str) -> None:
    """A stock CLIP Text Encode feeding `name` with an empty text: refused on its text input."""
    src = _source(prompt, node, name)
    if src is not None and src[1].get("class_type") == TEXT_ENCODE:
        text = _value(src[1], "text", str)
        if text is not _UNKNOWN:
            _check(errors, src[0], ["text"], lambda: check_prompt(text))


def _sampler(errors: _Errors, prompt: dict, node_id: str, node: dict) -> None:
    latent_frames = _latent_frames(errors, node_id, node)
    settings = _settings(errors, node_id, node)
    _prompt_source(errors, prompt, node, "positive")
    src = _source(prompt, node, "timeline")
    if src is None or src[1].get("class_type") != TIMELINE:
        return
    text, fps = _value(src[1], "timeline", str), _value(node, "fps", float)
    if not _known(text, fps) or settings is None:
        return
    try:
        entries = parse_entries(text)
    except SelfForcingError:
        return  # the timeline node's own validate_inputs reports it
    num_chunks = None
    if latent_frames is not None:
        prefix = 1 if _source(prompt, node, "start_image") is not None else 0
        num_chunks = -(-(latent_frames - prefix) // settings.frames_per_chunk)
    try:
        resolve(entries, fps, settings.frames_per_chunk, num_chunks)
    except SelfForcingError as e:
        errors.add(src[0], ["timeline"], str(e))
        if num_chunks is not None and _resolves(entries, fps, settings.frames_per_chunk):
            errors.add(node_id, ["length"], str(e))  # only the video's end is wrong: the length is involved too


def _resolves(entries, fps, frames_per_chunk) -> bool:
    try:
        resolve(entries, fps, frames_per_chunk)
        return True
    except SelfForcingError:
        return False


def _benchmark(errors: _Errors, prompt: dict, node_id: str, node: dict) -> None:
    _settings(errors, node_id, node)


def _train(errors: _Errors, prompt: dict, node_id: str, node: dict) -> None:
    _latent_frames(errors, node_id, node)
    prompts = _value(node, "prompts", str)
    if prompts is not _UNKNOWN and not prompts.strip():
        errors.add(node_id, ["prompts"], "no prompts to train on: write one prompt per line")
    name = _value(node, "lora_name", str)
    if name is not _UNKNOWN and (not name.strip() or "/" in name or "\\" in name):
        errors.add(node_id, ["lora_name"], "lora_name must be a plain file name (no folders)")


RULES = {SAMPLER: _sampler, BENCHMARK: _benchmark, TRAIN: _train}


def find_errors(prompt: dict, node_ids=None) -> dict[str, list[tuple[str, str]]]:
    """{node id: [(input name, message), ...]} for an API prompt ({id: {class_type, inputs}}); node_ids limits
    the check to those nodes (the ones ComfyUI would run). Pure: no ComfyUI needed."""
    errors = _Errors()
    for node_id, node in prompt.items():
        rule = RULES.get(node.get("class_type")) if isinstance(node, dict) else None
        if rule is not None and (node_ids is None or str(node_id) in node_ids):
            rule(errors, prompt, str(node_id), node)
    return errors.by_node


def _needed(prompt: dict) -> set[str]:
    """Ids of the nodes ComfyUI would run: the output nodes and everything they are linked from."""
    import nodes as comfy_nodes  # ComfyUI's own module (the pack is loaded as a package, so no clash)

    todo = [i for i, n in prompt.items() if isinstance(n, dict)
            and getattr(comfy_nodes.NODE_CLASS_MAPPINGS.get(n.get("class_type")), "OUTPUT_NODE", False)]
    seen: set[str] = set()
    while todo:
        i = str(todo.pop())
        if i in seen or i not in prompt:
            continue
        seen.add(i)
        todo += [v[0] for v in (prompt[i].get("inputs") or {}).values() if isinstance(v, list) and len(v) == 2]
    return seen


def comfy_node_errors(prompt: dict, found: dict[str, list[tuple[str, str]]]) -> dict:
    """`find_errors` output -> ComfyUI's node_errors layout (what the frontend shows and marks on inputs)."""
    out = {}
    for node_id, items in found.items():
        out[node_id] = {
            "errors": [{"type": "custom_validation_failed", "message": "Custom validation failed for node",
                        "details": f"{name} - {message}", "extra_info": {"input_name": name}} for name, message in items],
            "dependent_outputs": [],
            "class_type": prompt[node_id].get("class_type"),
        }
    return out


def _middleware():
    from aiohttp import web

    @web.middleware
    async def self_forcing_queue_checks(request, handler):
        if request.method != "POST" or request.path not in ("/prompt", "/api/prompt"):
            return await handler(request)
        try:
            body = await request.json()
            prompt = body.get("prompt") if isinstance(body, dict) else None
            found = find_errors(prompt, _needed(prompt)) if isinstance(prompt, dict) else {}
        except Exception:  # a malformed request: ComfyUI's own handler answers it
            log.debug("self-forcing queue checks skipped", exc_info=True)
            return await handler(request)
        if not found:
            return await handler(request)
        node_errors = comfy_node_errors(prompt, found)
        try:  # ComfyUI's own findings too, so the dialog lists every problem at once
            import copy

            import execution

            valid = await execution.validate_prompt("self-forcing-check", copy.deepcopy(prompt), None)
            for node_id, entry in (valid[3] or {}).items():
                mine = node_errors.setdefault(node_id, {**entry, "errors": []})
                mine["errors"] += entry.get("errors", [])
                mine["dependent_outputs"] = entry.get("dependent_outputs", [])
        except Exception:
            log.debug("ComfyUI's validation failed inside the queue checks", exc_info=True)
        log.warning("invalid prompt (Self Forcing checks): %s", {k: [e["details"] for e in v["errors"]]
                                                                   for k, v in node_errors.items()})
        error = {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                 "details": "", "extra_info": {}}
        return web.json_response({"error": error, "node_errors": node_errors}, status=400)

    return self_forcing_queue_checks


def install() -> None:
    """Put the checks in front of POST /prompt of the running server (once; before it starts serving)."""
    try:
        from server import PromptServer
    except ImportError:
        return
    app = getattr(PromptServer.instance, "app", None)
    if app is None or app.frozen or any(getattr(m, "__name__", "") == "self_forcing_queue_checks" for m in app.middlewares):
        return
    app.middlewares.append(_middleware())
