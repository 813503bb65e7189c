"""Tiny random-weight model files that ComfyUI's STOCK loaders accept, plus UI <-> API workflow conversion.

    from comfy_fixtures import SHIM_DIR, write_comfy_tiny_models, ui_to_api, api_to_ui
    server = ComfyServer(tmp_path, extra_custom_nodes=[SHIM_DIR])
    files = write_comfy_tiny_models(server.models_dir)      # before start: the env must reach the server
    server.env.update(files["env"])
    with server: ...                                         # UNETLoader(files["dit"]), CLIPLoader(files["text_encoder"], "wan"), ...

(``tiny_comfy_server(work_dir)`` does those three lines.)

What is written (names relative to their ComfyUI folder, all deterministic for a given seed):

- diffusion_models/tiny_wan2.1_t2v.safetensors   Wan2.1 T2V DiT in plain Wan names (``write_dit(.., "wan")``),
  ``COMFY_DIT_CONFIG`` = dim 256 / 2 heads / 2 layers / ffn 512 / text_dim 4096 / freq_dim 256: ComfyUI infers
  dim, heads (= dim // 128), ffn, layers and in_dim from the weights but takes text_dim 4096 and freq_dim 256
  as fixed defaults, so those two must be real-size.
- diffusion_models/tiny_self_forcing_dmd.pt      the same weights as an official Self-Forcing checkpoint
  (``{"generator_ema": {"model.blocks.N._fsdp_wrapped_module...."}, "generator": zeros}``); the stock
  UNETLoader cannot load this one, only our pack's loader.
- text_encoders/tiny_umt5_xxl.safetensors        UMT5 encoder in ComfyUI/HF names with the tokenizer as the uint8
  ``spiece_model`` tensor (fp16, like umt5_xxl_fp16). d_model 4096 (the DiT's text_dim) but 2 blocks,
  2 heads x d_kv 8, d_ff 16 and a 200-piece vocabulary (fixtures.text.write_tiny_umt5).
  ComfyUI builds that encoder from a FIXED json (comfy/text_encoders/umt5_config_xxl.json), so the server
  must run with the test shim (``SHIM_DIR``) and ``env["SF_TEST_UMT5_CONFIG"]`` = the tiny json written here.
  ComfyUI's ``detect_te_model`` also only calls a file UMT5/T5-XXL when it has block 23
  (``encoder.block.23.layer.1.DenseReluDense.wi_1.weight`` with 4096 in-features); a 2-block file would be
  detected as T5_BASE and (since it carries ``spiece_model``) loaded as the ACE-Step T5 whatever the
  CLIPLoader type says - the shim fixes the detection for files matching the tiny json. ``te_layers=24``
  writes a file that stock detection accepts as is (the shim then only swaps the json), but each text
  encode costs ~10 s instead of ~1 s on a busy 2-core CPU (512 tokens x 4096 channels x 24 layers).
- vae/tiny_wan_2.1_vae.safetensors               Wan2.1 VAE, same 194 names as Wan2.1_VAE, base dim 8. ComfyUI
  takes dim from ``decoder.head.0.gamma`` and hard-codes dim_mult (1,2,4,4), 2 res blocks, no attn scales,
  temporal downsample (F,T,T) and 16 latent channels - exactly sf_core's ``WanVAEConfig`` defaults, so
  ``fixtures.vae.write_tiny_wan_vae`` is used as is.
- vae_approx/taew2_1_tiny.pth                    TAEHV (taew2_1 layout, decoder channels 32/16/8/8) for our pack's
  preview/fast decoder. ComfyUI's own TAEHV has FIXED channels (256,128,64,64 / encoder 64), so this file is
  for our loader only; its name deliberately does not start with one of ComfyUI's video TAE prefixes
  ("taehv", "lighttaew2_1", ...), so the stock VAELoader and latent previewer ignore it.
  ``stock_taehv=True`` additionally writes vae_approx/lighttaew2_1.safetensors: full-width random TAEHV weights
  (fp32, ~40 MB) that ComfyUI's VAELoader lists and loads (fp32 -> no latent scaling, i.e. Wan2.1).
- umt5_config_tiny.json (in models_dir itself) the shim's UMT5 config.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from sf_core.config import WanConfig  # noqa: E402
from fixtures.dit import tiny_dit_state_dict, write_dit  # noqa: E402
from fixtures.text import train_tiny_sentencepiece, write_tiny_umt5  # noqa: E402
from sf_core.text import UMT5Config  # noqa: E402

SHIM_DIR = Path(__file__).resolve().parent / "comfy_shim" / "sf_test_shim"
UMT5_CONFIG_ENV = "SF_TEST_UMT5_CONFIG"

# The smallest Wan DiT ComfyUI's detection reproduces exactly (head_dim 128 is implied by dim // 128).
COMFY_DIT_CONFIG = WanConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=4096, freq_dim=256)
SPIECE_VOCAB = 200  # train_tiny_sentencepiece(200); the file's vocab is the trained model's real size


def comfy_umt5_config(vocab_size: int, num_layers: int = 2) -> UMT5Config:
    """UMT5 with d_model 4096 (the Wan DiT's text_dim) and tiny everything else."""
    return UMT5Config(vocab_size=vocab_size, dim=4096, ffn_dim=16, num_heads=2, head_dim=8, num_layers=num_layers)


def umt5_config_json(config: UMT5Config) -> dict:
    """The HF/ComfyUI config json for `config` (same keys as comfy/text_encoders/umt5_config_xxl.json)."""
    return {
        "d_ff": config.ffn_dim, "d_kv": config.head_dim, "d_model": config.dim, "decoder_start_token_id": 0,
        "dropout_rate": 0.1, "eos_token_id": 1, "dense_act_fn": "gelu_pytorch_tanh", "initializer_factor": 1.0,
        "is_encoder_decoder": True, "is_gated_act": True, "layer_norm_epsilon": config.eps, "model_type": "umt5",
        "num_decoder_layers": config.num_layers, "num_heads": config.num_heads, "num_layers": config.num_layers,
        "output_past": True, "pad_token_id": 0, "relative_attention_num_buckets": config.num_buckets,
        "tie_word_embeddings": False, "vocab_size": config.vocab_size,
    }


def _spiece_size(spiece: bytes) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=spiece).get_piece_size()


