"""The pack in a real headless ComfyUI (COMFYUI_DIR), on tiny weight files in the real formats placed under
the real release names: it loads, every shipped workflow runs end to end, previews stream during sampling,
node and CLI agree, stock LoRA loading equals merging, streaming decode equals the stock decode."""

import json
import os
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
         "SelfForcingStreamingDecode", "SelfForcingBenchmark", "SelfForcingTrainLoRA"]
PROMPT = "a red fox runs over the snow"
SMALL = {"width": 64, "height": 48}


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    import workflow_sources as src

    server, files = tiny_comfy_server(tmp_path_factory.mktemp("comfy_pack"))
    p = files["paths"]
    # the tiny files under the real release names, so the shipped workflows run unchanged
    server.add_model("diffusion_models", p["dit"], src.DIT)
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
    templates = server.get_json("/workflow_templates")
    assert sorted(templates[server.pack_name]) == sorted(p.stem for p in WORKFLOWS)


def _speed_up(prompt: dict) -> dict:
    """Shrink sizes and counts so a CPU runs the shipped graphs in seconds (structure unchanged)."""
    for node in prompt.values():
        ins = node["inputs"]
        if node["class_type"] == "SelfForcingStreamSampler":
            ins.update(SMALL, length=97 if ins.get("window") else 25)
        if node["class_type"] == "SelfForcingPromptTimeline":
            ins["timeline"] = "0s: a fox in the snow\n2s: the fox looks at the camera\n4s: the fox jumps"
        if node["class_type"] == "SelfForcingTrainLoRA":
            ins.update(iterations=2, rank=4, width=32, height=32, length=9, critic_ratio=1,
                       gradient_checkpointing=False, save_every=1, resume=False)
    return prompt


@pytest.mark.skipif(chromium_skip_reason() is not None, reason=chromium_skip_reason() or "")
@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.stem)
def test_every_workflow_runs_end_to_end(comfy, workflow):
    import workflow_sources as src

    server, _ = comfy
    with BrowserPage(server) as page:
        prompt = ui_to_api(page, json.loads(workflow.read_text()))
    assert prompts_equivalent(prompt, src.WORKFLOWS[workflow.stem], server.object_info()) == []  # file in sync
    entry = _run(server, _speed_up(prompt))
    videos = [f for f in server.output_files(entry) if f.suffix == ".mp4"]
    sampler = next(n for n in prompt.values() if n["class_type"] == "SelfForcingStreamSampler")
    assert len(videos) == 1 and _frames(videos[0]) == sampler["inputs"]["length"]
    if "train" in workflow.stem:
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


def test_impossible_inputs_are_refused_at_queue_time(comfy):
    from comfy_server import ComfyServerError

    server, files = comfy
    for change, words in ((dict(width=70), "not divisible by 16"), (dict(length=24), "1 \\+ 4\\*k"),
                          (dict(window=2, sink=0), "less than one chunk"), (dict(window=6, sink=6), "smaller than the window")):
        with pytest.raises(ComfyServerError, match=words):
            server.queue(_t2v(files, **change))


def test_training_node_saves_a_checkpoint_when_cancelled(comfy):
    import workflow_sources as src

    server, files = comfy
    prompt = json.loads(json.dumps(src.WORKFLOWS["self_forcing_train_lora"]))
    train = prompt["4"]["inputs"]
    train.update(iterations=500, rank=4, width=32, height=32, length=9, critic_ratio=1, gradient_checkpointing=False,
                 save_every=1000, resume=False, lora_name="cancelled_run")
    graph = {k: prompt[k] for k in ("1", "2", "3", "4", "5")}
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
