"""The pack in a real headless ComfyUI (COMFYUI_DIR), on tiny weight files in the real formats placed under
the real release names: it loads, every shipped workflow runs end to end, previews stream during sampling,
node and CLI agree, stock LoRA loading equals merging, streaming decode equals the stock decode."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from comfy_fixtures import prompts_equivalent, sampler_graph, tiny_comfy_server, ui_to_api
from comfy_server import BrowserPage, chromium_skip_reason, comfyui_skip_reason

_skip = comfyui_skip_reason()
pytestmark = pytest.mark.skipif(_skip is not None, reason=_skip or "")

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
NODES = ["SelfForcingLoadModel", "SelfForcingLoadLoRA", "SelfForcingPromptTimeline", "SelfForcingStreamSampler",
         "SelfForcingStreamingDecode", "SelfForcingBenchmark", "SelfForcingTrainLoRA", "SelfForcingLoadToyTextEncoder"]
PROMPT = "a red fox runs over the snow"
SMALL = {"width": 64, "height": 48}


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    import workflow_sources as src

    server, files = tiny_comfy_server(tmp_path_factory.mktemp("comfy_pack"))
    p = files["paths"]
    # the tiny files under the real release names, so the shipped workflows run unchanged
    server.add_model("diffusion_models", p["dit_official"], src.DIT_PT)
    server.add_model("diffusion_models", p["dit"], src.TEACHER)
    server.add_model("text_encoders", p["text_encoder"], src.TE)
    server.add_model("vae", p["vae"], src.VAE)
    _write_lora_and_merged(server, p["dit"])
    from fixtures.dit import to_diffusers
    from safetensors.torch import load_file, save_file

    folder = server.model_dirs["diffusion_models"] / "tiny_diffusers" / "transformer"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    save_file(to_diffusers(load_file(p["dit"])), str(folder / "diffusion_pytorch_model.safetensors"))
    from PIL import Image

    server.input_dir.mkdir(parents=True, exist_ok=True)
    Image.radial_gradient("L").convert("RGB").resize((96, 64)).save(server.input_dir / "start_frame.png")
    with server:
        server.assert_pack_loaded()
        yield server, files


def _write_lora_and_merged(server, dit_path):
    """A LoRA in our ComfyUI-layout file, and the same LoRA merged into the weights, as two model files."""
    from safetensors.torch import save_file

    from sf_core.checkpoints import load_dit
    from sf_core.lora import LoRA

    model, _ = load_dit(dit_path)
    lora = LoRA.create(model, rank=4, alpha=4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in lora.parameters():
            if p.abs().sum() == 0:  # B: make the LoRA do something
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    lora.save(server.model_dirs["loras"] / "sf_test_lora.safetensors")
    peft = {}  # the same LoRA as LongLive saves it: PEFT names, no alpha (alpha = rank), nested in a .pt
    for path in lora.paths:
        layer = lora.layer(path)
        peft[f"base_model.model.{path}.lora_A.weight"] = layer.A.detach().clone()
        peft[f"base_model.model.{path}.lora_B.weight"] = layer.B.detach().clone()
    torch.save({"generator_lora": peft}, server.model_dirs["loras"] / "longlive_style_lora.pt")
    lora.merge(model)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(server.model_dirs["diffusion_models"] / "tiny_merged.safetensors"))


def _run(server, graph, timeout=600):
    return server.wait(server.queue(graph), timeout=timeout)


def _latents(server, entry) -> torch.Tensor:
    from safetensors.torch import load_file

    files = [f for f in server.output_files(entry) if f.suffix == ".latent"]
    assert len(files) == 1, files
    return load_file(str(files[0]))["latent_tensor"]


def _frames(path) -> int:
    import av

    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


def _t2v(files, model=None, vae=True, seed=3, length=25, **sampler):
    return sampler_graph(files, PROMPT, seed=seed, length=length, model=model, vae=vae, **{**SMALL, **sampler})


def test_pack_loads_and_lists_every_node_and_template(comfy):
    server, _ = comfy
    info = server.object_info()
    assert all(n in info for n in NODES), [n for n in NODES if n not in info]
    assert server.pack_errors() == []
    assert info["SelfForcingStreamSampler"]["category"] == "Self Forcing"
    untipped = [f"{n}.{k}" for n in NODES for kind, group in info[n]["input"].items() if kind != "hidden"
                for k, v in group.items() if not (len(v) > 1 and isinstance(v[1], dict) and v[1].get("tooltip"))]
    assert untipped == []  # every input says what it is for
    outputs = {n: info[n]["output_tooltips"] for n in NODES}
    assert all(len(t) == len(info[n]["output"]) and all(t) for n, t in outputs.items()), outputs  # every output too
    templates = server.get_json("/workflow_templates")
    assert sorted(templates[server.pack_name]) == sorted(p.stem for p in WORKFLOWS)


@pytest.mark.skipif(chromium_skip_reason() is not None, reason=chromium_skip_reason() or "")
@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.stem)
def test_every_workflow_runs_end_to_end(comfy, workflow):
    import workflow_sources as src

    server, _ = comfy
    with BrowserPage(server) as page:
        prompt = ui_to_api(page, json.loads(workflow.read_text()))
    assert prompts_equivalent(prompt, src.WORKFLOWS[workflow.stem], server.object_info()) == []  # file in sync
    entry = _run(server, src.fast(prompt))
    videos = [f for f in server.output_files(entry) if f.suffix == ".mp4"]
    sampler = next(n for n in prompt.values() if n["class_type"] == "SelfForcingStreamSampler")
    assert len(videos) == 1 and _frames(videos[0]) == sampler["inputs"]["length"]
    if workflow.stem == src.TRAIN:
        assert (server.model_dirs["loras"] / "self_forcing_style.safetensors").is_file()
        assert "lora key not loaded" not in server.log_text()


def test_previews_stream_during_sampling(comfy):
    server, files = comfy
    with server.websocket(preview_metadata=True) as ws:
        pid = server.queue(_t2v(files, length=49, seed=5), client_id=ws.client_id)  # 13 latent frames: 5 chunks
        server.wait(pid)
        ws.wait_done(pid)
    msgs = ws.messages
    previews = ws.previews("5")
    finished = next(m for m in ws.json_messages("executing") if m.data.get("node") == "6")  # sampler done
    # ComfyUI sends each preview right before the progress update it belongs to: pair them in arrival order
    chunk_of_preview = []
    for i, m in enumerate(msgs):
        if m in previews:
            nxt = next(x for x in msgs[i:] if x.kind == "json" and x.type == "progress" and x.data.get("node") == "5")
            chunk_of_preview.append(nxt.data["value"])
    assert sorted(set(chunk_of_preview)) == [1, 2, 3, 4, 5]  # every chunk showed frames
    assert chunk_of_preview == sorted(chunk_of_preview)  # in order
    assert previews[0].t < finished.t  # frames reached the client while the sampler was still running
    assert any(m.text.startswith("chunk 5/5") for m in ws.progress_texts("5"))


def _preview_run(server, files, seed, preview, preview_method=None):
    """Run a 3-chunk stream with the preview switch; (previews of the sampler, progress values of the sampler)."""
    extra = {"preview_method": preview_method} if preview_method else None
    with server.websocket(preview_metadata=True) as ws:
        pid = server.queue(_t2v(files, seed=seed, preview=preview), client_id=ws.client_id, extra_data=extra)
        server.wait(pid)
        ws.wait_done(pid)
    msgs = ws.messages
    chunks = []  # the chunk each preview belongs to: the sampler's next progress value
    for i, m in enumerate(msgs):
        if m.kind in ("preview", "preview_meta"):
            nxt = next(x for x in msgs[i:] if x.kind == "json" and x.type == "progress" and x.data.get("node") == "5")
            chunks.append(nxt.data["value"])
    progress = [m.data["value"] for m in ws.json_messages("progress") if m.data.get("node") == "5"]
    return ws.previews(), chunks, progress


def test_preview_switch_and_the_servers_preview_setting(comfy):
    from PIL import Image
    import io as _io

    server, files = comfy
    # off: not one frame reaches the client, the progress bar still moves through every chunk
    previews, _, progress = _preview_run(server, files, 81, "off")
    assert previews == [] and sorted(set(progress)) == [1, 2, 3]
    # auto follows a prompt queued with the frontend's preview setting "none": nothing
    previews, _, progress = _preview_run(server, files, 82, "auto", preview_method="none")
    assert previews == [] and sorted(set(progress)) == [1, 2, 3]
    # ...and shows decoded frames, per chunk, otherwise
    previews, chunks, _ = _preview_run(server, files, 83, "auto")
    assert sorted(set(chunks)) == [1, 2, 3] and Image.open(_io.BytesIO(previews[-1].image)).size == (64, 48)
    # live: asked for explicitly, shown even when the prompt says none
    previews, chunks, _ = _preview_run(server, files, 84, "live", preview_method="none")
    assert sorted(set(chunks)) == [1, 2, 3]
    # latent: the latents' colours at latent size (1/8), not the decoded frames
    previews, chunks, _ = _preview_run(server, files, 85, "latent")
    assert sorted(set(chunks)) == [1, 2, 3] and Image.open(_io.BytesIO(previews[-1].image)).size == (8, 6)


def test_the_streamed_video_is_kept_once(comfy):
    server, files = comfy
    temp = lambda: set(server.temp_dir.rglob("*.mp4"))  # noqa: E731
    saved = []
    for seed in (91, 92):  # saved: the saved file is the only copy, run after run
        g = _t2v(files, seed=seed)
        g["7"] = {"class_type": "SaveVideo", "inputs": {"video": ["5", 2], "filename_prefix": "once/v", "format": "auto",
                                                        "codec": "auto"}}
        before = temp()
        entry = _run(server, g)
        assert temp() - before == set()  # no copy left in temp/
        saved += [f for f in server.output_files(entry) if f.suffix == ".mp4"]
    assert len(saved) == 2 and all(_frames(f) == 25 for f in saved)
    import av

    with av.open(str(saved[0])) as c:
        assert "prompt" in c.metadata  # the saved copy carries the workflow, like any Save Video file
    first = None
    for seed in (93, 94):  # not saved: the file lives while ComfyUI holds the output, then goes
        before = temp()
        _run(server, _t2v(files, seed=seed))
        new = temp() - before
        assert len(new) == 1 and _frames(next(iter(new))) == 25
        if first is not None:
            assert not first.exists()  # the earlier run's file went when its output was dropped
        first = next(iter(new))


def test_long_streams_keep_memory_flat_without_frames(comfy):
    server, files = comfy
    g = _t2v(files, length=49, seed=51, window=6, sink=1, return_all=False)  # chunks of 3,3,3,3,1 latent frames
    g["7"] = {"class_type": "SaveVideo", "inputs": {"video": ["5", 2], "filename_prefix": "flat/v", "format": "auto",
                                                    "codec": "auto"}}
    g["8"] = {"class_type": "SFTestTensorInfo", "inputs": {"image": ["5", 1], "latent": ["5", 0]}}
    entry = _run(server, g)
    info = json.loads(entry["outputs"]["8"]["info"][0])
    assert info["image"]["shape"][0] == 4 and info["latent"]["samples"]["shape"][2] == 1  # only the last chunk
    videos = [f for f in server.output_files(entry) if f.suffix == ".mp4"]
    assert len(videos) == 1 and _frames(videos[0]) == 49  # the whole stream went to disk


def test_node_and_cli_give_the_same_latents(comfy, tmp_path):
    server, files = comfy
    node = _latents(server, _run(server, _t2v(files, vae=False, seed=11)))
    p = files["paths"]
    out = tmp_path / "cli.latent"
    cmd = [sys.executable, "-m", "sf_core", "generate", "--model", p["dit"], "--text-encoder", p["text_encoder"],
           "--vae", p["vae"], "--prompt", PROMPT, "--seed", "11", "--frames", "25", "--width", "64", "--height", "48",
           "--output", str(tmp_path / "cli.mp4"), "--latents-out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=600)
    assert res.returncode == 0, res.stderr
    from safetensors.torch import load_file

    cli = load_file(str(out))["latent_tensor"]
    assert cli.shape == node.shape == (1, 16, 7, 6, 8)
    assert (cli - node).abs().max() < 1e-4  # ComfyUI's text encoder and modules vs ours: the same latents
    other = _latents(server, _run(server, _t2v(files, vae=False, seed=12)))
    assert (other - node).abs().max() > 1.0  # another seed gives another video: the agreement is no accident


def test_stock_lora_loader_equals_merged_weights(comfy):
    server, files = comfy
    lora_graph = _t2v(files, model=["7", 0], vae=False, seed=21)
    lora_graph["7"] = {"class_type": "LoraLoaderModelOnly",
                       "inputs": {"model": ["1", 0], "lora_name": "sf_test_lora.safetensors", "strength_model": 1.0}}
    with_lora = _latents(server, _run(server, lora_graph))
    merged_graph = _t2v(files, vae=False, seed=21)
    merged_graph["1"]["inputs"]["unet_name"] = "tiny_merged.safetensors"
    merged = _latents(server, _run(server, merged_graph))
    base = _latents(server, _run(server, _t2v(files, vae=False, seed=21)))
    peft_graph = _t2v(files, model=["7", 0], vae=False, seed=21)
    peft_graph["7"] = {"class_type": "SelfForcingLoadLoRA", "inputs": {
        "model": ["1", 0], "lora_name": "longlive_style_lora.pt", "strength": 1.0, "alpha": 0.0}}
    longlive = _latents(server, _run(server, peft_graph))
    assert "lora key not loaded" not in server.log_text()
    assert (longlive - merged).abs().max() < 1e-4  # LongLive's PEFT layout applies like our own file
    assert (with_lora - merged).abs().max() < 1e-4
    assert (with_lora - base).abs().max() > 1e-2  # the LoRA changes the video


def test_streaming_decode_equals_stock_decode(comfy):
    server, files = comfy
    g = _t2v(files, vae=False, seed=31)
    g["8"] = {"class_type": "SelfForcingStreamingDecode",
              "inputs": {"samples": ["5", 0], "vae": ["4", 0], "tiny_decoder": "none", "latent_frames_per_step": 2}}
    g["9"] = {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["4", 0]}}
    g["10"] = {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "ours"}}
    g["11"] = {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "stock"}}
    entry = _run(server, g)
    import numpy as np
    from PIL import Image

    ours = sorted(f for f in server.output_files(entry) if f.name.startswith("ours"))
    stock = sorted(f for f in server.output_files(entry) if f.name.startswith("stock"))
    assert len(ours) == len(stock) == 25
    diff = max(np.abs(np.asarray(Image.open(a), dtype=int) - np.asarray(Image.open(b), dtype=int)).max()
               for a, b in zip(ours, stock))
    assert diff <= 1  # identical up to 8-bit rounding


def test_cancel_stops_within_a_chunk(comfy):
    server, files = comfy
    with server.websocket() as ws:
        pid = server.queue(_t2v(files, length=397, seed=41, window=6, sink=1), client_id=ws.client_id)
        ws.wait_for(lambda m: m.kind == "text" and (m.text or "").startswith("chunk 2/"), timeout=300)
        server.interrupt()
        t0 = time.monotonic()
        with pytest.raises(Exception, match="interrupt"):
            server.wait(pid, timeout=120)
    after = [m for m in ws.progress_texts("5") if m.t > t0 + 0.5]
    assert len(after) <= 1 and time.monotonic() - t0 < 60
    # the server is usable right after: a short stream runs
    _run(server, _t2v(files, seed=42))


def test_benchmark_node_reports(comfy):
    server, files = comfy
    g = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": files["dit"], "weight_dtype": "default"}},
        "4": {"class_type": "VAELoader", "inputs": {"vae_name": files["vae"]}},
        "5": {"class_type": "SelfForcingBenchmark", "inputs": {
            "model": ["1", 0], "vae": ["4", 0], "chunks": 3, "frames_per_chunk": 3, "denoising_steps": "1000,750,500,250",
            "shift": 5.0, "window": 0, "sink": 0, "sink_positions": "adjacent", "warmup_chunks": 1, **SMALL}},
    }
    entry = _run(server, g)
    report = json.loads(entry["outputs"]["5"]["text"][0])
    assert report["video_frames"] == 1 + 4 * 8 and report["first_frame_latency_s"] > 0
    assert report["fps_with_decoding"] < report["fps_without_decoding"]
    assert len(report["seconds_per_chunk"]) == 3


def test_loader_reads_every_layout_to_the_same_model(comfy):
    server, files = comfy
    outs = []
    for name in (files["dit_official"], "tiny_diffusers/", files["dit"]):
        g = _t2v(files, model=["7", 0], vae=False, seed=61)
        g["7"] = {"class_type": "SelfForcingLoadModel", "inputs": {"model_name": name, "weight_dtype": "default"}}
        outs.append(_latents(server, _run(server, g)))
    stock = _latents(server, _run(server, _t2v(files, vae=False, seed=61)))
    assert all(torch.equal(o, stock) for o in outs)


def _refusal(server, graph) -> dict:
    """POST /prompt expecting a refusal: {node id: {input name: [details, ...]}} from ComfyUI's node_errors."""
    status, resp = server.post_json("/prompt", {"prompt": graph})
    assert status == 400, (status, resp)
    out = {}
    for node_id, entry in resp["node_errors"].items():
        for e in entry["errors"]:
            out.setdefault(node_id, {}).setdefault(e["extra_info"]["input_name"], []).append(e["details"])
    return out


