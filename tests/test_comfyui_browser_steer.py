"""Live steering from the ComfyUI frontend: the Stream Sampler's live prompt box (web/live_prompt.js) in headless
chromium. While the queued prompt streams, the test types a new prompt into the node's text box and presses its
Send button; the node's status line then shows the switch. A screenshot is kept in artifacts/sampler_live_prompt.png.

Needs COMFYUI_DIR (a ComfyUI checkout) and chromium; skipped otherwise.
"""

from __future__ import annotations

import time

import pytest

from comfy_fixtures import tiny_comfy_server
from comfy_server import REPO_ROOT, BrowserPage, chromium_skip_reason, comfyui_skip_reason

_skip = comfyui_skip_reason() or chromium_skip_reason()
pytestmark = pytest.mark.skipif(_skip is not None, reason=_skip or "")

NEW = "a blue whale sings in the deep ocean"
SAMPLER_ID = 5


def _graph(files):
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": files["dit"], "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": files["text_encoder"], "type": "wan", "device": "default"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "a red fox runs over the snow"}},
        "4": {"class_type": "VAELoader", "inputs": {"vae_name": files["vae"]}},
        str(SAMPLER_ID): {"class_type": "SelfForcingStreamSampler", "inputs": {
            "model": ["1", 0], "positive": ["3", 0], "vae": ["4", 0], "clip": ["2", 0], "seed": 1, "length": 145,
            "width": 64, "height": 48, "frames_per_chunk": 3, "denoising_steps": "1000,750,500,250", "shift": 5.0,
            "window": 0, "sink": 0, "sink_positions": "adjacent", "fps": 16.0}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": [str(SAMPLER_ID), 0], "filename_prefix": "steer"}},
    }


_STATUS_JS = """
(() => {
  const node = app.graph.getNodeById(%d);
  const tw = (node.widgets || []).find(w => w.name === '$$node-text-preview');
  const box = document.querySelector('[data-sf-live-prompt="%d"]');
  return {status: tw ? String(tw.value ?? '') : '', box: !!box,
          typed: box ? box.querySelector('textarea').value : null,
          answer: box ? box.querySelector('.sf-live-prompt-answer').textContent : null,
          widgets: (node.widgets || []).map(w => w.name)};
})()
"""

# Scale and move the canvas so that the whole sampler node (its live prompt box is at the bottom) is in view.
_FIT_JS = """
(async () => {
  const node = app.graph.getNodeById(%d), ds = app.canvas.ds, r = app.canvas.canvas.getBoundingClientRect();
  const title = LiteGraph.NODE_TITLE_HEIGHT, top = 110 - r.top, left = 80 - r.left;
  const scale = Math.min(1, (r.height - 20 - top) / (node.size[1] + title), (r.width - 20 - left) / node.size[0]);
  ds.scale = scale;
  ds.offset[0] = left / scale - node.pos[0];
  ds.offset[1] = top / scale - (node.pos[1] - title);
  app.canvas.setDirty(true, true);
  app.canvas.draw(true, true);
  await new Promise(res => requestAnimationFrame(() => requestAnimationFrame(res)));
  return scale;
})()
"""

_CENTER_JS = """
(() => {
  const el = document.querySelector('[data-sf-live-prompt="%d"] %s');
  el.scrollIntoView({block: 'center'});
  const r = el.getBoundingClientRect();
  const hit = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
  return {x: r.left + r.width / 2, y: r.top + r.height / 2, w: r.width, h: r.height, hit: hit === el};
})()
"""


def _click(page, selector):
    c = page.evaluate(_CENTER_JS % (SAMPLER_ID, selector))
    assert c["w"] > 0 and c["h"] > 0 and c["hit"], f"{selector} of the live prompt box is not clickable: {c}"
    for kind in ("mousePressed", "mouseReleased"):
        page.call("Input.dispatchMouseEvent", type=kind, x=c["x"], y=c["y"], button="left", clickCount=1)


def test_typing_a_live_prompt_into_the_node_switches_the_stream(tmp_path):
    server, files = tiny_comfy_server(tmp_path / "server")
    with server:
        server.assert_pack_loaded()
        server.set_setting("Comfy.Minimap.Visible", False)
        with BrowserPage(server, width=1280, height=900) as page:
            loaded = page.load_api_json(_graph(files))
            assert f"SelfForcingStreamSampler:{SAMPLER_ID}" in loaded, loaded
            page.evaluate(_FIT_JS % SAMPLER_ID)
            deadline = time.monotonic() + 30
            state = page.evaluate(_STATUS_JS % (SAMPLER_ID, SAMPLER_ID))
            while not state["box"]:  # the frontend mounts DOM widgets when it draws the node
                assert time.monotonic() < deadline, f"the sampler has no live prompt box: {state}"
                time.sleep(0.2)
                state = page.evaluate(_STATUS_JS % (SAMPLER_ID, SAMPLER_ID))
            assert "live_prompt" in state["widgets"], state

            page.queue_prompt()
            deadline = time.monotonic() + 300
            while "chunk " not in state["status"]:  # the stream is running: its status line counts chunks
                assert time.monotonic() < deadline and server.running, f"the sampler never reported a chunk: {state}"
                time.sleep(0.2)
                state = page.evaluate(_STATUS_JS % (SAMPLER_ID, SAMPLER_ID))

            _click(page, "textarea")  # focus the node's text box and type into it like a user
            page.call("Input.insertText", text=NEW)
            assert page.evaluate(_STATUS_JS % (SAMPLER_ID, SAMPLER_ID))["typed"] == NEW
            _click(page, "button")
            while not (state["answer"] or "").startswith("sent") or f"switched to '{NEW}'" not in state["status"]:
                assert time.monotonic() < deadline, f"no switch on the status line: {state}\n{server.log_tail()}"
                time.sleep(0.2)
                state = page.evaluate(_STATUS_JS % (SAMPLER_ID, SAMPLER_ID))
            page.evaluate(_FIT_JS % SAMPLER_ID)  # the node grew a preview: show all of it, status line included
            (REPO_ROOT / "artifacts").mkdir(exist_ok=True)
            page.screenshot(REPO_ROOT / "artifacts" / "sampler_live_prompt.png")
            assert state["typed"] == ""  # the box is cleared once the text was taken
            k = int(state["answer"].split("chunk ")[1])
            assert f"switched to '{NEW}' at chunk {k} (live)" in state["status"], state
            history = server.wait_idle(timeout=300)
        entry = next(iter(history.values()))
        assert entry["status"]["status_str"] == "success", entry["status"]
        assert not server.pack_errors(), server.pack_errors()
