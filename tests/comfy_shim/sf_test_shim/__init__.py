"""TEST-ONLY ComfyUI custom node package (never shipped): lets the stock CLIPLoader(type "wan") load a tiny
UMT5 file, and adds one inspection node.

1. ComfyUI builds its UMT5-XXL encoder (comfy.text_encoders.wan.UMT5XXlModel) from the fixed
   comfy/text_encoders/umt5_config_xxl.json (d_model 4096, 64 heads, d_ff 10240, vocab 256384), so a tiny
   random file cannot load. When the environment variable SF_TEST_UMT5_CONFIG names a json file, this
   package wraps ``comfy.sd1_clip.SDClipModel.__init__`` so that, for UMT5XXlModel instances only, that json
   is used instead of the XXL one. Everything else (tokenizer, masks, special tokens, dtype handling) stays
   ComfyUI's own code. Without the variable nothing is patched.
   ComfyUI also only DETECTS a file as T5-XXL/UMT5-XXL when it has block 23
   (``encoder.block.23.layer.1.DenseReluDense.wi_1.weight`` with 4096 in-features, comfy/sd.py
   ``detect_te_model``); with fewer blocks it says T5_BASE and loads the ACE-Step T5 instead. So when the
   json has fewer than 24 layers, ``comfy.sd.detect_te_model`` / ``comfy.sd.t5xxl_detect`` are wrapped too:
   a state dict that matches the json exactly (spiece_model, d_model, block count) is called T5_XXL and its
   dtype/quantisation is read as for a real one. (A 24-block tiny file needs no detection patch, but its
   text encode costs ~10x more on CPU: 24 layers x 512 tokens x 4096 channels.)
2. ``SFTestTensorInfo`` (output node): reports shapes/dtypes/stats of a CONDITIONING, LATENT and/or IMAGE in
   its ui output ``{"info": [json string]}`` so tests can assert on what stock nodes produced.

The test harness symlinks this folder into the server's custom_nodes (ComfyServer(extra_custom_nodes=[...])).
"""

import functools
import json
import logging
import os

import comfy.sd1_clip
import comfy.text_encoders.wan

_ENV = "SF_TEST_UMT5_CONFIG"
_XXL_JSON = "umt5_config_xxl.json"


def _install_umt5_config_override() -> None:
    path = os.environ.get(_ENV, "").strip()
    if not path:
        return
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{_ENV}={path}: no such file")
    original = comfy.sd1_clip.SDClipModel.__init__
    if getattr(original, "_sf_test_shim", False):
        return

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        cfg = kwargs.get("textmodel_json_config")
        if isinstance(self, comfy.text_encoders.wan.UMT5XXlModel) and isinstance(cfg, str) \
                and os.path.basename(cfg) == _XXL_JSON:
            kwargs["textmodel_json_config"] = path
        return original(self, *args, **kwargs)

    __init__._sf_test_shim = True
    comfy.sd1_clip.SDClipModel.__init__ = __init__
    logging.info("sf_test_shim: UMT5XXlModel uses the config %s", path)

    with open(path) as f:
        config = json.load(f)
    if config["num_layers"] < 24:
        _install_detection_override(config)


def _is_tiny_umt5(sd, config) -> bool:
    """Whether state dict `sd` is exactly a UMT5 encoder of `config` (HF names, with spiece_model)."""
    last = "encoder.block.{}.layer.1.DenseReluDense.wi_1.weight"
    shared = sd.get("shared.weight")
    return ("spiece_model" in sd and shared is not None and tuple(shared.shape) == (config["vocab_size"],
            config["d_model"]) and last.format(config["num_layers"] - 1) in sd
            and last.format(config["num_layers"]) not in sd
            and sd[last.format(config["num_layers"] - 1)].shape[-1] == config["d_model"])


def _install_detection_override(config) -> None:
    import comfy.sd
    import comfy.text_encoders.sd3_clip

    detect_te_model, t5xxl_detect = comfy.sd.detect_te_model, comfy.sd.t5xxl_detect

    @functools.wraps(detect_te_model)
    def detect(sd):
        return comfy.sd.TEModel.T5_XXL if _is_tiny_umt5(sd, config) else detect_te_model(sd)

    @functools.wraps(t5xxl_detect)
    def detect_dtype(clip_data):
        for sd in clip_data:
            if _is_tiny_umt5(sd, config):
                return comfy.text_encoders.sd3_clip.t5_xxl_detect(sd)
        return t5xxl_detect(clip_data)

    comfy.sd.detect_te_model, comfy.sd.t5xxl_detect = detect, detect_dtype
    logging.info("sf_test_shim: %d-layer UMT5 files matching that config are detected as UMT5-XXL",
                 config["num_layers"])


_install_umt5_config_override()


def _describe(x):
    import torch

    if isinstance(x, torch.Tensor):
        d = {"shape": list(x.shape), "dtype": str(x.dtype).replace("torch.", "")}
        if x.numel() and x.is_floating_point():
            xf = x.float()
            d.update(min=xf.min().item(), max=xf.max().item(), mean=xf.mean().item(), std=xf.std().item()
                     if x.numel() > 1 else 0.0, finite=bool(torch.isfinite(xf).all()))
        return d
    if isinstance(x, dict):
        return {str(k): _describe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_describe(v) for v in x]
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return type(x).__name__


class SFTestTensorInfo:
    """Shapes, dtypes and stats of its inputs, as ui output {"info": [json]}."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}, "optional": {"conditioning": ("CONDITIONING",), "latent": ("LATENT",),
                                             "image": ("IMAGE",)}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def run(self, conditioning=None, latent=None, image=None):
        import torch

        info = {}
        if conditioning is not None:
            entries = []
            for cond, extra in conditioning:
                # Per-position "is exactly zero" profile: where ComfyUI zeroed the padded tokens.
                nonzero = (cond.float().abs().sum(-1) > 0)[0]
                last = int(torch.nonzero(nonzero).max().item()) if bool(nonzero.any()) else -1
                entries.append({"cond": _describe(cond), "extra": _describe(extra),
                                "nonzero_tokens": int(nonzero.sum().item()), "last_nonzero_token": last})
            info["conditioning"] = entries
        if latent is not None:
            info["latent"] = _describe(latent)
        if image is not None:
            info["image"] = _describe(image)
        return {"ui": {"info": [json.dumps(info)]}}


NODE_CLASS_MAPPINGS = {"SFTestTensorInfo": SFTestTensorInfo}
NODE_DISPLAY_NAME_MAPPINGS = {"SFTestTensorInfo": "SF Test Tensor Info"}