@pytest.mark.parametrize("change, inputs, words", [
    (dict(width=70), {"width", "height"}, "not divisible by 16"),
    (dict(height=8192), {"width", "height"}, "height 8192 is outside"),
    (dict(length=24), {"length"}, "1 \\+ 4\\*k"),
    (dict(window=2, sink=0), {"window", "sink"}, "less than one chunk"),
    (dict(window=6, sink=6), {"window", "sink"}, "smaller than the window"),
    (dict(denoising_steps="250,500"), {"denoising_steps"}, "must decrease"),
])
def test_impossible_inputs_are_refused_on_their_inputs_only(comfy, change, inputs, words):
    server, files = comfy
    errors = _refusal(server, _t2v(files, **change))
    assert set(errors) == {"5"} and set(errors["5"]) == inputs, errors  # only the inputs the rule concerns
    details = [d for ds in errors["5"].values() for d in ds]
    assert len(details) == len(inputs) and all(re.search(words, d) for d in details), details


def _timeline_graph(files, text, **sampler):
    g = _t2v(files, **sampler)
    g["3"] = {"class_type": "SelfForcingPromptTimeline", "inputs": {"clip": ["2", 0], "timeline": text, "switch": "recache"}}
    g["5"]["inputs"].pop("positive")
    g["5"]["inputs"]["timeline"] = ["3", 0]
    return g


