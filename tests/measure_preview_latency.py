"""Measure how soon a clean chunk of the Self-Forcing Stream Sampler is shown as a live preview.

    COMFYUI_DIR=/path/to/ComfyUI python tests/measure_preview_latency.py [--width 64 --height 48 --length 97]

A script, not a test. It starts a tiny ComfyUI server (tests/comfy_fixtures.py: random tiny models, the test
shim, our pack) with ``--verbose DEBUG``, connects a websocket client that announces preview metadata (as the
frontend does), queues workflows/self_forcing_text_to_video.json (model names mapped to the tiny files, small
size) and waits. Then it pairs, for each chunk i, the time the sampler logged it clean
(``self-forcing chunk i/n clean at monotonic T``; time.monotonic() is system-wide on Linux, so comparable with
the recorder's arrival times) with the arrival of the FIRST preview image of that chunk on the websocket.

Pairing: each ``ProgressBar.update_absolute(i, n, preview)`` of bridge.LiveProgress makes ComfyUI send, in this
order, a ``progress_state`` json (node value i), the binary preview (type 4, with node metadata), then a
``progress`` json (value i) (comfy_execution/progress.py WebUIProgressHandler, then main.py hijack_progress). So
a preview belongs to the chunk whose value the last progress_state/progress message of the node carried; the
first such preview per value is the chunk's first preview.

Prints one JSON object: settings, per-chunk latency (first preview arrival - clean time), median, max, the
number of chunks, and the order check (the first preview arrived before the sampler node finished executing,
i.e. before the ``executing`` message of the next node / the end of the prompt).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(REPO_ROOT)]

from comfy_fixtures import tiny_comfy_server  # noqa: E402
from comfy_server import ComfyServer, WSMessage, comfyui_skip_reason  # noqa: E402

WORKFLOW = REPO_ROOT / "workflows" / "self_forcing_text_to_video.json"
SAMPLER = "SelfForcingStreamSampler"
CLEAN_RE = re.compile(r"self-forcing chunk (\d+)/(\d+) clean at monotonic ([0-9.]+)")


def ui_workflow_to_api(workflow: dict, object_info: dict) -> dict:
    """A UI-format workflow -> API prompt without a browser: links become [node, slot] inputs and
    widgets_values are matched to the widget inputs in order (an INT with control_after_generate has an
    extra value after it in widgets_values, as the frontend stores it)."""
    links = {link[0]: link for link in workflow["links"]}  # [id, from_node, from_slot, to_node, to_slot, type]
    prompt = {}
    for node in workflow["nodes"]:
        info = object_info[node["type"]]
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        inputs = {}
        values = list(node.get("widgets_values") or [])
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                link = links[inp["link"]]
                inputs[inp["name"]] = [str(link[1]), link[2]]
        widget_names = [i["name"] for i in node.get("inputs", []) if i.get("widget")]
        k = 0
        for name in widget_names:
            if k >= len(values):
                break
            if name not in inputs:
                inputs[name] = values[k]
            k += 1
            spec = specs.get(name, [None, {}])
            if len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("control_after_generate"):
                k += 1  # "fixed" / "randomize" / ... value of the frontend's control widget
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def build_prompt(files: dict, object_info: dict, width: int, height: int, length: int, window: int,
                 sink: int, seed: int) -> tuple[dict, str]:
    prompt = ui_workflow_to_api(json.loads(WORKFLOW.read_text()), object_info)
    sampler_id = None
    for nid, node in prompt.items():
        inputs = node["inputs"]
        if node["class_type"] == "UNETLoader":
            inputs["unet_name"] = files["dit"]
        elif node["class_type"] == "CLIPLoader":
            inputs["clip_name"] = files["text_encoder"]
        elif node["class_type"] == "VAELoader":
            inputs["vae_name"] = files["vae"]
        elif node["class_type"] == SAMPLER:
            sampler_id = nid
            inputs.update(width=width, height=height, length=length, window=window, sink=sink, seed=seed)
    if sampler_id is None:
        raise SystemExit(f"{WORKFLOW} has no {SAMPLER} node")
    return prompt, sampler_id


def clean_times(log_text: str) -> dict[int, tuple[float, int]]:
    """{chunk i: (monotonic clean time, n)} from the server log (the first line per chunk)."""
    out: dict[int, tuple[float, int]] = {}
    for m in CLEAN_RE.finditer(log_text):
        out.setdefault(int(m.group(1)), (float(m.group(3)), int(m.group(2))))
    return out


def first_previews(messages: list[WSMessage], node_id: str) -> dict[int, WSMessage]:
    """{progress value i: the first preview of node_id sent while the node's progress value was i}."""
    value = None
    out: dict[int, WSMessage] = {}
    for m in messages:
        if m.kind == "json" and isinstance(m.data, dict):
            if m.type == "progress_state":
                state = (m.data.get("nodes") or {}).get(node_id)
                if state is not None:
                    value = int(state["value"])
            elif m.type == "progress" and str(m.data.get("node")) == node_id:
                value = int(m.data["value"])
        elif m.kind == "preview_meta" and m.node_id == node_id and value is not None:
            out.setdefault(value, m)
    return out


def node_span(messages: list[WSMessage], node_id: str, prompt_id: str) -> tuple[float | None, float | None]:
    """(arrival of ``executing`` node_id, arrival of the next ``executing`` of another node or of the end)."""
    start = end = None
    for m in messages:
        if m.kind != "json" or m.type != "executing" or not isinstance(m.data, dict):
            continue
        if m.data.get("prompt_id") not in (None, prompt_id):
            continue
        node = m.data.get("node")
        if start is None and str(node) == node_id:
            start = m.t
        elif start is not None and str(node) != node_id:
            end = m.t
            break
    return start, end


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--height", type=int, default=48)
    p.add_argument("--length", type=int, default=97, help="video frames (1 + 4k); 97 -> 25 latent frames, 9 chunks")
    p.add_argument("--window", type=int, default=0)
    p.add_argument("--sink", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--work-dir", type=Path, default=None, help="default: a new temp dir (kept, its path printed)")
    args = p.parse_args(argv)

    reason = comfyui_skip_reason()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="sf_preview_latency_"))
    server, files = tiny_comfy_server(work, extra_args=["--verbose", "DEBUG"])
    server: ComfyServer
    with server:
        server.assert_pack_loaded()
        info = server.object_info()
        prompt, sampler_id = build_prompt(files, info, args.width, args.height, args.length, args.window,
                                          args.sink, args.seed)
        with server.websocket(preview_metadata=True) as ws:
            queued_at = time.monotonic()
            prompt_id = server.queue(prompt, ws.client_id)
            server.wait(prompt_id, timeout=args.timeout)
            ws.wait_done(prompt_id, timeout=30)
            done_at = time.monotonic()
            messages = ws.messages
        log_text = server.log_text()

    cleans = clean_times(log_text)
    previews = first_previews(messages, sampler_id)
    chunks = []
    for i in sorted(cleans):
        clean_t, n = cleans[i]
        pv = previews.get(i)
        chunks.append({
            "chunk": i, "of": n, "clean_at": round(clean_t, 6),
            "first_preview_at": None if pv is None else round(pv.t, 6),
            "latency_s": None if pv is None else round(pv.t - clean_t, 4),
        })
    # previews per chunk (flip-book frames actually shown)
    value = None
    per_chunk: dict[int, int] = {}
    for m in messages:
        if m.kind == "json" and m.type == "progress_state" and isinstance(m.data, dict):
            st = (m.data.get("nodes") or {}).get(sampler_id)
            if st is not None:
                value = int(st["value"])
        elif m.kind == "preview_meta" and m.node_id == sampler_id and value is not None:
            per_chunk[value] = per_chunk.get(value, 0) + 1
    for c in chunks:
        c["previews"] = per_chunk.get(c["chunk"], 0)

    latencies = [c["latency_s"] for c in chunks if c["latency_s"] is not None]
    node_start, node_end = node_span(messages, sampler_id, prompt_id)
    all_previews = [m for m in messages if m.kind == "preview_meta" and m.node_id == sampler_id]
    first_preview_t = all_previews[0].t if all_previews else None
    result = {
        "command": "COMFYUI_DIR=... python tests/measure_preview_latency.py " + " ".join(argv or sys.argv[1:]),
        "settings": {"width": args.width, "height": args.height, "length": args.length, "window": args.window,
                     "sink": args.sink, "seed": args.seed, "frames_per_chunk": prompt[sampler_id]["inputs"].get(
                         "frames_per_chunk"), "denoising_steps": prompt[sampler_id]["inputs"].get("denoising_steps"),
                     "fps": prompt[sampler_id]["inputs"].get("fps"), "device": "cpu" if server.cpu else "gpu",
                     "models": "tiny (tests/comfy_fixtures.py)"},
        "n_chunks": len(chunks),
        "n_chunks_with_preview": len(latencies),
        "latency_s": {"median": round(statistics.median(latencies), 4) if latencies else None,
                      "max": round(max(latencies), 4) if latencies else None,
                      "min": round(min(latencies), 4) if latencies else None},
        "per_chunk": chunks,
        "previews_total": len(all_previews),
        "order": {
            "sampler_started_s": None if node_start is None else round(node_start - queued_at, 4),
            "first_preview_s": None if first_preview_t is None else round(first_preview_t - queued_at, 4),
            "sampler_finished_s": None if node_end is None else round(node_end - queued_at, 4),
            "first_preview_before_sampler_finished": bool(first_preview_t is not None and node_end is not None
                                                          and first_preview_t < node_end),
            "last_preview_before_sampler_finished": bool(all_previews and node_end is not None
                                                         and all_previews[-1].t <= node_end),
        },
        "wall_s": round(done_at - queued_at, 3),
        "work_dir": str(work),
    }
    print(json.dumps(result, indent=1))
    ok = (len(chunks) >= 1 and len(latencies) == len(chunks) and result["order"]["first_preview_before_sampler_finished"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
