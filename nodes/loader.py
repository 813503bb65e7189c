"""Load Self-Forcing Model: any Wan2.1-family DiT file -> a stock MODEL."""

from __future__ import annotations

from pathlib import Path

import torch

import comfy.sd
import folder_paths
from comfy_api.latest import io

from ..sf_core.checkpoints import dequantize_fp8, load_dit_checkpoint
from ..sf_core.toy.models import check_shipped
from . import bridge
from .common import CATEGORY

WEIGHT_DTYPES = {"default": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8_e4m3fn": torch.float8_e4m3fn}


TOY_DIT = "toy world (embedded)"


class LoadModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SelfForcingLoadModel",
            display_name="Load Self-Forcing Model",
            category=CATEGORY,
            description="Loads the official Self Forcing .pt (generator_ema preferred), plain or prefixed Wan2.1 "
                        "safetensors, or a diffusers transformer, as a stock MODEL that any sampler can use.",
            inputs=[
                io.Combo.Input("model_name", options=folder_paths.get_filename_list("diffusion_models") + _diffusers_folders()
                               + [TOY_DIT],
                               tooltip="File in models/diffusion_models, or a diffusers transformer folder there (ends in /); "
                                       f"'{TOY_DIT}' is the small model of the toy world shipped with the pack."),
                io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), default="default",
                               tooltip="Storage dtype of the weights; default lets ComfyUI choose for your device."),
            ],
            outputs=[io.Model.Output(tooltip="The DiT as a stock MODEL: for the Self-Forcing Stream Sampler, LoRA loaders "
                                             "and any other node that takes a MODEL.")],
        )

    @classmethod
    def execute(cls, model_name, weight_dtype) -> io.NodeOutput:
        if model_name == TOY_DIT:
            model = _load_toy(load_dit_checkpoint(_resolve(model_name)).state_dict)
            bridge.attach_autoencoder(model, check_shipped()["autoencoder"])  # the sampler decodes with it
            return io.NodeOutput(model)
        ckpt = load_dit_checkpoint(_resolve(model_name))
        sd = ckpt.state_dict
        if any(k.endswith(".scale_weight") for k in sd):  # scaled fp8: dequantise for ComfyUI
            sd = dequantize_fp8(sd, torch.bfloat16)
        options = {} if WEIGHT_DTYPES[weight_dtype] is None else {"dtype": WEIGHT_DTYPES[weight_dtype]}
        model = comfy.sd.load_diffusion_model_state_dict(sd, model_options=options)
        if model is None:
            raise ValueError(f"ComfyUI could not build a model from {model_name} ({ckpt.format})")
        return io.NodeOutput(model)


def _load_toy(sd: dict):
    """The toy DiT as a stock MODEL. ComfyUI infers a Wan config from the weights except the text width, which it
    takes as 4096 (UMT5-XXL); the toy model reads its small encoder's 64, so that one field is set from the weights."""
    import comfy.model_detection
    import comfy.model_management as mm
    import comfy.model_patcher

    config = comfy.model_detection.model_config_from_unet(sd, "")
    config.unet_config["text_dim"] = int(sd["text_embedding.0.weight"].shape[1])
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model(sd, "").to(mm.unet_offload_device())
    model.load_model_weights(sd, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def _diffusers_folders() -> list[str]:
    """Folders under diffusion_models holding a diffusers transformer (config.json + safetensors), as 'name/'."""
    found = []
    for root in folder_paths.get_folder_paths("diffusion_models"):
        root = Path(root)
        if not root.is_dir():
            continue
        for d in sorted(p for p in root.iterdir() if p.is_dir()):
            inner = d / "transformer" if (d / "transformer").is_dir() else d
            if (inner / "config.json").is_file() and any(inner.glob("*.safetensors")):
                found.append(d.name + "/")
    return found


def _resolve(model_name: str) -> Path:
    if model_name == TOY_DIT:
        return check_shipped()["dit"]
    if model_name.endswith("/"):
        for root in folder_paths.get_folder_paths("diffusion_models"):
            if (Path(root) / model_name).is_dir():
                return Path(root) / model_name
    return Path(folder_paths.get_full_path_or_raise("diffusion_models", model_name))
