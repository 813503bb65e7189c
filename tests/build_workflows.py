"""Regenerate the templates in workflows/ from tests/workflow_sources.py (the single source), through the real
frontend and the pack itself:  COMFYUI_DIR=... python tests/build_workflows.py

For each workflow: <title>.json, the UI-format graph the template browser loads (made by the frontend's own
loadApiJson + serialize, plus a Note node saying what it does and what to change, and `properties.models` on
each loader with the published URL and model folder of its file), and <title>.jpg, the thumbnail the browser
shows beside it: frames of the pack's own output when the graph runs (with the tiny test weights until the
pack ships a trained toy model). Files in workflows/ that no source names any more are removed.
"""

import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from comfy_fixtures import tiny_comfy_server  # noqa: E402
from comfy_server import BrowserPage  # noqa: E402
from workflow_sources import DIT_PT, NOTES, TE, TEACHER, VAE, WORKFLOWS, fast, model_entries  # noqa: E402

NOTE_SIZE = (420, 330)
THUMB_SIZE = (512, 384)

_BUILD_JS = """
(async () => {
  await app.loadApiJson(%(prompt)s, %(name)s);
  const nodes = app.graph.nodes;
  for (const [id, models] of Object.entries(%(models)s)) app.graph.getNodeById(Number(id)).properties.models = models;
  const left = Math.min(...nodes.map(n => n.pos[0])), top = Math.min(...nodes.map(n => n.pos[1]));
  const note = LiteGraph.createNode("Note");
  note.widgets[0].value = %(note)s;
  note.title = "What this does";
  app.graph.add(note);
  note.pos = [left - %(w)s - 40, top];
  note.size = [%(w)s, %(h)s];
  return app.graph.serialize();
})()
"""


def to_template(page, name: str, prompt: dict) -> dict:
    return page.evaluate(_BUILD_JS % {"prompt": json.dumps(prompt), "name": json.dumps(f"{name}.json"),
                                      "models": json.dumps(model_entries(prompt)), "note": json.dumps(NOTES[name]),
                                      "w": NOTE_SIZE[0], "h": NOTE_SIZE[1]})


def thumbnail(video: Path, out: Path) -> None:
    """A 2x2 grid of frames spread over the video, as JPEG."""
    import av
    import numpy as np
    from PIL import Image

    with av.open(str(video)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    picks = [frames[round(i * (len(frames) - 1) / 3)] for i in range(4)]
    grid = np.concatenate([np.concatenate(picks[:2], 1), np.concatenate(picks[2:], 1)], 0)
    Image.fromarray(grid).resize(THUMB_SIZE, Image.NEAREST).save(out, quality=88)


def main() -> None:
    from PIL import Image

    out = HERE.parent / "workflows"
    out.mkdir(exist_ok=True)
    server, files = tiny_comfy_server(Path(tempfile.mkdtemp()))
    p = files["paths"]
    for kind, src, name in (("diffusion_models", p["dit_official"], DIT_PT), ("diffusion_models", p["dit"], TEACHER),
                            ("text_encoders", p["text_encoder"], TE), ("vae", p["vae"], VAE)):
        server.add_model(kind, src, name)
    server.input_dir.mkdir(parents=True, exist_ok=True)
    Image.radial_gradient("L").convert("RGB").resize((96, 64)).save(server.input_dir / "start_frame.png")
    written = set()
    with server, BrowserPage(server) as page:
        for name, prompt in WORKFLOWS.items():
            ui = to_template(page, name, prompt)
            (out / f"{name}.json").write_text(json.dumps(ui, indent=1, ensure_ascii=False) + "\n")
            entry = server.wait(server.queue(fast(json.loads(json.dumps(prompt)))), timeout=900)
            video = next(f for f in server.output_files(entry) if f.suffix == ".mp4")
            thumbnail(video, out / f"{name}.jpg")
            written |= {f"{name}.json", f"{name}.jpg"}
            print("wrote", out / f"{name}.json", "and .jpg")
    for stale in sorted(f for f in out.iterdir() if f.suffix in (".json", ".jpg") and f.name not in written):
        stale.unlink()
        print("removed", stale)


if __name__ == "__main__":
    main()