@pytest.mark.parametrize("text, where, words", [
    ("1s: a fox\n2s: the fox jumps", {"3": {"timeline"}}, "must start at 0s"),
    ("0s: a fox\n0.5s: the fox jumps", {"3": {"timeline"}}, "prompts 1 and 2 both start in chunk 0"),
    ("0s: a fox\n100s: the fox jumps", {"3": {"timeline"}, "5": {"length"}}, "starts at 100s .* last chunk is 2"),
    (" \n ", {"3": {"timeline"}}, "the prompt is empty"),
    ("0s: a fox\n2s:", {"3": {"timeline"}}, "line 2 has a time but no prompt"),
])
def test_timeline_rules_are_refused_when_queued(comfy, text, where, words):
    server, files = comfy
    before = server.get_json("/history")
    errors = _refusal(server, _timeline_graph(files, text, length=25))  # 25 frames: 7 latent frames, chunks 0..2
    assert {k: set(v) for k, v in errors.items()} == where, errors
    assert all(re.search(words, d) for v in errors.values() for ds in v.values() for d in ds), errors
    assert server.get_json("/history") == before and not server.get_json("/queue")["queue_running"]  # nothing ran


def test_an_empty_prompt_is_refused_on_the_text_encoder(comfy):
    server, files = comfy
    g = _t2v(files)
    g["3"]["inputs"]["text"] = "   "
    assert _refusal(server, g) == {"3": {"text": ["text - the prompt is empty; write what the video should show"]}}