def write_comfy_tiny_models(models_dir: str | os.PathLike, seed: int = 0, dit_dtype: torch.dtype = torch.float32,
                            te_layers: int = 2, stock_taehv: bool = False) -> dict[str, Any]:
    """Write the tiny files (see the module docstring) under models_dir/{diffusion_models,text_encoders,vae,
    vae_approx,loras}. Returns::

        {"dit": name, "dit_official": name, "text_encoder": name, "vae": name, "taehv": name,
         ["taehv_stock": name,] "umt5_config": abs path, "env": {"SF_TEST_UMT5_CONFIG": abs path},
         "paths": {same keys: abs path}, "dit_config": WanConfig, "umt5_config_obj": UMT5Config,
         "text_dim": 4096, "vocab_size": int}
    """
    from fixtures.vae import write_tiny_taehv, write_tiny_wan_vae

    models_dir = Path(models_dir).resolve()
    dirs = {k: models_dir / k for k in ("diffusion_models", "text_encoders", "vae", "vae_approx", "loras")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}

    sd = tiny_dit_state_dict(COMFY_DIT_CONFIG, seed=seed)
    sd = {k: v.to(dit_dtype) if v.is_floating_point() else v for k, v in sd.items()}
    paths["dit"] = write_dit(dirs["diffusion_models"] / "tiny_wan2.1_t2v.safetensors", sd, "wan")
    paths["dit_official"] = write_dit(dirs["diffusion_models"] / "tiny_self_forcing_dmd.pt", sd, "official_pt")

    spiece = train_tiny_sentencepiece(SPIECE_VOCAB, seed=seed)
    te_config = comfy_umt5_config(_spiece_size(spiece), te_layers)
    paths["text_encoder"] = write_tiny_umt5(dirs["text_encoders"] / "tiny_umt5_xxl.safetensors", "comfy_hf",
                                            config=te_config, seed=seed, dtype=torch.float16, spiece=spiece)
    paths["umt5_config"] = models_dir / "umt5_config_tiny.json"
    paths["umt5_config"].write_text(json.dumps(umt5_config_json(te_config), indent=1))

    paths["vae"] = write_tiny_wan_vae(dirs["vae"] / "tiny_wan_2.1_vae.safetensors", seed=seed)
    paths["taehv"] = write_tiny_taehv(dirs["vae_approx"] / "taew2_1_tiny.pth", seed=seed)
    if stock_taehv:
        from fixtures.vae import make_tiny_taehv_state_dict, save_state_dict

        full = make_tiny_taehv_state_dict((256, 128, 64, 64), encoder_channels=64, seed=seed)
        paths["taehv_stock"] = save_state_dict(full, dirs["vae_approx"] / "lighttaew2_1.safetensors")

    out: dict[str, Any] = {k: p.name for k, p in paths.items()}
    out["umt5_config"] = str(paths["umt5_config"])
    out["paths"] = {k: str(p) for k, p in paths.items()}
    out["env"] = {UMT5_CONFIG_ENV: str(paths["umt5_config"])}
    out["dit_config"] = COMFY_DIT_CONFIG
    out["umt5_config_obj"] = te_config
    out["text_dim"] = te_config.dim
    out["vocab_size"] = te_config.vocab_size
    return out


