"""Load Self-Forcing Toy Text Encoder: the small UMT5 shipped with the pack (the toy world's captions) as a CLIP.

ComfyUI's stock CLIPLoader builds UMT5-XXL only, so this node loads the toy encoder itself and hands out an object
with the two methods every text node calls on a CLIP (`tokenize`, `encode_from_tokens_scheduled`): the stock
CLIP Text Encode, the Prompt Timeline and the sampler's live prompt box all work with it unchanged.
"""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..sf_core.text import load_text_encoder
from ..sf_core.toy.models import check_shipped
from ..sf_core.toy.world import GRAMMAR, check_caption
from .common import CATEGORY


class ToyClip:
    """The toy text encoder behind the CLIP interface. Text outside the toy world's grammar is refused when it is
    tokenized (the toy models know nothing else)."""

    def __init__(self, path):
        self.path = path
        self._encoder = None

    def tokenize(self, text: str, **_) -> dict:
        check_caption(text, "the toy model's text encoder and DiT")
        return {"toy_caption": text}

    def encode_from_tokens(self, tokens: dict, return_pooled=False, return_dict=False):
        if self._encoder is None:
            self._encoder = load_text_encoder(self.path)
        with torch.no_grad():
            cond = self._encoder.encode([tokens["toy_caption"]]).float()
        if return_dict:
            return {"cond": cond, "pooled_output": None}
        return (cond, None) if return_pooled else cond

    def encode_from_tokens_scheduled(self, tokens: dict, unprojected=False, add_dict: dict | None = None,
                                     show_pbar=True) -> list:
        return [[self.encode_from_tokens(tokens), {"pooled_output": None, **(add_dict or {})}]]

    def clone(self) -> "ToyClip":
        return ToyClip(self.path)


class LoadToyTextEncoder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SelfForcingLoadToyTextEncoder",
            display_name="Load Self-Forcing Toy Text Encoder",
            category=CATEGORY,
            description="The small text encoder of the toy world shipped with the pack, as a CLIP for CLIP Text "
                        "Encode, the Prompt Timeline and the sampler's live prompt box (with the loader's 'toy world "
                        "(embedded)' model).",
            inputs=[],
            outputs=[io.Clip.Output(tooltip=f"Reads captions of the toy world only: {GRAMMAR}.")],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(ToyClip(check_shipped()["text_encoder"]))
