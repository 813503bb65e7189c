"""The ComfyUI test harness itself: a real headless server starts, lists stock nodes, loads a pack from
the extra custom_nodes folder, streams previews over the websocket, drives the frontend, and stops.

These tests do not depend on the state of our own pack (the pack tests check that); they need
COMFYUI_DIR (a ComfyUI checkout runnable with this python) and are skipped without it.
"""

import textwrap
import time

import pytest

from comfy_server import BrowserPage, ComfyServer, chromium_skip_reason, comfyui_skip_reason, missing_nodes

_skip = comfyui_skip_reason()
pytestmark = pytest.mark.skipif(_skip is not None, reason=_skip or "")

STOCK_NODES = ["CLIPTextEncode", "UNETLoader", "CLIPLoader", "VAELoader", "VAEDecode", "LoraLoaderModelOnly",
               "SaveVideo", "CreateVideo"]

# A minimal V3 pack: one node that sends JPEG previews and progress text the way our sampler does.
PROBE_PACK = textwrap.dedent('''
    from comfy_api.latest import ComfyExtension, io
    from .helper import double

    class HarnessProbe(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="HarnessProbe", category="testing", is_output_node=True,
                             inputs=[io.Int.Input("n", default=3)], outputs=[io.Int.Output()],
                             hidden=[io.Hidden.unique_id])

        @classmethod
        def execute(cls, n):
            import comfy.utils
            from PIL import Image
            from server import PromptServer
            bar = comfy.utils.ProgressBar(n, node_id=cls.hidden.unique_id)
            for i in range(n):
                bar.update_absolute(i + 1, n, ("JPEG", Image.new("RGB", (32, 16), (40 * i, 0, 0)), None))
                PromptServer.instance.send_progress_text(f"step {i + 1}/{n}", cls.hidden.unique_id)
            return io.NodeOutput(double(n), ui={"text": [f"done {n}"]})

    class ProbeExtension(ComfyExtension):
        async def get_node_list(self):
            return [HarnessProbe]

    async def comfy_entrypoint():
        return ProbeExtension()
''')


def test_server_starts_lists_stock_nodes_and_stops(tmp_path):
    server = ComfyServer(tmp_path, pack_dir=None)
    with server:
        info = server.object_info()
        assert not missing_nodes(info, STOCK_NODES), (missing_nodes(info, STOCK_NODES), server.log_tail())
        # the temp model folders are wired in: a file dropped there is listed by the stock loader
        (server.model_dirs["loras"] / "harness_probe.safetensors").write_bytes(b"")
        loras = server.object_info("LoraLoaderModelOnly")["input"]["required"]["lora_name"][0]
        assert "harness_probe.safetensors" in loras
    assert not server.running
    assert "To see the GUI go to" in server.log_text()


@pytest.mark.parametrize("metadata", [True, False], ids=["type4", "type1"])
def test_pack_loads_and_streams_previews(tmp_path, metadata):
    pack = tmp_path / "probe_pack"
    pack.mkdir()
    (pack / "__init__.py").write_text(PROBE_PACK)
    (pack / "helper.py").write_text("def double(n):\n    return 2 * n\n")
    with ComfyServer(tmp_path / "server", pack_dir=pack) as server:
        server.assert_pack_loaded()
        assert "HarnessProbe" in server.object_info()
        with server.websocket(preview_metadata=metadata) as ws:
            prompt_id = server.queue({"5": {"class_type": "HarnessProbe", "inputs": {"n": 4}}}, ws.client_id)
            entry = server.wait(prompt_id, timeout=60)
            ws.wait_done(prompt_id, timeout=10)
        assert entry["outputs"]["5"]["text"] == ["done 4"]
        previews = ws.previews()
        assert len(previews) == 4 and all(p.image[:2] == b"\xff\xd8" for p in previews)  # JPEG
        assert all(p.kind == ("preview_meta" if metadata else "preview") for p in previews)
        if metadata:
            assert {p.node_id for p in previews} == {"5"}
            assert {p.data["prompt_id"] for p in previews} == {prompt_id}
        assert [m.text for m in ws.progress_texts("5")] == [f"step {i}/4" for i in range(1, 5)]
        assert [m.data["value"] for m in ws.json_messages("progress")] == [1, 2, 3, 4]
        times = [m.t for m in ws.messages]
        assert times == sorted(times)
        assert not server.pack_errors()


@pytest.mark.skipif(chromium_skip_reason() is not None, reason=chromium_skip_reason() or "")
def test_frontend_loads_and_queues_an_api_graph(tmp_path):
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 255}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    with ComfyServer(tmp_path, pack_dir=None) as server, BrowserPage(server) as page:
        assert sorted(page.load_api_json(graph)) == ["EmptyImage:1", "PreviewImage:2"]
        page.queue_prompt()
        # the page's queue request is asynchronous: wait for the prompt to appear, then for the queue to drain
        history = {}
        for _ in range(240):
            history = server.wait_idle(timeout=60)
            if history:
                break
            time.sleep(0.25)
        assert len(history) == 1, server.log_tail()
        entry = next(iter(history.values()))
        assert entry["status"]["status_str"] == "success", entry["status"]
        assert entry["outputs"]["2"]["images"], entry["outputs"]
        assert page.screenshot(tmp_path / "frontend.png").stat().st_size > 10_000