def tiny_comfy_server(work_dir: str | os.PathLike, te_layers: int = 2, stock_taehv: bool = False, **server_kwargs):
    """A (not yet started) ComfyServer with the test shim loaded and the tiny models written into its model
    folders; returns (server, files) where files is `write_comfy_tiny_models`'s dict. Extra keyword
    arguments go to ComfyServer (e.g. pack_dir=None for stock-only tests)."""
    from comfy_server import ComfyServer

    extra = list(server_kwargs.pop("extra_custom_nodes", []))
    server = ComfyServer(Path(work_dir), extra_custom_nodes=[SHIM_DIR, *extra], **server_kwargs)
    files = write_comfy_tiny_models(server.models_dir, te_layers=te_layers, stock_taehv=stock_taehv)
    server.env.update(files["env"])
    return server, files


# ----------------------------------------------------------------------------------------------
# UI workflow <-> API prompt, through the real frontend


def sampler_graph(files: dict, prompt: str, *, seed: int = 3, length: int = 25, folder: str = "latents",
                  model=None, vae: bool = True, clip: bool = False, **sampler) -> dict:
    """An API prompt: stock loaders (UNETLoader, CLIPLoader type wan, CLIP Text Encode, VAELoader) into the
    Self-Forcing Stream Sampler (chunk-wise, 4 steps, whole-video cache), whose LATENT SaveLatent writes as
    `folder/s<seed>`. `model` replaces the MODEL link; `vae` / `clip` connect those inputs; `sampler` sets inputs."""
    inputs = {"model": model or ["1", 0], "positive": ["3", 0], "seed": seed, "length": length, "frames_per_chunk": 3,
              "denoising_steps": "1000,750,500,250", "shift": 5.0, "window": 0, "sink": 0,
              "sink_positions": "adjacent", "fps": 16.0, **({"vae": ["4", 0]} if vae else {}),
              **({"clip": ["2", 0]} if clip else {}), **sampler}
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": files["dit"], "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": files["text_encoder"], "type": "wan", "device": "default"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": prompt}},
        "4": {"class_type": "VAELoader", "inputs": {"vae_name": files["vae"]}},
        "5": {"class_type": "SelfForcingStreamSampler", "inputs": inputs},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": f"{folder}/s{seed}"}},
    }


def _page_and_owner(server_or_page):
    """(page, close_after): a BrowserPage passed in is used as is; a ComfyServer gets a temporary page."""
    from comfy_server import BrowserPage, ComfyServer

    if isinstance(server_or_page, ComfyServer):
        return BrowserPage(server_or_page), True
    return server_or_page, False


_MISSING_TYPES_JS = """
  const missing = (types) => types.filter(t => !LiteGraph.registered_node_types[t]);
"""