def test_a_timeline_that_fits_runs_and_names_the_active_prompt(comfy):
    server, files = comfy
    g = _timeline_graph(files, "0s: a fox in the snow\n#2: the fox looks straight into the camera lens", length=25)
    with server.websocket() as ws:
        pid = server.queue(g, client_id=ws.client_id)
        server.wait(pid)
    texts = [m.text for m in ws.progress_texts("5")]
    assert any(t.startswith('chunk 1/3 · prompt 1 "a fox in the snow" · ') for t in texts), texts
    assert any(re.match(r'chunk 3/3 · prompt 2 "the fox looks straight into the…" · 25 frames · [\d.]+ FPS'
                        r"( · switched to 'the fox looks straight .*' at chunk 3)?$", t)
               for t in texts), texts


def test_training_node_saves_a_checkpoint_when_cancelled(comfy):
    import workflow_sources as src

    server, files = comfy
    prompt = json.loads(json.dumps(src.WORKFLOWS[src.TRAIN]))
    train = prompt["4"]["inputs"]
    train.update(iterations=500, rank=4, width=32, height=32, length=9, critic_ratio=1, gradient_checkpointing=False,
                 save_every=1000, resume=False, lora_name="cancelled_run")
    graph = {k: prompt[k] for k in ("1", "2", "3", "4", "5", "7")}
    with server.websocket() as ws:
        pid = server.queue(graph, client_id=ws.client_id)
        ws.wait_for(lambda m: m.kind == "text" and (m.text or "").startswith("iteration 3/500"), timeout=300)
        server.interrupt()
        with pytest.raises(Exception, match="interrupt"):
            server.wait(pid, timeout=120)
    ckpt = server.output_dir / "self_forcing_training" / "cancelled_run.ckpt.pt"
    state = torch.load(ckpt, weights_only=True)
    assert 3 <= state["iteration"] < 500
    assert not (server.model_dirs["loras"] / "cancelled_run.safetensors").exists()
    texts = [m.text for m in ws.progress_texts("4")]
    assert any("critic" in t for t in texts)  # the loss is shown on the node

    # the CLI's rules: no silent fresh start over that checkpoint, no resume with other settings
    from comfy_server import ComfyServerError

    with pytest.raises(ComfyServerError, match="already exists.*turn resume on"):
        server.wait(server.queue(graph), timeout=120)
    graph["4"]["inputs"].update(resume=True, rank=8)
    with pytest.raises(ComfyServerError, match="rank=4"):
        server.wait(server.queue(graph), timeout=120)
    assert torch.load(ckpt, weights_only=True)["iteration"] == state["iteration"]  # left as it was


