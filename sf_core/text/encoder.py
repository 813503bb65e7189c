"""The text encoder as the engine uses it: load a UMT5 file (any layout), tokenize, encode, free.

    with load_text_encoder("umt5_xxl_fp8_e4m3fn_scaled.safetensors") as te:   # freed on exit
        context = te.encode(["a red fox running through snow"])              # [1, 512, 4096]

Memory: the module is built on the meta device and each tensor is read from the file straight into
its final place in its file dtype (safetensors: header parsed, every tensor read once into its own
buffer, no mmap; .pth: torch.load(mmap=True), tensors used in place). Peak RAM is about the size of
the tensors used (one copy), not the 23 GB an fp32 XXL would need. fp8 weights STAY fp8 in memory
and each Linear dequantises its weight (weight * scale) to the compute dtype when it runs, so an fp8
file costs ~6.5 GB resident instead of 11 GB.

Compute dtype (`dtype`): activations and the returned embeddings. Default float32 on CPU (weights are
up-cast one layer at a time), bfloat16 on GPUs (float16 where bf16 is unsupported, with T5's overflow
clamp). Weights keep their file dtype unless `weight_dtype` is given (then fp8 weights are dequantised
at load, tensor by tensor, into that dtype: more memory, no per-run dequantisation).
"""

from __future__ import annotations

import gc
import logging
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from ..errors import CheckpointError, SelfForcingError
from ..weights import FP8_DTYPES, SAFETENSORS_SUFFIXES, open_weights
from .layouts import WHAT, TextEncoderFileInfo, analyse, read_embedded_tokenizer
from .model import UMT5Encoder, dequantize
from .tokenizer import DEFAULT_LENGTH, Tokenizer, TokenizerSource, tokenizer_from

log = logging.getLogger(__name__)


def load_tokenizer(source: TokenizerSource) -> Tokenizer:
    """A Tokenizer from a model proto (bytes or uint8 tensor), a .model / tokenizer.json file, a tokenizer
    folder, or a .safetensors text-encoder file holding `spiece_model`. Raises CheckpointError saying what
    was found."""
    if isinstance(source, (str, os.PathLike)) and Path(source).is_file() and Path(source).suffix.lower() in SAFETENSORS_SUFFIXES:
        data = read_embedded_tokenizer(source)
        if data is None:
            raise CheckpointError(f"{source}: holds no 'spiece_model' tensor, so it carries no tokenizer")
        tok = tokenizer_from(data)
        tok.source = f"{source}:spiece_model"
        return tok
    return tokenizer_from(source)


def _default_dtype(device: torch.device, info: TextEncoderFileInfo) -> torch.dtype:
    if device.type == "cpu":
        return torch.float32
    if all(dt == torch.float32 for dt in info.weight_dtypes.values()):
        return torch.float32
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16



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
                t, scale = dequantize(t, scale, torch.float32).to(weight_dtype), None
            else:
                t = t.to(weight_dtype)
        owner = model.get_submodule(internal.rpartition(".")[0])
        setattr(owner, internal.rpartition(".")[2], nn.Parameter(t.to(device), requires_grad=False))
        if scale is not None:
            owner.scale = scale.to(device)
        del t
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:  # analyse() checked the names, so this is a bug, not a bad file
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
    with open_weights(path, WHAT) as reader:
        info = analyse(path, reader.entries)
        if info.ignored:
            log.debug("%s: %d tensors not used by the encoder, e.g. %s", path, len(info.ignored), info.ignored[:5])
        if tokenizer is None:
            if not info.has_tokenizer:
                raise CheckpointError(
                    f"{path}: holds no tokenizer (no 'spiece_model' tensor - Wan's models_t5_umt5-xxl-enc-bf16.pth "
                    "never has one); pass the tokenizer: the google/umt5-xxl tokenizer folder, its tokenizer.json "
                    "or spiece.model, or a ComfyUI umt5_xxl *.safetensors file"
                )
            tok = tokenizer_from(reader.read(next(k for k in reader.entries if k.endswith("spiece_model"))))
            tok.source = f"{path}:spiece_model"
        else:
            tok = load_tokenizer(tokenizer)
        if tok.vocab_size > info.config.vocab_size:
            raise CheckpointError(
                f"tokenizer {tok.source} has {tok.vocab_size} pieces but {path} embeds only {info.config.vocab_size} "
                "tokens: tokenizer and encoder do not belong together"
            )
        with torch.device("meta"):
            model = UMT5Encoder(info.config)
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

