"""UMT5-XXL text encoder (the one Wan2.1 conditions on), loaded from ComfyUI or Wan files.

Architecture (config inferred from the weights, so tiny random files load the same way):
  ids [B, L] -> embedding [B, L, dim]
  -> N blocks, each: x += Attn(RMSNorm(x)) with its OWN relative position bias (that is the "U" in
     UMT5; T5 v1.1 shares the bias of block 0), unscaled dot-product attention, padded keys masked;
     x += W_down(gelu_tanh(W_gate x) * W_up x)   (gated GELU)
  -> final RMSNorm -> padded positions set to zero.  Out: [B, L, dim].

Files, normalised to one internal naming (`UMT5Encoder.state_dict()` names):
  ComfyUI / HF names  encoder.block.{i}.layer.0.SelfAttention.q.weight, ..., shared.weight,
                      spiece_model (uint8 sentencepiece model), optional fp8 weights with a per-tensor
                      `<name>.scale_weight` (ComfyUI "scaled_fp8"; `weight_scale` spelling accepted too)
  Wan native          blocks.{i}.attn.q.weight, blocks.{i}.pos_embedding.embedding.weight, token_embedding,
                      ... (models_t5_umt5-xxl-enc-bf16.pth; no tokenizer inside)

Memory: the module is built on the meta device and each tensor is read from the file straight into
its final place in its file dtype (safetensors: header parsed here, every tensor read once into its
own buffer, no mmap; .pth: torch.load(mmap=True), tensors used in place). Peak RAM is about the size
of the tensors used (one copy), not the 23 GB an fp32 XXL would need. fp8 weights STAY fp8 in memory
and each Linear dequantises its weight (weight * scale) to the compute dtype when it runs, so an fp8
file costs ~6.5 GB resident instead of 11 GB.

Compute dtype (`dtype`): activations and the returned embeddings. Default float32 on CPU (weights are
up-cast one layer at a time), bfloat16 on GPUs (float16 where bf16 is unsupported, with T5's overflow
clamp). Weights keep their file dtype unless `weight_dtype` is given (then fp8 weights are dequantised
at load, tensor by tensor, into that dtype: more memory, no per-run dequantisation).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CheckpointError, SelfForcingError
from ..io import FP8_DTYPES, PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, check_weights_file, read_state_dict
from .tokenizer import DEFAULT_LENGTH, Tokenizer, TokenizerSource, load_tokenizer

log = logging.getLogger(__name__)



# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UMT5Config:
    """Defaults are UMT5-XXL (google/umt5-xxl, Wan2.1's text encoder, ~5.7B parameters)."""

    vocab_size: int = 256384
    dim: int = 4096
    ffn_dim: int = 10240
    num_heads: int = 64
    head_dim: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128  # not stored in the weights; 128 for every UMT5
    eps: float = 1e-6

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.head_dim

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Internal parameter name -> shape, for every tensor the encoder needs."""
        d, inner, f = self.dim, self.inner_dim, self.ffn_dim
        out: dict[str, tuple[int, ...]] = {"embed.weight": (self.vocab_size, d), "final_norm.weight": (d,)}
        for i in range(self.num_layers):
            b = f"blocks.{i}."
            out.update({
                b + "attn_norm.weight": (d,),
                b + "attn.q.weight": (inner, d),
                b + "attn.k.weight": (inner, d),
                b + "attn.v.weight": (inner, d),
                b + "attn.o.weight": (d, inner),
                b + "attn.rel_bias": (self.num_buckets, self.num_heads),
                b + "ffn_norm.weight": (d,),
                b + "ffn.gate.weight": (f, d),
                b + "ffn.up.weight": (f, d),
                b + "ffn.down.weight": (d, f),
            })
        return out

    def num_params(self) -> int:
        return sum(math.prod(s) for s in self.shapes().values())


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


def _dequant(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    w = weight.to(dtype)
    if scale is not None:
        w = w * scale.to(dtype)
    return w


class Linear(nn.Module):
    """y = x W^T, no bias. W in any storage dtype (fp8 with an optional per-tensor/per-row `scale`),
    cast to the input's dtype when it runs."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.register_buffer("scale", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, _dequant(self.weight, self.scale, x.dtype))


class TokenEmbedding(nn.Module):
    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, dim), requires_grad=False)
        self.register_buffer("scale", None)

    def forward(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        w = self.weight
        if w.dtype in FP8_DTYPES:  # gather the rows as bytes: indexing fp8 is not supported everywhere
            rows = w.view(torch.uint8)[ids].view(w.dtype).to(dtype)
        else:
            rows = F.embedding(ids, w).to(dtype)
        if self.scale is not None:
            s = self.scale.to(dtype)
            rows = rows * (s if s.ndim == 0 else s.reshape(-1)[ids].unsqueeze(-1))
        return rows


class RMSNorm(nn.Module):
    """T5 layer norm: no mean subtraction, no bias; statistics in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight.to(x.dtype)


def relative_position_buckets(length: int, num_buckets: int, max_distance: int, device=None) -> torch.Tensor:
    """Bidirectional T5 bucketing of (key position - query position) -> [length, length] int64.

    Half the buckets for keys before the query, half for keys after; in each half the first
    half of the buckets are exact distances, the rest log-spaced up to max_distance (further
    distances share the last bucket)."""
    pos = torch.arange(length, device=device)
    rel = pos[None, :] - pos[:, None]  # [q, k]
    half = num_buckets // 2
    exact = half // 2
    dist = rel.abs()
    log_steps = torch.log(dist.clamp(min=1).float() / exact) / math.log(max_distance / exact) * (half - exact)
    far = (exact + log_steps.to(torch.long)).clamp(max=half - 1)
    return (rel > 0).long() * half + torch.where(dist < exact, dist, far)


class Attention(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q = Linear(cfg.dim, cfg.inner_dim)
        self.k = Linear(cfg.dim, cfg.inner_dim)
        self.v = Linear(cfg.dim, cfg.inner_dim)
        self.o = Linear(cfg.inner_dim, cfg.dim)
        self.rel_bias = nn.Parameter(torch.empty(cfg.num_buckets, cfg.num_heads), requires_grad=False)

    def forward(self, x: torch.Tensor, buckets: torch.Tensor, pad_keys: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (lin(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2) for lin in (self.q, self.k, self.v))
        bias = self.rel_bias.to(x.dtype)[buckets].permute(2, 0, 1).unsqueeze(0)  # [1, H, n, n]
        bias = bias.masked_fill(pad_keys, torch.finfo(x.dtype).min)  # [B, H, n, n]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # T5: no 1/sqrt(d)
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


class GatedFFN(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.gate = Linear(cfg.dim, cfg.ffn_dim)
        self.up = Linear(cfg.dim, cfg.ffn_dim)
        self.down = Linear(cfg.ffn_dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.gate(x), approximate="tanh") * self.up(x))


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.float16:
        big = torch.finfo(torch.float16).max - 1000
        x = x.clamp(-big, big)
    return x


class Block(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.eps)
        self.ffn = GatedFFN(cfg)

    def forward(self, x: torch.Tensor, buckets: torch.Tensor, pad_keys: torch.Tensor) -> torch.Tensor:
        x = _clamp_fp16(x + self.attn(self.attn_norm(x), buckets, pad_keys))
        return _clamp_fp16(x + self.ffn(self.ffn_norm(x)))


class UMT5Encoder(nn.Module):
    """The encoder stack. Parameters are inference-only (requires_grad=False)."""

    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.cfg = cfg
        self.embed = TokenEmbedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.final_norm = RMSNorm(cfg.dim, cfg.eps)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ids [B, L] int64, mask [B, L] (True = real token) -> [B, L, dim] in `dtype`, padded rows zero."""
        mask = mask.to(device=ids.device, dtype=torch.bool)
        x = self.embed(ids, dtype)  # [B, L, dim]
        buckets = relative_position_buckets(ids.shape[1], self.cfg.num_buckets, self.cfg.max_distance, ids.device)
        pad_keys = ~mask[:, None, None, :]  # [B, 1, 1, L]
        for block in self.blocks:
            x = block(x, buckets, pad_keys)
        x = self.final_norm(x)
        return torch.where(mask[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))


# ----------------------------------------------------------------------------------------------
# Reading files lazily (names and shapes first, tensors one by one)
# ----------------------------------------------------------------------------------------------

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _ST_DTYPES[_name] = getattr(torch, _attr)


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype


class _SafetensorsReader:
    """Header-first safetensors reader: names/shapes without touching data; each tensor read (once)
    with readinto into a fresh buffer, so resident memory is exactly what the caller keeps."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        self._f = open(path, "rb")
        try:
            head = self._f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n <= 0 or n > min(size - 8, 100 << 20):
                raise CheckpointError(f"{path}: not a safetensors file (bad header length); the file may be truncated")
            try:
                header = json.loads(self._f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{path}: not a safetensors file (unreadable header: {e})") from e
            self._base = 8 + n
            header.pop("__metadata__", None)
            self.entries: dict[str, TensorInfo] = {}
            self._offsets: dict[str, tuple[int, int]] = {}
            for key, e in header.items():
                if e.get("dtype") not in _ST_DTYPES:
                    raise CheckpointError(f"{path}: tensor {key!r} has dtype {e.get('dtype')!r}, which this torch cannot hold")
                begin, end = e["data_offsets"]
                if self._base + end > size:
                    raise CheckpointError(
                        f"{path}: tensor {key!r} lies past the end of the file ({size} bytes); the file is truncated - download it again"
                    )
                self.entries[key] = TensorInfo(tuple(e["shape"]), _ST_DTYPES[e["dtype"]])
                self._offsets[key] = (begin, end)
        except BaseException:
            self._f.close()
            raise

    def read(self, key: str) -> torch.Tensor:
        info, (begin, end) = self.entries[key], self._offsets[key]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        self._f.seek(self._base + begin)
        view, got = memoryview(buf.numpy()), 0
        while got < len(view):
            n = self._f.readinto(view[got:])
            if not n:
                raise CheckpointError(f"{self.path}: unexpected end of file reading {key!r}; the file is truncated")
            got += n
        return buf.view(info.dtype).reshape(info.shape)

    def close(self) -> None:
        self._f.close()


class _DictReader:
    """A torch pickle (mmap'd when it is a zip file); nested dicts flattened with dots."""

    def __init__(self, path: Path):
        self.path = path
        self._tensors: dict[str, torch.Tensor] = {}

        def walk(d: dict, prefix: str) -> None:
            for k, v in d.items():
                if isinstance(v, torch.Tensor):
                    self._tensors[prefix + str(k)] = v
                elif isinstance(v, dict):
                    walk(v, f"{prefix}{k}.")

        walk(read_state_dict(path), "")
        self.entries = {k: TensorInfo(tuple(t.shape), t.dtype) for k, t in self._tensors.items()}

    def read(self, key: str) -> torch.Tensor:
        return self._tensors.pop(key)  # the caller owns it now; memory goes when it drops it

    def close(self) -> None:
        self._tensors.clear()


@contextlib.contextmanager
def _open_weights(path: str | os.PathLike) -> Iterator[_SafetensorsReader | _DictReader]:
    path = check_weights_file(path, "text encoder's weights (e.g. umt5_xxl_fp16.safetensors)")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        reader = _SafetensorsReader(path)
    elif suffix in PICKLE_SUFFIXES:
        reader = _DictReader(path)
    else:
        raise CheckpointError(
            f"{path}: unknown weights file type {suffix!r}; expected one of {', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)}"
        )
    try:
        yield reader
    finally:
        reader.close()


# ----------------------------------------------------------------------------------------------
# Layouts: file names -> internal names
# ----------------------------------------------------------------------------------------------

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

EXPECTED_HINT = (
    "expected a UMT5-XXL text encoder: ComfyUI's umt5_xxl_fp16.safetensors / umt5_xxl_fp8_e4m3fn_scaled.safetensors "
    "(keys like 'encoder.block.0.layer.0.SelfAttention.q.weight') or Wan's models_t5_umt5-xxl-enc-bf16.pth "
    "(keys like 'blocks.0.attn.q.weight')"
)


def _find_prefix(keys: Sequence[str], anchor: str) -> str | None:
    found = [k[: -len(anchor)] for k in keys if k.endswith(anchor) and (k == anchor or k[-len(anchor) - 1] == ".")]
    return min(found, key=len) if found else None


def _map_name(name: str, block_re: str, block_table: dict, top_table: dict) -> str | None:
    if name in top_table:
        return top_table[name]
    m = re.match(block_re, name)
    if m and name[m.end():] in block_table:
        return f"blocks.{int(m.group(1))}.{block_table[name[m.end():]]}"
    return None


def _describe_foreign(keys: Sequence[str]) -> str:
    """A guess at what a non-UMT5 file is, for the error message."""
    ks = set(keys)

    def has(*subs: str) -> bool:
        return any(any(s in k for s in subs) for k in ks)

    if has("patch_embedding", "self_attn.q.weight", "cross_attn.k.weight", "time_embedding"):
        return "a Wan diffusion model (DiT) - load it as the model, not as the text encoder"
    if has("decoder.conv1", "encoder.conv1", "decoder.head", ".residual.", "decoder.upsamples", "decoder.up_blocks"):
        return "a VAE - load it as the VAE, not as the text encoder"
    if has("text_model.encoder.layers", "transformer.resblocks"):
        return "a CLIP text encoder (not UMT5)"
    if has("DenseReluDense.wi.weight"):
        return "an original T5 v1.0 encoder (not UMT5)"
    if has("model.layers.0.", "self_attn.q_proj"):
        return "a decoder-only language model (not UMT5)"
    return "no UMT5 encoder"


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
        total = sum(math.prod(shapes[n]) * _itemsize(self.weight_dtypes[n]) for n in self.names)
        return total + 4 * len(self.scales)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _analyse(path: Path, entries: dict[str, TensorInfo]) -> TextEncoderFileInfo:
    keys = list(entries)
    layout = prefix = None
    for name, (anchor, *_rest) in LAYOUTS.items():
        prefix = _find_prefix(keys, anchor)
        if prefix is not None:
            layout = name
            break
    if layout is None:
        sample = ", ".join(repr(k) for k in keys[:4]) + (", ..." if len(keys) > 4 else "")
        raise CheckpointError(
            f"{path}: not a UMT5 text encoder - it looks like {_describe_foreign(keys)} "
            f"({len(keys)} tensors, e.g. {sample or 'none'}); {EXPECTED_HINT}"
        )
    if layout == "wan" and _find_prefix(keys, "token_embedding.weight") is None:
        # blocks.N.attn.q.weight alone is too generic to be sure
        raise CheckpointError(
            f"{path}: has 'blocks.N.attn.*' tensors but no 'token_embedding.weight' - it looks like "
            f"{_describe_foreign(keys)}; {EXPECTED_HINT}"
        )
    _, block_re, block_table, top_table = LAYOUTS[layout]
    names: dict[str, str] = {}
    scale_keys: dict[str, str] = {}  # file key of a weight -> file key of its scale
    ignored: list[str] = []
    for key in keys:
        if not key.startswith(prefix):
            ignored.append(key)
            continue
        name = key[len(prefix):]
        if name in _IGNORED_KEYS or name.endswith(_IGNORED_SUFFIXES) or name.startswith(_IGNORED_PREFIXES):
            ignored.append(key)
            continue
        scale_of = next((name[: -len(s)] + ".weight" for s in _SCALE_SUFFIXES if name.endswith(s)), None)
        if scale_of is not None:
            scale_keys[prefix + scale_of] = key
            continue
        internal = _map_name(name, block_re, block_table, top_table)
        if internal is None:
            ignored.append(key)
        elif internal == "embed.weight" and internal in names:
            # HF files may hold both shared.weight and encoder.embed_tokens.weight (tied); use one
            if name == "encoder.embed_tokens.weight":
                ignored.append(names[internal])
                names[internal] = key
            else:
                ignored.append(key)
        else:
            names[internal] = key
    if "blocks.0.attn.rel_bias" in names and "blocks.1.attn.q.weight" in names and "blocks.1.attn.rel_bias" not in names:
        raise CheckpointError(
            f"{path}: a T5 encoder whose position bias lives only in block 0 (T5 v1.1, e.g. Flux/SD3's "
            "t5xxl files), not UMT5 with one per block; Wan2.1 needs umt5_xxl (e.g. umt5_xxl_fp16.safetensors)"
        )
    if prefix + "pos_embedding.embedding.weight" in entries:
        raise CheckpointError(f"{path}: a T5 with one shared position bias, not UMT5; {EXPECTED_HINT}")

    def shape(internal: str) -> tuple[int, ...]:
        if internal not in names:
            raise CheckpointError(f"{path}: UMT5 file ({layout} names) without its {internal!r} tensor; the file is incomplete")
        return entries[names[internal]].shape

    vocab, dim = shape("embed.weight")
    buckets, heads = shape("blocks.0.attn.rel_bias")
    inner = shape("blocks.0.attn.q.weight")[0]
    layers = 1 + max(int(n.split(".")[1]) for n in names if n.startswith("blocks."))
    if inner % heads:
        raise CheckpointError(f"{path}: attention width {inner} is not a multiple of the {heads} heads of the position bias")
    cfg = UMT5Config(
        vocab_size=vocab, dim=dim, ffn_dim=shape("blocks.0.ffn.gate.weight")[0], num_heads=heads,
        head_dim=inner // heads, num_layers=layers, num_buckets=buckets,
    )
    expected = cfg.shapes()
    missing = [n for n in expected if n not in names]
    if missing:
        raise CheckpointError(
            f"{path}: UMT5 file ({layout} names) is missing {len(missing)} tensors, e.g. {missing[:3]}; "
            "the file is incomplete or mixes models"
        )
    for n, shp in expected.items():
        if tuple(entries[names[n]].shape) != shp:
            raise CheckpointError(f"{path}: tensor {names[n]!r} has shape {tuple(entries[names[n]].shape)}, expected {shp} "
                                  f"for a UMT5 with {cfg}")
    scales = {n: scale_keys.pop(k) for n, k in names.items() if k in scale_keys}
    stray = [k for w, k in scale_keys.items() if w not in entries]
    if stray:
        raise CheckpointError(f"{path}: scale tensors without a weight: {stray[:3]}")
    ignored += list(scale_keys.values())  # scales of tensors the encoder does not use
    for n, k in scales.items():
        numel, rows = math.prod(entries[k].shape), expected[n][0]
        if numel not in (1, rows):
            raise CheckpointError(f"{path}: scale {k!r} has shape {entries[k].shape}; expected one value or one per row ({rows})")
    return TextEncoderFileInfo(
        path=path, layout=layout, config=cfg, names=names, scales=scales,
        weight_dtypes={n: entries[k].dtype for n, k in names.items()},
        has_tokenizer=(prefix + "spiece_model") in entries or "spiece_model" in entries,
        ignored=ignored,
    )


def inspect_text_encoder(path: str | os.PathLike) -> TextEncoderFileInfo:
    """Layout, config and tensor names of a text-encoder file, reading only its header (safetensors)
    or its lazily mapped pickle. Raises CheckpointError saying what the file is when it is not UMT5."""
    with _open_weights(path) as reader:
        return _analyse(Path(path), reader.entries)


def read_embedded_tokenizer(path: str | os.PathLike) -> bytes | None:
    """The sentencepiece model stored in the file as the uint8 tensor `spiece_model`, or None."""
    with _open_weights(path) as reader:
        key = next((k for k in reader.entries if k == "spiece_model" or k.endswith(".spiece_model")), None)
        if key is None:
            return None
        return reader.read(key).contiguous().numpy().tobytes()


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def _default_dtype(device: torch.device, info: TextEncoderFileInfo) -> torch.dtype:
    if device.type == "cpu":
        return torch.float32
    if all(dt == torch.float32 for dt in info.weight_dtypes.values()):
        return torch.float32
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def _build_on_meta(cfg: UMT5Config) -> UMT5Encoder:
    with torch.device("meta"):
        return UMT5Encoder(cfg)


def _fill(model: UMT5Encoder, reader, info: TextEncoderFileInfo, device: torch.device,
          weight_dtype: torch.dtype | None) -> None:
    """Read each tensor once and assign it in place of the meta parameter (no init, no copy when the
    dtype and device already match). With weight_dtype, fp8 weights are dequantised one at a time."""
    for internal, key in info.names.items():
        t = reader.read(key)
        scale = None
        if internal in info.scales:
            scale = reader.read(info.scales[internal]).to(torch.float32)
            scale = scale.reshape(()) if scale.numel() == 1 else scale.reshape(-1, 1)
        if weight_dtype is not None and t.is_floating_point():
            if t.dtype in FP8_DTYPES:  # dequantise now (the file's fp8 copy is dropped right after)
                t, scale = _dequant(t, scale, torch.float32).to(weight_dtype), None
            else:
                t = t.to(weight_dtype)
        owner = model.get_submodule(internal.rpartition(".")[0])
        setattr(owner, internal.rpartition(".")[2], nn.Parameter(t.to(device), requires_grad=False))
        if scale is not None:
            owner.scale = scale.to(device)
        del t
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:  # _analyse checked the names, so this is a bug, not a bad file
        raise RuntimeError(f"UMT5 parameters left unloaded: {left[:3]}")


class TextEncoder:
    """UMT5 encoder + tokenizer. `encode(prompts)` -> [B, text_len, dim] (padded rows zero).

    Use as a context manager (or call `release()`) to free the weights when done."""

    def __init__(self, model: UMT5Encoder, tokenizer: Tokenizer, device: torch.device, dtype: torch.dtype,
                 text_len: int = DEFAULT_LENGTH, info: TextEncoderFileInfo | None = None, batch_size: int = 8):
        self.model: UMT5Encoder | None = model
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.text_len = text_len
        self.info = info
        self.batch_size = batch_size
        self.config = model.cfg

    def __repr__(self) -> str:
        state = "released" if self.model is None else f"{self.device}, {self.dtype}"
        return f"TextEncoder({self.config.num_layers} layers, dim {self.config.dim}, {state})"

    def __enter__(self) -> "TextEncoder":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    @property
    def dim(self) -> int:
        return self.config.dim

    def tokenize(self, prompts: Sequence[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ids [B, text_len] int64, mask [B, text_len] bool."""
        return self.tokenizer(prompts, self.text_len)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str] | str) -> torch.Tensor:
        """B prompts -> embeddings [B, text_len, dim] in self.dtype on self.device; padded rows are zero."""
        ids, mask = self.tokenize(prompts)
        return self.encode_ids(ids, mask)

    @torch.no_grad()
    def encode_ids(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids [B, L] int64, mask [B, L] (nonzero = real token; default: ids != pad) -> [B, L, dim]."""
        if self.model is None:
            raise SelfForcingError("this text encoder was released; load it again to encode more prompts")
        if ids.ndim != 2:
            raise SelfForcingError(f"token ids must be [B, L], got shape {tuple(ids.shape)}")
        if mask is None:
            mask = ids != self.tokenizer.pad_id
        if mask.shape != ids.shape:
            raise SelfForcingError(f"mask shape {tuple(mask.shape)} differs from ids shape {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise SelfForcingError(f"token ids must lie in [0, {self.config.vocab_size}), got {int(ids.min())}..{int(ids.max())}")
        ids, mask = ids.to(self.device, torch.long), mask.to(self.device).bool()
        out = torch.zeros(*ids.shape, self.dim, dtype=self.dtype, device=self.device)
        for i in range(0, ids.shape[0], self.batch_size):
            m = mask[i:i + self.batch_size]
            # Positions after the last real token of this micro-batch are padding in every row: they
            # are masked as keys and zeroed as outputs, so running without them gives the same
            # result (relative position bias depends on distances only) - and 512-token prompts of
            # ~100 real tokens cost ~1/5 of the compute.
            used = m.any(0).nonzero()
            if used.numel():
                n = int(used.max()) + 1
                out[i:i + self.batch_size, :n] = self.model(ids[i:i + self.batch_size, :n], m[:, :n], self.dtype)
        return out

    def to(self, device: str | torch.device) -> "TextEncoder":
        """Move the weights (e.g. load on CPU, encode on GPU)."""
        if self.model is None:
            raise SelfForcingError("this text encoder was released")
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def release(self) -> None:
        """Drop the weights (RAM / VRAM freed once no other reference holds them)."""
        if self.model is not None:
            was_cuda = self.device.type == "cuda"
            self.model = None
            gc.collect()
            if was_cuda and torch.cuda.is_available():
                torch.cuda.empty_cache()


def load_text_encoder(
    path: str | os.PathLike,
    tokenizer: TokenizerSource | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    *,
    weight_dtype: torch.dtype | None = None,
    text_len: int = DEFAULT_LENGTH,
) -> TextEncoder:
    """Load a UMT5 encoder from ComfyUI/HF-named (fp16, bf16, fp32 or fp8 scaled) or Wan-native files.

    path:      .safetensors / .pth text-encoder file.
    tokenizer: None = the file's `spiece_model`; else a tokenizer folder, .model, tokenizer.json,
               sentencepiece bytes or a Tokenizer.
    device:    where the weights live and encoding runs.
    dtype:     compute / output dtype (default float32 on CPU, bfloat16 on GPU).
    weight_dtype: convert stored weights to this dtype while loading, one tensor at a time (default: keep
               the file's). For fp8 files this dequantises at load (weight * scale): faster on CPU,
               where fp8 -> float casts are slow, at the price of 2 bytes per weight instead of 1.
    The file is checked (layout, tokenizer) from its header before any weight is read.
    """
    path = Path(path)
    device = torch.device(device)
    with _open_weights(path) as reader:
        info = _analyse(path, reader.entries)
        if info.ignored:
            log.debug("%s: %d tensors not used by the encoder, e.g. %s", path, len(info.ignored), info.ignored[:5])
        if tokenizer is None:
            if not info.has_tokenizer:
                raise CheckpointError(
                    f"{path}: holds no tokenizer (no 'spiece_model' tensor - Wan's models_t5_umt5-xxl-enc-bf16.pth "
                    "never has one); pass the tokenizer: the google/umt5-xxl tokenizer folder, its tokenizer.json "
                    "or spiece.model, or a ComfyUI umt5_xxl *.safetensors file"
                )
            tok = load_tokenizer(reader.read(next(k for k in reader.entries if k.endswith("spiece_model"))))
            tok.source = f"{path}:spiece_model"
        else:
            tok = load_tokenizer(tokenizer)
        if tok.vocab_size > info.config.vocab_size:
            raise CheckpointError(
                f"tokenizer {tok.source} has {tok.vocab_size} pieces but {path} embeds only {info.config.vocab_size} "
                "tokens: tokenizer and encoder do not belong together"
            )
        model = _build_on_meta(info.config)
        _fill(model, reader, info, device, weight_dtype)
    model.eval()
    return TextEncoder(model, tok, device, dtype or _default_dtype(device, info), text_len=text_len, info=info)


def encode_prompts(
    path: str | os.PathLike,
    prompts: Sequence[str],
    tokenizer: TokenizerSource | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    **kwargs,
) -> torch.Tensor:
    """Load, encode, free: [B, text_len, dim]. The one-shot path for CPU encoding before the DiT loads."""
    with load_text_encoder(path, tokenizer, device, dtype, **kwargs) as te:
        return te.encode(prompts)
