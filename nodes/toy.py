"""Self-Forcing Toy Text Encode: a caption of the toy world -> CONDITIONING, with the small UMT5 shipped in the pack
(ComfyUI's stock CLIPLoader builds UMT5-XXL only)."""

from __future__ import annotations

from comfy_api.latest import io

from ..sf_core.text import load_text_encoder
from ..sf_core.toy.models import check_shipped
from .common import CATEGORY


class ToyTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SelfForcingToyTextEncode",
            display_name="Self-Forcing Toy Text Encode",
            category=CATEGORY,
            description="Encodes a caption of the toy world (coloured shapes, e.g. 'a red circle moves right on a grey "
                        "background') with the small text encoder shipped with the pack, for the toy model.",
            inputs=[io.String.Input("text", multiline=True, default="a red circle moves right on a grey background",
                                    tooltip="Grammar: 'a|an <colour> <shape> <motion>' joined by 'and', then 'on a "
                                            "grey|black background' or 'on a tiled floor'.")],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, text) -> io.NodeOutput:
        with load_text_encoder(check_shipped()["text_encoder"]) as te:
            emb = te.encode([text]).float()
        return io.NodeOutput([[emb, {}]])
