"""The Self-Forcing Stream Sampler in the real ComfyUI frontend: the shipped text-to-video workflow
(workflows/Self-Forcing text to video.json, model names mapped to the tiny test files) is loaded in headless
chromium, queued from the page, and while the prompt is still running the sampler node shows a live preview of
the decoded frames. A screenshot of that moment is kept in artifacts/sampler_live_preview.png (repo root).

Needs COMFYUI_DIR (a ComfyUI checkout) and chromium; skipped otherwise. About a minute on a 2-core CPU.
"""

from __future__ import annotations

import base64
import io
import json
import re
import time

import pytest

from comfy_fixtures import tiny_comfy_server
from comfy_server import REPO_ROOT, BrowserPage, chromium_skip_reason, comfyui_skip_reason
from workflow_sources import T2V

_skip = comfyui_skip_reason() or chromium_skip_reason()
pytestmark = pytest.mark.skipif(_skip is not None, reason=_skip or "")

WORKFLOW = REPO_ROOT / "workflows" / f"{T2V}.json"
ARTIFACTS = REPO_ROOT / "artifacts"
SAMPLER = "SelfForcingStreamSampler"
# 256x160 frames, 65 frames = 17 latent frames = 6 chunks of 3; a rolling window of 12 with 3 sink frames.
# On a 2-core CPU each chunk takes ~6 s (mostly the VAE decode): the stream runs ~35 s, the first preview
# comes after ~7 s, which leaves a wide window to catch the node mid-stream.
SIZE = {"width": 256, "height": 160, "length": 65, "window": 12, "sink": 3}
# The sampler node is enlarged before queueing so that its preview fits inside it; the view is fitted to it.
NODE_SIZE = (420, 1000)
VIEWPORT = (1280, 900)
PREVIEW_TIMEOUT = 90.0   # from queueing to the first live preview on the node
RUN_TIMEOUT = 240.0      # the whole prompt


def widget_indices(node: dict, object_info: dict) -> dict[str, int]:
    """{input name: index in the UI node's widgets_values}. The order is the node's widget inputs; an input
    with control_after_generate (the seed) is followed by the frontend's control value ("randomize", ...)."""
    info = object_info[node["type"]]["input"]
    specs = {**info.get("required", {}), **info.get("optional", {})}
    out, k = {}, 0
    for inp in node.get("inputs", []):
        if not inp.get("widget"):
            continue
        out[inp["name"]] = k
        k += 1
        spec = specs.get(inp["name"], [None])
        if len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("control_after_generate"):
            k += 1
    return out


def tiny_workflow(files: dict, object_info: dict) -> tuple[dict, int]:
    """The shipped UI workflow with the tiny model files and a small, longer stream; (workflow, sampler id)."""
    wf = json.loads(WORKFLOW.read_text())
    names = {"SelfForcingLoadModel": ("model_name", files["dit_official"]), "CLIPLoader": ("clip_name", files["text_encoder"]),
             "VAELoader": ("vae_name", files["vae"])}
    sampler_id = None
    for node in wf["nodes"]:
        if node["type"] not in object_info:  # the template's Note (a frontend-only node)
            continue
        idx = widget_indices(node, object_info)
        if node["type"] in names:
            name, value = names[node["type"]]
            node["widgets_values"][idx[name]] = value
        elif node["type"] == SAMPLER:
            sampler_id = node["id"]
            for name, value in SIZE.items():
                node["widgets_values"][idx[name]] = value
    assert sampler_id is not None, f"{WORKFLOW} has no {SAMPLER} node"
    return wf, sampler_id


def _image(png: bytes):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype("float32")


# Node geometry in screen (CSS) pixels: canvas coordinates -> canvas element pixels via app.canvas.ds
# (screen = (pos + offset) * scale), then shifted by the canvas element's position in the page.
_GEOMETRY_JS = """
(() => {
  const node = app.graph.getNodeById(%(id)s);
  const ds = app.canvas.ds, el = app.canvas.canvas, r = el.getBoundingClientRect();
  const px = (x, y) => [(x + ds.offset[0]) * ds.scale + r.left, (y + ds.offset[1]) * ds.scale + r.top];
  const title = LiteGraph.NODE_TITLE_HEIGHT;
  const [x0, y0] = px(node.pos[0], node.pos[1] - title);
  const [x1, y1] = px(node.pos[0] + node.size[0], node.pos[1] + node.size[1]);
  const pw = (node.widgets || []).find(w => w.name === '$$canvas-image-preview');
  let preview = null;
  if (pw && typeof pw.y === 'number') {
    const [px0, py0] = px(node.pos[0], node.pos[1] + pw.y);
    preview = [px0, py0, x1, y1];
  }
  const tw = (node.widgets || []).find(w => w.name === '$$node-text-preview');
  return {node: [x0, y0, x1, y1], preview, scale: ds.scale, size: [node.size[0], node.size[1]],
          dpr: window.devicePixelRatio, inner: [window.innerWidth, window.innerHeight],
          text: tw ? String(tw.value ?? '') : null};
})()
"""

