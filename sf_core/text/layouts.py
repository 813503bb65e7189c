"""UMT5 file layouts: which file names map onto the encoder's internal names, and what a file holds.

  ComfyUI / HF names  encoder.block.{i}.layer.0.SelfAttention.q.weight, ..., shared.weight,
                      spiece_model (uint8 sentencepiece model), optional fp8 weights with a per-tensor
                      `<name>.scale_weight` (ComfyUI "scaled_fp8"; `weight_scale` spelling accepted too)
  Wan native          blocks.{i}.attn.q.weight, blocks.{i}.pos_embedding.embedding.weight, token_embedding,
                      ... (models_t5_umt5-xxl-enc-bf16.pth; no tokenizer inside)

`inspect_text_encoder` reads only names and shapes (a safetensors header or a memory-mapped pickle) and
says what a foreign file is before any tensor is read.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..errors import CheckpointError
from ..weights import FP8_DTYPES, TensorInfo, describe, open_weights
from .model import UMT5Config

_HF_BLOCK = {
    "layer.0.layer_norm.weight": "attn_norm.weight",
    "layer.0.SelfAttention.q.weight": "attn.q.weight",
    "layer.0.SelfAttention.k.weight": "attn.k.weight",
    "layer.0.SelfAttention.v.weight": "attn.v.weight",
    "layer.0.SelfAttention.o.weight": "attn.o.weight",
    "layer.0.SelfAttention.relative_attention_bias.weight": "attn.rel_bias",
    "layer.1.layer_norm.weight": "ffn_norm.weight",
    "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.weight",
    "layer.1.DenseReluDense.wi_1.weight": "ffn.up.weight",
    "layer.1.DenseReluDense.wo.weight": "ffn.down.weight",
}
_HF_TOP = {
    "encoder.embed_tokens.weight": "embed.weight",
    "shared.weight": "embed.weight",
    "encoder.final_layer_norm.weight": "final_norm.weight",
}
_WAN_BLOCK = {
    "norm1.weight": "attn_norm.weight",
    "attn.q.weight": "attn.q.weight",
    "attn.k.weight": "attn.k.weight",
    "attn.v.weight": "attn.v.weight",
    "attn.o.weight": "attn.o.weight",
    "pos_embedding.embedding.weight": "attn.rel_bias",
    "norm2.weight": "ffn_norm.weight",
    "ffn.gate.0.weight": "ffn.gate.weight",
    "ffn.fc1.weight": "ffn.up.weight",
    "ffn.fc2.weight": "ffn.down.weight",
}
_WAN_TOP = {"token_embedding.weight": "embed.weight", "norm.weight": "final_norm.weight"}

LAYOUTS = {
    # layout: (anchor key that identifies it, block prefix regex, block table, top-level table)
    "comfy_hf": ("encoder.block.0.layer.0.SelfAttention.q.weight", r"encoder\.block\.(\d+)\.", _HF_BLOCK, _HF_TOP),
    "wan": ("blocks.0.attn.q.weight", r"blocks\.(\d+)\.", _WAN_BLOCK, _WAN_TOP),
}
_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
_IGNORED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")
_IGNORED_KEYS = ("spiece_model", "scaled_fp8")
_IGNORED_PREFIXES = ("decoder.", "lm_head.")

EXPECTED = (
    "a UMT5-XXL text encoder: ComfyUI's umt5_xxl_fp16.safetensors / umt5_xxl_fp8_e4m3fn_scaled.safetensors "
    "(keys like 'encoder.block.0.layer.0.SelfAttention.q.weight') or Wan's models_t5_umt5-xxl-enc-bf16.pth "
    "(keys like 'blocks.0.attn.q.weight')"
)


def _foreign(path, keys: Sequence[str], why: str = "") -> CheckpointError:
    return CheckpointError(f"{path}: not a UMT5 text encoder{why}: found {describe(keys)}; expected {EXPECTED}")


def _find_prefix(keys: Sequence[str], anchor: str) -> str | None:
    found = [k[: -len(anchor)] for k in keys if k.endswith(anchor) and (k == anchor or k[-len(anchor) - 1] == ".")]
    return min(found, key=len) if found else None


@dataclass
class TextEncoderFileInfo:
    """What `inspect_text_encoder` found, before any tensor data is read."""

    path: Path
    layout: str  # "comfy_hf" or "wan"
    config: UMT5Config
    names: dict[str, str]  # internal name -> key in the file
    scales: dict[str, str]  # internal name of a weight -> key of its dequantisation scale
    weight_dtypes: dict[str, torch.dtype]
    has_tokenizer: bool
    ignored: list[str] = field(default_factory=list)

    @property
    def quantized(self) -> bool:
        return any(dt in FP8_DTYPES for dt in self.weight_dtypes.values())

    def nbytes(self) -> int:
        """Bytes of the tensors the encoder uses (weights + scales), as stored in the file."""
        shapes = self.config.shapes()
        total = sum(math.prod(shapes[n]) * torch.empty((), dtype=self.weight_dtypes[n]).element_size()
                    for n in self.names)
        return total + 4 * len(self.scales)


def _detect_layout(path: Path, keys: list[str]) -> tuple[str, str]:
    """(layout, prefix of its names) or a CheckpointError saying what the file is."""
    for layout, (anchor, *_rest) in LAYOUTS.items():
        prefix = _find_prefix(keys, anchor)
        if prefix is not None:
            if layout == "wan" and _find_prefix(keys, "token_embedding.weight") is None:
                raise _foreign(path, keys, " ('blocks.N.attn.*' tensors but no 'token_embedding.weight')")
            return layout, prefix
    raise _foreign(path, keys)


def _map_names(keys: list[str], layout: str, prefix: str) -> tuple[dict, dict, list]:
    """File keys -> (internal name -> key, weight key -> its scale key, ignored keys)."""
    _, block_re, block_table, top_table = LAYOUTS[layout]
    names: dict[str, str] = {}
    scale_keys: dict[str, str] = {}
    ignored: list[str] = []
    for key in keys:
        name = key[len(prefix):] if key.startswith(prefix) else None
        if name is None or name in _IGNORED_KEYS or name.endswith(_IGNORED_SUFFIXES) or name.startswith(_IGNORED_PREFIXES):
            ignored.append(key)
            continue
        scale_of = next((name[: -len(s)] + ".weight" for s in _SCALE_SUFFIXES if name.endswith(s)), None)
        if scale_of is not None:
            scale_keys[prefix + scale_of] = key
            continue
        m = re.match(block_re, name)
        internal = top_table.get(name) or (
            f"blocks.{int(m.group(1))}.{block_table[name[m.end():]]}" if m and name[m.end():] in block_table else None)
        if internal is None:
            ignored.append(key)
        elif internal in names:  # HF files hold the embedding twice (shared + encoder.embed_tokens): use one
            keep = key if name == "encoder.embed_tokens.weight" else names[internal]
            ignored.append(names[internal] if keep == key else key)
            names[internal] = keep
        else:
            names[internal] = key
    return names, scale_keys, ignored


def _infer_config(path: Path, layout: str, names: dict, entries: Mapping[str, TensorInfo]) -> UMT5Config:
    if "blocks.1.attn.q.weight" in names and "blocks.0.attn.rel_bias" in names and "blocks.1.attn.rel_bias" not in names:
        raise CheckpointError(
            f"{path}: a T5 encoder whose position bias lives only in block 0 (T5 v1.1, e.g. Flux/SD3's "
            "t5xxl files), not UMT5 with one per block; Wan2.1 needs umt5_xxl (e.g. umt5_xxl_fp16.safetensors)"
        )

    def shape(internal: str) -> tuple[int, ...]:
        if internal not in names:
            raise CheckpointError(f"{path}: UMT5 file ({layout} names) without its {internal!r} tensor; the file is incomplete")
        return entries[names[internal]].shape

    vocab, dim = shape("embed.weight")
    buckets, heads = shape("blocks.0.attn.rel_bias")
    inner = shape("blocks.0.attn.q.weight")[0]
    if inner % heads:
        raise CheckpointError(f"{path}: attention width {inner} is not a multiple of the {heads} heads of the position bias")
    layers = 1 + max(int(n.split(".")[1]) for n in names if n.startswith("blocks."))
    return UMT5Config(vocab_size=vocab, dim=dim, ffn_dim=shape("blocks.0.ffn.gate.weight")[0], num_heads=heads,
                      head_dim=inner // heads, num_layers=layers, num_buckets=buckets)


def analyse(path: Path, entries: Mapping[str, TensorInfo]) -> TextEncoderFileInfo:
    """Names and shapes of a file -> its layout, config and name mapping, checked strictly."""
    keys = list(entries)
    layout, prefix = _detect_layout(path, keys)
    if prefix + "pos_embedding.embedding.weight" in entries:
        raise _foreign(path, keys, " (a T5 with one shared position bias)")
    names, scale_keys, ignored = _map_names(keys, layout, prefix)
    cfg = _infer_config(path, layout, names, entries)
    expected = cfg.shapes()
    missing = [n for n in expected if n not in names]
    if missing:
        raise CheckpointError(f"{path}: UMT5 file ({layout} names) is missing {len(missing)} tensors, e.g. "
                              f"{missing[:3]}; the file is incomplete or mixes models")
    for n, shp in expected.items():
        if tuple(entries[names[n]].shape) != shp:
            raise CheckpointError(f"{path}: tensor {names[n]!r} has shape {tuple(entries[names[n]].shape)}, expected "
                                  f"{shp} for a UMT5 with {cfg}")
    scales = {n: scale_keys.pop(k) for n, k in names.items() if k in scale_keys}
    stray = [k for w, k in scale_keys.items() if w not in entries]
    if stray:
        raise CheckpointError(f"{path}: scale tensors without a weight: {stray[:3]}")
    for n, k in scales.items():
        if math.prod(entries[k].shape) not in (1, expected[n][0]):
            raise CheckpointError(f"{path}: scale {k!r} has shape {entries[k].shape}; expected one value or one per "
                                  f"row ({expected[n][0]})")
    return TextEncoderFileInfo(
        path=path, layout=layout, config=cfg, names=names, scales=scales,
        weight_dtypes={n: entries[k].dtype for n, k in names.items()},
        has_tokenizer=(prefix + "spiece_model") in entries or "spiece_model" in entries,
        ignored=ignored + list(scale_keys.values()),  # with the scales of tensors the encoder does not use
    )


def inspect_text_encoder(path: str | os.PathLike) -> TextEncoderFileInfo:
    """Layout, config and tensor names of a text-encoder file, reading only its header (safetensors)
    or its lazily mapped pickle. Raises CheckpointError saying what the file is when it is not UMT5."""
    with open_weights(path, WHAT) as reader:
        return analyse(Path(path), reader.entries)


def read_embedded_tokenizer(path: str | os.PathLike) -> bytes | None:
    """The sentencepiece model stored in the file as the uint8 tensor `spiece_model`, or None."""
    with open_weights(path, WHAT) as reader:
        key = next((k for k in reader.entries if k == "spiece_model" or k.endswith(".spiece_model")), None)
        return None if key is None else reader.read(key).contiguous().numpy().tobytes()


WHAT = "text encoder's weights (e.g. umt5_xxl_fp16.safetensors)"