def test_training_shows_frames_of_the_current_generator(comfy):
    import workflow_sources as src
    from PIL import Image
    import io as _io

    server, files = comfy
    prompt = json.loads(json.dumps(src.WORKFLOWS[src.TRAIN]))
    train = prompt["4"]["inputs"]
    train.update(iterations=2, rank=4, width=32, height=32, length=9, critic_ratio=1, gradient_checkpointing=False,
                 save_every=1000, resume=False, lora_name="previewed_run", preview_every=1, learning_rate=0.05)
    graph = {k: prompt[k] for k in ("1", "2", "3", "4", "5", "7")}
    with server.websocket(preview_metadata=True) as ws:
        pid = server.queue(graph, client_id=ws.client_id)
        server.wait(pid)
        ws.wait_done(pid)
    previews = ws.previews("4")
    assert len(previews) == 2  # one per iteration at preview_every 1
    strips = [Image.open(_io.BytesIO(m.image)) for m in previews]
    assert all(im.size == (4 * 32, 32) for im in strips)  # 4 decoded 32x32 frames of the 9-frame rollout, side by side
    import numpy as np

    a, b = (np.asarray(im, dtype=float) for im in strips)
    assert np.abs(a - b).mean() > 0.5  # the generator changed between the two iterations, and so did its frames
    assert any("critic" in m.text for m in ws.progress_texts("4"))  # beside the loss text