# Enlarge the sampler node (moving the nodes to its right out of its way), scale and move the canvas so that
# it sits in a free part of the window (below the top bar, right of the side toolbar), then redraw.
_FIT_JS = """
(async () => {
  const node = app.graph.getNodeById(%(id)s);
  const right = node.pos[0] + node.size[0], dx = %(w)s - node.size[0];
  for (const other of app.graph.nodes)  // keep the nodes right of the sampler (Save Video) clear of it
    if (other !== node && other.pos[0] >= right - 1 && dx > 0) other.pos[0] += dx;
  node.setSize([%(w)s, %(h)s]);
  const ds = app.canvas.ds, r = app.canvas.canvas.getBoundingClientRect();
  const title = LiteGraph.NODE_TITLE_HEIGHT;
  const box = {left: 80 - r.left, top: 110 - r.top, right: r.width - 20, bottom: r.height - 20};
  const bw = node.size[0], bh = node.size[1] + title;
  const scale = Math.min(1, (box.right - box.left) / bw, (box.bottom - box.top) / bh);
  ds.scale = scale;
  ds.offset[0] = box.left / scale - node.pos[0];
  ds.offset[1] = box.top / scale - (node.pos[1] - title);
  app.canvas.setDirty(true, true);
  app.canvas.draw(true, true);
  await new Promise(res => requestAnimationFrame(() => requestAnimationFrame(res)));
  return scale;
})()
"""

_STATE_JS = """
(() => {
  const node = app.graph.getNodeById(%(id)s);
  const previews = (app.nodePreviewImages || {})[String(%(id)s)] || [];
  const img = (node.imgs || [])[0];
  return {previews: previews.length, url: previews[0] || null, imgs: (node.imgs || []).length,
          natural: img ? [img.naturalWidth, img.naturalHeight] : null, complete: img ? img.complete : false,
          widgets: (node.widgets || []).map(w => w.name)};
})()
"""


def _crop(img, box, scale_xy):
    sx, sy = scale_xy
    x0, y0, x1, y1 = box
    h, w = img.shape[:2]
    x0, x1 = max(0, int(round(x0 * sx))), min(w, int(round(x1 * sx)))
    y0, y1 = max(0, int(round(y0 * sy))), min(h, int(round(y1 * sy)))
    assert x1 - x0 > 20 and y1 - y0 > 20, f"box {box} is outside the screenshot {w}x{h}"
    return img[y0:y1, x0:x1]


