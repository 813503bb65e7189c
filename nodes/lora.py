"""Self-Forcing Load LoRA: any family LoRA (ours, ComfyUI, LongLive's PEFT files) onto a stock MODEL."""

from __future__ import annotations

import comfy.sd
import folder_paths
from comfy_api.latest import io

from ..sf_core.lora import LoRA
from .common import CATEGORY


class LoadLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SelfForcingLoadLoRA",
            display_name="Self-Forcing Load LoRA",
            category=CATEGORY,
            description="Applies a LoRA to the model through ComfyUI's own patching. Reads the layouts the stock "
                        "loader reads and also LongLive's PEFT files (base_model.model.blocks...lora_A/lora_B, "
                        "optionally under generator_lora in a .pt).",
            inputs=[
                io.Model.Input("model", tooltip="A Wan2.1-family MODEL."),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="File in models/loras."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Multiplies the LoRA's effect (1 = as trained)."),
                io.Float.Input("alpha", default=0.0, min=0.0, max=4096.0, step=1.0,
                               tooltip="For files that store no alpha (PEFT): scale = alpha / rank. 0 = the rank "
                                       "(LongLive's rank 256 / alpha 256)."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the LoRA patched in (the input model is left unchanged).")],
        )

    @classmethod
    def execute(cls, model, lora_name, strength, alpha) -> io.NodeOutput:
        lora = LoRA.load(folder_paths.get_full_path_or_raise("loras", lora_name), alpha=alpha or None)
        patched, _ = comfy.sd.load_lora_for_models(model, None, lora.to_comfy(), strength, 0)
        return io.NodeOutput(patched)