def test_fp8_weights_and_requeue_caching(comfy):
    server, files = comfy
    base = _latents(server, _run(server, _t2v(files, vae=False, seed=71)))
    fp8 = _t2v(files, vae=False, seed=71)
    fp8["1"]["inputs"]["weight_dtype"] = "fp8_e4m3fn"  # stock loader, weights stored in fp8
    low = _latents(server, _run(server, fp8))
    assert 0 < (low - base).abs().max() < 0.25 * base.abs().max()  # fp8 rounding, same video
    with server.websocket() as ws:  # the same prompt again is served from ComfyUI's cache
        pid = server.queue(fp8, client_id=ws.client_id)
        server.wait(pid)
        ws.wait_done(pid)
    cached = [m for m in ws.json_messages("execution_cached") if m.data.get("prompt_id") == pid]
    assert cached and "5" in cached[0].data["nodes"]


def test_compile_input_gives_the_eager_video_on_stock_fp8_weights(comfy):
    server, files = comfy
    graph = _t2v(files, vae=False, seed=72, window=6, sink=1)  # rolling window: the cache's ring is used
    graph["1"]["inputs"]["weight_dtype"] = "fp8_e4m3fn"  # ComfyUI's own ops cast the weights inside the block
    eager = _latents(server, _run(server, graph))
    graph["5"]["inputs"]["fast_path"] = "compile + CUDA graphs"  # graphs only on CUDA: compiled blocks here
    compiled = _latents(server, _run(server, graph))
    assert eager.abs().max() > 0.1
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-3 * eager.abs().max().item())