def _run_in_frontend(server_or_page, types, js_body: str, what: str) -> dict:
    """Run `js_body` (async JS that ends with a `return {...}`) in the frontend once every node type in `types`
    is registered; a ComfyServerError names the missing ones."""
    from comfy_server import ComfyServerError

    page, own = _page_and_owner(server_or_page)
    try:
        res = page.evaluate("(async () => {" + _MISSING_TYPES_JS + f"  const m = missing({json.dumps(sorted(types))});"
                            "  if (m.length) return {missing: m};" + js_body + "})()")
        if res.get("missing"):
            raise ComfyServerError(f"the {what} uses node types the server does not have: {res['missing']}")
        return res
    finally:
        if own:
            page.close()


def ui_to_api(server_or_page, ui_workflow: dict) -> dict:
    """A UI-format workflow (nodes/links, what template files hold) -> the API prompt {id: {class_type,
    inputs, _meta}} the frontend would queue: ``app.loadGraphData(wf)`` then ``(await app.graphToPrompt()).output``.
    Raises ComfyServerError when the workflow names node types the server does not know (the frontend would
    only show its missing-nodes dialog)."""
    types = {n.get("type") for n in ui_workflow.get("nodes", []) if n.get("type")}
    js = (f"  await app.loadGraphData({json.dumps(ui_workflow)}, true, true, null,"
          "       {showMissingNodesDialog: false, showMissingModelsDialog: false});"
          "  const p = await app.graphToPrompt();"
          "  return {output: p.output};")
    return _run_in_frontend(server_or_page, types, js, "workflow")["output"]


def api_to_ui(server_or_page, api_prompt: dict, name: str = "workflow.json") -> dict:
    """An API prompt -> a UI-format workflow: ``app.loadApiJson(prompt)`` (creates the nodes with the same
    ids, sets widget values, links, arranges) then ``app.graph.serialize()``. Raises ComfyServerError for
    unknown node types."""
    types = {n["class_type"] for n in api_prompt.values()}
    js = (f"  await app.loadApiJson({json.dumps(api_prompt)}, {json.dumps(name)});"
          "  return {workflow: app.graph.serialize()};")
    return _run_in_frontend(server_or_page, types, js, "prompt")["workflow"]


def _widget_default(spec: list) -> Any:
    """The value the frontend gives a widget of /object_info input spec [type_or_options, {options}]."""
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "default" in opts:
        return opts["default"]
    choices = spec[0] if isinstance(spec[0], list) else opts.get("options")
    return choices[0] if choices else None


def prompts_equivalent(a: dict, b: dict, object_info: dict | None = None) -> list[str]:
    """Differences between two API prompts (empty list = equivalent): same node ids and class types, same
    links, same widget values. An input present in only one of them is tolerated when object_info (from
    /object_info) says it is optional and the value is its default (the frontend fills every widget in)."""
    problems = []
    if set(a) != set(b):
        return [f"node ids differ: {sorted(a)} vs {sorted(b)}"]
    for nid in sorted(a):
        na, nb = a[nid], b[nid]
        if na["class_type"] != nb["class_type"]:
            problems.append(f"{nid}: class {na['class_type']} vs {nb['class_type']}")
            continue
        info = (object_info or {}).get(na["class_type"], {}).get("input", {})
        optional = {**info.get("optional", {})}
        ia, ib = na.get("inputs", {}), nb.get("inputs", {})
        for key in sorted(set(ia) | set(ib)):
            if key in ia and key in ib:
                va, vb = ia[key], ib[key]
                if isinstance(va, list) and isinstance(vb, list):
                    va, vb = [str(va[0]), int(va[1])], [str(vb[0]), int(vb[1])]
                if va != vb:
                    problems.append(f"{nid}.{key}: {ia[key]!r} vs {ib[key]!r}")
                continue
            value = ia.get(key, ib.get(key))
            spec = optional.get(key)
            if spec is None or value != _widget_default(spec):
                problems.append(f"{nid}.{key}: only in {'first' if key in ia else 'second'} ({value!r})")
    return problems


__all__ = ["COMFY_DIT_CONFIG", "SHIM_DIR", "UMT5_CONFIG_ENV", "api_to_ui", "comfy_umt5_config",
           "prompts_equivalent", "sampler_graph", "tiny_comfy_server", "ui_to_api", "umt5_config_json", "write_comfy_tiny_models"]
