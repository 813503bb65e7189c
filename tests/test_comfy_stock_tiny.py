"""Stock ComfyUI nodes on the tiny test models (comfy_fixtures): the files our end-to-end workflows use load
in ComfyUI's own loaders and run through a full text-to-video graph; UI <-> API workflow conversion through
the real frontend round-trips.

Needs COMFYUI_DIR (skipped without it); the round-trip test also needs chromium. Does not depend on our pack
(the server is started without it), so it stays green while the pack's nodes are being written.
"""

import json

import pytest

from comfy_fixtures import SHIM_DIR, api_to_ui, prompts_equivalent, tiny_comfy_server, ui_to_api
from comfy_server import BrowserPage, chromium_skip_reason, comfyui_skip_reason

_skip = comfyui_skip_reason()
pytestmark = pytest.mark.skipif(_skip is not None, reason=_skip or "")

PROMPT = "a red fox runs over the snow"
FRAMES = 9  # -> 3 latent frames (1 + 4 * 2)


def stock_t2v_graph(files: dict, seed: int = 0) -> dict:
    """A Wan2.1 text-to-video graph of stock nodes only, plus the shim's SFTestTensorInfo."""
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": files["dit"], "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": files["text_encoder"], "type": "wan",
                                                     "device": "default"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["2", 0]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 0]}},
        "5": {"class_type": "VAELoader", "inputs": {"vae_name": files["vae"]}},
        "6": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 64, "height": 48, "length": FRAMES,
                                                                 "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": seed, "steps": 2, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["6", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["5", 0]}},
        "9": {"class_type": "CreateVideo", "inputs": {"images": ["8", 0], "fps": 16.0}},
        "10": {"class_type": "SaveVideo", "inputs": {"video": ["9", 0], "filename_prefix": "video/sf_tiny",
                                                     "format": "auto", "codec": "auto"}},
        "11": {"class_type": "SFTestTensorInfo", "inputs": {"conditioning": ["3", 0], "latent": ["7", 0],
                                                            "image": ["8", 0]}},
    }


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    server, files = tiny_comfy_server(tmp_path_factory.mktemp("comfy_tiny"), pack_dir=None)
    with server:
        yield server, files


def _decode_frames(path):
    import av

    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return frames


def test_stock_t2v_graph_on_tiny_models(tiny_server):
    server, files = tiny_server
    log = server.log_text()
    assert "sf_test_shim: UMT5XXlModel uses the config" in log, server.log_tail()
    assert "sf_test_shim: 2-layer UMT5 files matching that config are detected as UMT5-XXL" in log
    assert "IMPORT FAILED" not in "\n".join(l for l in log.splitlines() if SHIM_DIR.name in l), server.log_tail()
    info = server.object_info()
    assert files["dit"] in info["UNETLoader"]["input"]["required"]["unet_name"][0]
    assert files["dit_official"] in info["UNETLoader"]["input"]["required"]["unet_name"][0]
    assert files["text_encoder"] in info["CLIPLoader"]["input"]["required"]["clip_name"][0]
    assert files["vae"] in info["VAELoader"]["input"]["required"]["vae_name"][0]
    # our tiny TAEHV is for our own loader: ComfyUI's VAELoader must not offer it (its TAEHV is fixed-size)
    assert files["taehv"] not in info["VAELoader"]["input"]["required"]["vae_name"][0]

    prompt_id = server.queue(stock_t2v_graph(files))
    entry = server.wait(prompt_id, timeout=300)

    # CONDITIONING of the stock CLIPTextEncode with a "wan" CLIP: [1, 512, 4096], padding exactly zero
    report = json.loads(entry["outputs"]["11"]["info"][0])
    (cond,) = report["conditioning"]
    batch, tokens, width = cond["cond"]["shape"]
    assert batch == 1 and width == files["text_dim"] == files["dit_config"].text_dim == 4096
    assert tokens >= 512, cond
    assert cond["cond"]["dtype"] == "float32" and cond["cond"]["finite"]
    assert 2 <= cond["nonzero_tokens"] == cond["last_nonzero_token"] + 1 < 64  # prompt pieces + EOS, then zeros
    assert cond["extra"].get("pooled_output") is None
    # the sampled LATENT and the decoded IMAGE
    assert report["latent"]["samples"]["shape"] == [1, 16, 3, 6, 8]
    assert report["image"]["shape"] == [FRAMES, 48, 64, 3] and report["image"]["finite"]
    assert 0.0 <= report["image"]["min"] <= report["image"]["max"] <= 1.0

    (video,) = server.output_files({"outputs": {"10": entry["outputs"]["10"]}})
    assert video.is_file() and video.stat().st_size > 0
    frames = _decode_frames(video)
    assert len(frames) == FRAMES and frames[0].shape == (48, 64, 3)


@pytest.mark.skipif(chromium_skip_reason() is not None, reason=chromium_skip_reason() or "")
def test_api_ui_round_trip_through_the_frontend(tiny_server):
    server, files = tiny_server
    graph = stock_t2v_graph(files, seed=1234)
    with BrowserPage(server) as page:
        ui = api_to_ui(page, graph)
        assert {str(n["id"]) for n in ui["nodes"]} == set(graph)
        assert {n["type"] for n in ui["nodes"]} == {n["class_type"] for n in graph.values()}
        assert len(ui["links"]) == sum(isinstance(v, list) for n in graph.values() for v in n["inputs"].values())
        ui = json.loads(json.dumps(ui))  # what a workflows/*.json file would hold
        back = ui_to_api(page, ui)
    assert prompts_equivalent(graph, back, server.object_info()) == []
    # the converted prompt is accepted and runs (only the changed seed's nodes execute again)
    entry = server.wait(server.queue(back), timeout=300)
    assert len(_decode_frames(server.output_files({"outputs": {"10": entry["outputs"]["10"]}})[0])) == FRAMES