def test_toy_workflow_streams_the_prompted_objects_with_live_previews(comfy):
    """The toy template as shipped (81 frames, 64x64): the model carries its autoencoder, so with no VAE connected
    the previews are decoded frames, one set per chunk, and the video shows the timeline's objects, cut at 3 s."""
    import io

    import av
    from PIL import Image

    import workflow_sources as src
    from sf_core.toy import world
    from sf_core.toy.detect import detect

    server, _ = comfy
    prompt = json.loads(json.dumps(src.WORKFLOWS[src.TOY]))
    with server.websocket(preview_metadata=True) as ws:
        pid = server.queue(prompt, client_id=ws.client_id)
        entry = server.wait(pid)
        ws.wait_done(pid)
    previews = ws.previews("4")
    assert len(previews) >= 7  # 81 frames: 7 chunks, each shown
    shown = Image.open(io.BytesIO(previews[-1].image)).convert("RGB")
    assert shown.size == (64, 64)  # a decoded frame, not an upscaled 8x8 latent preview
    video = next(f for f in server.output_files(entry) if f.suffix == ".mp4")
    with av.open(str(video)) as c:
        frames = torch.stack([torch.from_numpy(f.to_ndarray(format="rgb24")) for f in c.decode(video=0)])
    assert frames.shape == (81, 64, 64, 3)
    det = detect(frames)
    colour = {c: world.COLOUR_NAMES.index(c) for c in world.COLOUR_NAMES}
    first, second = det.present[:45], det.present[57:]  # before the cut at 3 s (frame 48), from a chunk after it
    for c in ("red", "blue"):  # "a red circle moves right and a blue square bounces on a grey background"
        assert first[:, colour[c]].float().mean() > 0.6, c
    assert second[:, colour["white"]].float().mean() > 0.6  # "3s: a white circle orbits on a black background"
    dominant = det.dominant[:45]
    assert ((dominant == colour["red"]) | (dominant == colour["blue"])).float().mean() > 0.8  # they fill the frames


def test_toy_text_encoder_refuses_text_outside_the_toy_world(comfy):
    import workflow_sources as src

    server, _ = comfy
    prompt = json.loads(json.dumps(src.WORKFLOWS[src.TOY]))
    prompt["3"]["inputs"]["timeline"] = "0s: a red fox runs over the snow"
    with pytest.raises(Exception, match="captions of the toy world"):
        _run(server, prompt)
