"""The toy text encoder: a sentencepiece tokenizer trained on the caption grammar and a small frozen random
UMT5 (`sf_core.text.UMT5Encoder`), stored like ComfyUI's text-encoder files (HF names, `spiece_model` embedded),
so `sf_core.text.load_text_encoder` reads it like the real one.
"""

from __future__ import annotations

import random

import torch

from ..text import load_tokenizer
from ..text.layouts import LAYOUTS
from ..text.model import UMT5Config
from ..text.tokenizer import train_sentencepiece
from .world import BACKGROUND_NAMES, COLOUR_NAMES, MOTIONS, PANS, SHAPES, ObjectSpec, Scene, caption, sample_scene

TEXT_DIM = 64


def text_config(vocab_size: int) -> UMT5Config:
    return UMT5Config(vocab_size=vocab_size, dim=TEXT_DIM, ffn_dim=128, num_heads=4, head_dim=16, num_layers=2)


def grammar_sentences(n_random: int = 2000, seed: int = 0) -> list[str]:
    """Every single-object caption on every background and pan, plus random multi-object scenes."""
    out = [caption(Scene((ObjectSpec(c, s, m),), bg, pan if bg == "tiled" else None))
           for c in COLOUR_NAMES for s in SHAPES for m in MOTIONS for bg in BACKGROUND_NAMES for pan in PANS]
    rng = random.Random(seed)
    out += [caption(sample_scene(rng.randrange(2**31), train=False)) for _ in range(n_random)]
    return out


def train_tokenizer(seed: int = 0, vocab_size: int = 48) -> bytes:
    """A word-level sentencepiece model of the grammar with UMT5's special ids (pad 0, eos 1, unk 2, no bos)."""
    return train_sentencepiece(grammar_sentences(seed=seed), vocab_size, model_type="word")


def random_text_encoder(spiece: bytes, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random UMT5 sized for the tokenizer, in ComfyUI's HF layout, with `spiece_model` embedded."""
    vocab = load_tokenizer(spiece).vocab_size
    cfg = text_config(vocab)
    g = torch.Generator().manual_seed(seed)
    _, _, block_table, top_table = LAYOUTS["comfy_hf"]
    block_inv = {v: k for k, v in block_table.items()}
    out: dict[str, torch.Tensor] = {}
    for name, shape in cfg.shapes().items():
        if name.endswith("norm.weight"):
            t = torch.ones(shape)
        elif name == "embed.weight":
            t = torch.randn(shape, generator=g)
        elif name.endswith("rel_bias"):
            t = 0.5 * torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) * shape[1] ** -0.5
        if name.startswith("blocks."):
            _, i, rest = name.split(".", 2)
            out[f"encoder.block.{i}.{block_inv[rest]}"] = t
        else:
            out[{"embed.weight": "encoder.embed_tokens.weight", "final_norm.weight": "encoder.final_layer_norm.weight"}[name]] = t
    out["spiece_model"] = torch.frombuffer(bytearray(spiece), dtype=torch.uint8).clone()
    return out