def _changed_block(before, after, threshold: float = 24.0):
    """The block of `after` where most pixels differ from `before` (rows, then columns, with more than half of
    their pixels changed), or None."""
    import numpy as np

    changed = np.abs(after - before).max(axis=2) > threshold
    rows = np.flatnonzero(changed.mean(axis=1) > 0.3)
    if rows.size == 0:
        return None
    band = changed[rows[0]:rows[-1] + 1]
    cols = np.flatnonzero(band.mean(axis=0) > 0.5)
    rows = rows[changed[rows][:, cols[0]:cols[-1] + 1].mean(axis=1) > 0.5] if cols.size else rows[:0]
    if rows.size == 0 or cols.size == 0:
        return None
    return after[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _running(server) -> bool:
    q = server.get_json("/queue")
    return bool(q.get("queue_running"))


def test_sampler_shows_live_preview_while_running(tmp_path):
    import numpy as np

    server, files = tiny_comfy_server(tmp_path / "server")
    with server:
        server.assert_pack_loaded()
        info = server.object_info()
        assert SAMPLER in info, server.log_tail()
        wf, sid = tiny_workflow(files, info)
        server.set_setting("Comfy.TutorialCompleted", True)   # no template dialog over the canvas
        server.set_setting("Comfy.Minimap.Visible", False)     # no minimap over the node
        ARTIFACTS.mkdir(exist_ok=True)
        shot_path = ARTIFACTS / "sampler_live_preview.png"
        if shot_path.exists():
            shot_path.unlink()
        with BrowserPage(server, width=VIEWPORT[0], height=VIEWPORT[1]) as page:
            types = sorted({n["type"] for n in wf["nodes"]})
            missing = page.evaluate(f"{json.dumps(types)}.filter(t => !LiteGraph.registered_node_types[t])")
            assert missing == [], f"the frontend does not know {missing}"
            page.load_workflow(wf)
            loaded = page.evaluate("app.graph.nodes.map(n => [n.id, n.type])")
            assert [sid, SAMPLER] in loaded, loaded
            values = page.evaluate(f"Object.fromEntries(app.graph.getNodeById({sid}).widgets"
                                   ".map(w => [w.name, w.value]))")
            assert {k: values[k] for k in SIZE} == SIZE, values

            page.evaluate(_FIT_JS % {"id": sid, "w": NODE_SIZE[0], "h": NODE_SIZE[1]})
            before_png = base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"])
            (tmp_path / "before.png").write_bytes(before_png)
            before = _image(before_png)
            geo0 = page.evaluate(_GEOMETRY_JS % {"id": sid})
            assert page.evaluate(_STATE_JS % {"id": sid})["previews"] == 0

            page.queue_prompt()
            queued = time.monotonic()
            state = geo = None
            shot = None
            while time.monotonic() - queued < PREVIEW_TIMEOUT:
                state = page.evaluate(_STATE_JS % {"id": sid})
                if state["previews"] and state["imgs"] and state["complete"] and state["natural"] \
                        and "$$canvas-image-preview" in state["widgets"] and _running(server):
                    # let the canvas draw the image, then take the picture while the prompt still runs
                    page.evaluate("(async () => { app.canvas.setDirty(true, true); await new Promise("
                                  "r => requestAnimationFrame(() => requestAnimationFrame(r))); return 1; })()")
                    geo = page.evaluate(_GEOMETRY_JS % {"id": sid})
                    if geo["preview"] is None:
                        time.sleep(0.25)
                        continue
                    raw = page.call("Page.captureScreenshot", format="png")["data"]
                    still_running = _running(server)
                    if still_running:
                        shot = base64.b64decode(raw)
                        break
                if not server.running:
                    break
                time.sleep(0.25)
            assert shot is not None, (f"no live preview on the sampler node within {PREVIEW_TIMEOUT:.0f}s "
                                      f"while the prompt ran (last page state {state})\n{server.log_tail()}")
            shot_path.write_bytes(shot)
            seen_at = time.monotonic() - queued

            # the preview is a decoded frame at the video's size (not the 1/8 latent preview)
            assert state["natural"] == [SIZE["width"], SIZE["height"]], state
            assert state["url"].startswith("blob:"), state
            # the view did not move, the node kept the size it was given
            assert max(abs(a - b) for a, b in zip(geo["node"], geo0["node"])) < 1.0, (geo0, geo)

            after = _image(shot)
            assert after.shape == before.shape
            scale_xy = (after.shape[1] / geo["inner"][0], after.shape[0] / geo["inner"][1])
            node_before, node_after = _crop(before, geo["node"], scale_xy), _crop(after, geo["node"], scale_xy)
            changed = np.abs(node_after - node_before).max(axis=2) > 24
            assert changed.mean() > 0.05, f"the sampler node barely changed ({changed.mean():.3f} of its pixels)"
            # the image area of the node (below its widgets): the changed pixels there form a picture with the
            # video's aspect ratio (the frame drawn to fit), and that picture is not a flat fill
            pv_before, pv_after = _crop(before, geo["preview"], scale_xy), _crop(after, geo["preview"], scale_xy)
            img = _changed_block(pv_before, pv_after)
            assert img is not None, "the image area of the sampler node did not change"
            aspect = img.shape[1] / img.shape[0]
            assert abs(aspect - SIZE["width"] / SIZE["height"]) < 0.15, (img.shape, aspect)
            assert min(img.shape[:2]) > 60, f"the preview is tiny: {img.shape}"
            assert float(img.std()) > 20.0, f"the preview is a flat fill (std {img.std():.1f})"
            # the status line of the node: 'chunk i/n · N frames · X FPS'
            if geo["text"] is not None:
                assert re.search(r"chunk \d+/\d+", geo["text"]), geo["text"]

            # the run ends normally
            history = server.wait_idle(timeout=RUN_TIMEOUT)
            page.screenshot(tmp_path / "after_run.png")
        assert len(history) == 1, history.keys()
        entry = next(iter(history.values()))
        assert entry["status"]["status_str"] == "success", entry["status"]
        videos = server.output_files(entry)
        assert videos and all(v.is_file() and v.stat().st_size > 0 for v in videos), entry["outputs"]
        assert not server.pack_errors(), server.pack_errors()
        assert seen_at < PREVIEW_TIMEOUT
