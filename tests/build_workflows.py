"""Regenerate workflows/*.json (UI format, what ComfyUI's template browser loads) from
tests/workflow_sources.py through the real frontend:  COMFYUI_DIR=... python tests/build_workflows.py"""

import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from comfy_fixtures import api_to_ui, tiny_comfy_server  # noqa: E402
from comfy_server import BrowserPage  # noqa: E402
from workflow_sources import WORKFLOWS  # noqa: E402


def main() -> None:
    out = HERE.parent / "workflows"
    out.mkdir(exist_ok=True)
    server, _ = tiny_comfy_server(Path(tempfile.mkdtemp()))
    with server, BrowserPage(server) as page:
        for name, prompt in WORKFLOWS.items():
            ui = api_to_ui(page, prompt, name=f"{name}.json")
            (out / f"{name}.json").write_text(json.dumps(ui, indent=1, ensure_ascii=False) + "\n")
            print("wrote", out / f"{name}.json")


if __name__ == "__main__":
    main()
