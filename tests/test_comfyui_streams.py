"""Video-to-video and live steering of the Stream Sampler in a real headless ComfyUI (COMFYUI_DIR), on tiny
weight files: stock Load Video frames stream through the sampler; a prompt posted to the pack's route while a
prompt runs switches at the next chunk boundary and gives the latents of a scripted timeline with that switch."""

import json
import time
import urllib.request

import pytest
import torch

from comfy_fixtures import sampler_graph, tiny_comfy_server
from comfy_server import comfyui_skip_reason

_skip = comfyui_skip_reason()
pytestmark = pytest.mark.skipif(_skip is not None, reason=_skip or "")

PROMPT = "a red fox runs over the snow"
NEW = "a blue whale sings in the deep ocean"
SMALL = {"width": 64, "height": 48}


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    from sf_core.video import VideoWriter

    server, files = tiny_comfy_server(tmp_path_factory.mktemp("comfy_streams"))
    server.input_dir.mkdir(parents=True, exist_ok=True)
    with VideoWriter(server.input_dir / "moving_square.mp4", fps=16) as w:  # 21 frames, 64x48
        for i in range(21):
            f = torch.zeros(48, 64, 3, dtype=torch.uint8)
            f[..., 0] = 60
            f[14:34, 2 * i : 2 * i + 20] = 230
            w.write(f[None])
    with server:
        server.assert_pack_loaded()
        yield server, files


def _graph(files, length=25, seed=3, clip=True, **sampler):
    return sampler_graph(files, PROMPT, seed=seed, length=length, folder="streams", clip=clip, **{**SMALL, **sampler})


def _latents(server, entry, prefix="streams/") -> dict:
    from safetensors.torch import load_file

    out = {}
    for node, o in entry["outputs"].items():
        for item in o.get("latents", []):
            path = server.output_dir / item.get("subfolder", "") / item["filename"]
            out[node] = load_file(str(path))["latent_tensor"]
    return out


def _post(server, body, raw=None):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(server.url + "/selfforcing/steer", data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_video_to_video_from_load_video_at_strength_zero_is_the_stock_encode(comfy):
    """Load Video -> Get Video Components -> the sampler's input_video, strength 0: the latents are the input's,
    equal to the stock VAE Encode of the same frames; previews stream as usual."""
    server, files = comfy
    g = _graph(files, length=81, strength=0.0, clip=False)
    g["7"] = {"class_type": "LoadVideo", "inputs": {"file": "moving_square.mp4"}}
    g["8"] = {"class_type": "GetVideoComponents", "inputs": {"video": ["7", 0]}}
    g["5"]["inputs"]["input_video"] = ["8", 0]
    g["9"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["8", 0], "vae": ["4", 0]}}
    g["10"] = {"class_type": "SaveLatent", "inputs": {"samples": ["9", 0], "filename_prefix": "streams/stock"}}
    with server.websocket(preview_metadata=True) as ws:
        entry = server.wait(server.queue(g, ws.client_id))
    lat = _latents(server, entry)
    assert lat["6"].shape == lat["10"].shape == (1, 16, 6, 6, 8)  # 21 input frames end the 81-frame stream
    torch.testing.assert_close(lat["6"], lat["10"], rtol=0, atol=1e-3)
    assert len(ws.previews("5")) >= 2

    g["5"]["inputs"].update(width=96, strength=0.5)
    with pytest.raises(Exception, match=r"the input video is 64x48 but the sampler makes 96x48; frames are not resized"):
        server.wait(server.queue(g))


def test_live_prompt_switches_at_the_next_chunk_and_equals_a_timeline(comfy):
    server, files = comfy
    g = _graph(files, length=145, seed=5)  # 37 latent frames = 13 chunks, previews paced at 16 fps
    with server.websocket(preview_metadata=True) as ws:
        prompt_id = server.queue(g, ws.client_id)
        ws.wait_for(lambda m: m.kind == "json" and m.type == "progress" and m.data.get("node") == "5", timeout=300)
        # bad posts are refused and change nothing
        assert _post(server, {"node_id": "5", "text": "  ", "client_id": ws.client_id})[0] == 400
        assert _post(server, None, raw=b'{"text": "' + b"x" * 20000 + b'"}')[0] == 413
        status, body = _post(server, {"node_id": "5", "text": NEW, "client_id": "someone-else"})
        assert status == 403 and "another client" in body["error"]
        posted_at = time.monotonic()
        status, body = _post(server, {"node_id": "5", "text": NEW, "client_id": ws.client_id})
        assert status == 200, body
        assert body["prompt_id"] == prompt_id
        server.wait(prompt_id)
    k = body["applies_at_chunk"]  # the chunk after the one running when the text arrived (0-based)
    assert k == body["posted_during_chunk"] + 1 and 1 <= k < 13, body
    texts = [m.text for m in ws.progress_texts("5")]
    first = next(i for i, t in enumerate(texts) if "switched to" in t)
    assert f"switched to '{NEW}' at chunk {k + 1} (live)" in texts[first]
    assert texts[first].startswith(f"chunk {k + 1}/13")  # shown with the first chunk made under it
    # latency: from the post to the first preview frame of that chunk at this client
    msgs = ws.messages
    at = next(i for i, m in enumerate(msgs) if m.kind == "text" and "switched to" in (m.text or ""))
    shown = next(m for m in msgs[at:] if m.kind == "preview_meta")
    print(f"\nlive prompt: posted during chunk {k}, applied at chunk {k + 1} (1-based), "
          f"first preview under it {shown.t - posted_at:.2f} s after the post")

    # the run logs the timeline that replays it; scripted with that switch, the latents are identical
    assert f"replays the run:\n#0: <the prompt connected to 'positive'>\n#{k}: {NEW}\n" in server.log_text()
    live = _latents(server, server.history(prompt_id))["6"]
    t = _graph(files, length=145, seed=5, clip=False)
    t["11"] = {"class_type": "SelfForcingPromptTimeline",
               "inputs": {"clip": ["2", 0], "timeline": f"#0: {PROMPT}\n#{k}: {NEW}", "switch": "recache"}}
    t["5"]["inputs"]["timeline"] = ["11", 0]
    scripted = _latents(server, server.wait(server.queue(t)))["6"]
    assert torch.equal(live, scripted)
    # and without the switch the video differs from that chunk on
    plain = _latents(server, server.wait(server.queue(_graph(files, length=145, seed=5, clip=False))))["6"]
    assert torch.equal(plain[:, :, : 3 * k], live[:, :, : 3 * k])
    assert (plain[:, :, 3 * k :] - live[:, :, 3 * k :]).abs().max() > 1e-3


def test_posts_without_a_running_stream_or_clip_get_a_clear_answer(comfy):
    server, files = comfy
    status, body = _post(server, {"node_id": "5", "text": NEW, "client_id": "c"})
    assert status == 409 and "no Self-Forcing stream is running on node 5" in body["error"]
    g = _graph(files, length=145, seed=6, clip=False)
    with server.websocket() as ws:
        prompt_id = server.queue(g, ws.client_id)
        ws.wait_for(lambda m: m.kind == "json" and m.type == "progress" and m.data.get("node") == "5", timeout=300)
        status, body = _post(server, {"node_id": "5", "text": NEW, "client_id": ws.client_id})
        server.wait(prompt_id)
    assert status == 409 and "no CLIP connected" in body["error"], body


def test_toy_live_prompt_changes_the_colour_on_screen(comfy):
    """The toy template (model and text encoder shipped in the pack) with a live caption: the colour the detector
    reads follows the posted caption from its chunk on (the template's timeline switches by cut)."""
    import av
    import workflow_sources as src

    from sf_core.toy import world
    from sf_core.toy.detect import detect

    server, _ = comfy
    g = json.loads(json.dumps(src.WORKFLOWS[src.TOY]))
    g["3"]["inputs"]["timeline"] = "0s: a red circle stays still on a grey background"  # switch: cut
    g["4"]["inputs"].update(length=161, seed=1)  # 41 latent frames: 14 chunks, previews paced at 16 fps
    with server.websocket(preview_metadata=True) as ws:
        prompt_id = server.queue(g, ws.client_id)
        ws.wait_for(lambda m: m.kind == "json" and m.type == "progress" and m.data.get("node") == "4", timeout=300)
        status, body = _post(server, {"node_id": "4", "text": "a blue circle stays still on a grey background",
                                      "client_id": ws.client_id})
        assert status == 200, body
        entry = server.wait(prompt_id)
    k = body["applies_at_chunk"]
    assert 1 <= k <= 11, body
    video = next(f for f in server.output_files(entry) if f.suffix == ".mp4")
    with av.open(str(video)) as c:
        frames = torch.stack([torch.from_numpy(f.to_ndarray(format="rgb24")) for f in c.decode(video=0)])
    det = detect(frames)
    red, blue = world.COLOUR_NAMES.index("red"), world.COLOUR_NAMES.index("blue")
    at = 9 + 12 * (k - 1)  # first video frame of chunk k (chunk 0 has 9 frames, the others 12)
    assert (det.dominant[:at] == red).float().mean() > 0.8, det.dominant.tolist()
    assert (det.dominant[at + 24 :] == blue).float().mean() > 0.8, det.dominant.tolist()
