"""Tiny random UMT5 files in every real layout, and a tiny sentencepiece model, for tests.

    spm = train_tiny_sentencepiece()                     # bytes, pad 0 / eos 1 / unk 2, like UMT5's
    write_tiny_umt5(tmp / "te.safetensors", "comfy_hf", spiece=spm)   # ComfyUI umt5_xxl_fp16 layout
    write_tiny_umt5(tmp / "te8.safetensors", "comfy_fp8", spiece=spm) # ComfyUI fp8_e4m3fn_scaled layout
    write_tiny_umt5(tmp / "te.pth", "wan")               # Wan models_t5_umt5-xxl-enc-bf16.pth layout

The same seed gives the same weights in every layout (fp8 = those weights quantised).
Nothing here is used at run time.
"""

from __future__ import annotations

import functools
import io
import os
import random
from pathlib import Path

import torch

from .umt5 import LAYOUTS, UMT5Config

TINY_CONFIG = UMT5Config(vocab_size=256, dim=32, ffn_dim=80, num_heads=4, head_dim=8, num_layers=2)
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn

_SYLLABLES = "ka lo mi ne ra su to vi pe da fo gu ze hi ja bo ri sa te nu".split()
_WORDS = (
    "the a red fox cat dog runs jumps over under lazy quick brown snow forest river city night day "
    "camera slowly pans across bright light sunset ocean waves mountain bird flies sky"
).split()


def tiny_sentences(n: int = 500, seed: int = 0) -> list[str]:
    """n English-ish prompts from a fixed word list plus made-up words (deterministic)."""
    rng = random.Random(seed)
    made_up = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(300)]
    words = _WORDS + made_up
    tails = [".", ",", "!", " 42", "", " café"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 14))) + rng.choice(tails) for _ in range(n)]


@functools.lru_cache(maxsize=8)
def train_tiny_sentencepiece(vocab_size: int = 200, seed: int = 0) -> bytes:
    """A unigram sentencepiece model trained on `tiny_sentences` (well under a second), with UMT5's
    special ids: pad 0, eos 1, unk 2, no bos. Returns the serialized model proto."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_sentences(seed=seed)), model_writer=out, vocab_size=vocab_size,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
        hard_vocab_limit=False, minloglevel=2, num_threads=1,
    )
    return out.getvalue()


def random_umt5_weights(config: UMT5Config = TINY_CONFIG, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    """Random weights under the INTERNAL names (see UMT5Config.shapes), scaled so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in config.shapes().items():
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name == "embed.weight":
            t = torch.randn(shape, generator=g)
        elif name.endswith("rel_bias"):
            t = 0.5 * torch.randn(shape, generator=g)
        else:  # Linear [out, in]
            t = torch.randn(shape, generator=g) * shape[1] ** -0.5
        out[name] = t.to(dtype)
    return out


def _inverse_tables(layout: str) -> tuple[dict, dict]:
    _, _, block_table, top_table = LAYOUTS[layout]
    return {v: k for k, v in block_table.items()}, {v: k for k, v in top_table.items()}


def to_layout(weights: dict, layout: str) -> dict:
    """Internal names -> a file layout: "comfy_hf" (HF/ComfyUI names; the embedding stored as both
    shared.weight and encoder.embed_tokens.weight, as the reference key list shows) or "wan"."""
    block_inv, top_inv = _inverse_tables(layout)
    block_fmt = "encoder.block.{}.{}" if layout == "comfy_hf" else "blocks.{}.{}"
    out = {}
    for name, t in weights.items():
        if name.startswith("blocks."):
            _, i, rest = name.split(".", 2)
            out[block_fmt.format(i, block_inv[rest])] = t
        elif name == "embed.weight" and layout == "comfy_hf":
            out["shared.weight"] = t
            out["encoder.embed_tokens.weight"] = t.clone()
        else:
            out[top_inv[name]] = t
    return out


def quantize_fp8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor float8_e4m3fn quantisation as ComfyUI's scaled files do: w ~ w8.float() * scale."""
    scale = t.float().abs().max().clamp(min=1e-12) / FP8_MAX
    return (t.float() / scale).to(FP8), scale.reshape(()).to(torch.float32)


def to_comfy_fp8(weights: dict, other_dtype: torch.dtype = torch.float16) -> dict:
    """Internal names -> ComfyUI "fp8_e4m3fn_scaled" layout: every Linear of the blocks in fp8 with a
    per-tensor `<name>.scale_weight`, the rest in `other_dtype`, plus the `scaled_fp8` marker."""
    out = {}
    for key, t in to_layout(weights, "comfy_hf").items():
        if key.startswith("encoder.block.") and t.ndim == 2 and "relative_attention_bias" not in key:
            out[key], out[key[: -len(".weight")] + ".scale_weight"] = quantize_fp8(t)
        else:
            out[key] = t.to(other_dtype)
    out["scaled_fp8"] = torch.empty(0, dtype=FP8)
    return out


def write_tiny_umt5(
    path: str | os.PathLike,
    layout: str = "comfy_hf",
    config: UMT5Config = TINY_CONFIG,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    spiece: bytes | bool | None = True,
) -> Path:
    """Write random UMT5 weights as `layout`: "comfy_hf" (safetensors, in `dtype`), "comfy_fp8"
    (safetensors, fp8 Linears + fp16 rest) or "wan" (torch .pth, in `dtype`, never a tokenizer).
    spiece: True = embed `train_tiny_sentencepiece()` as `spiece_model`, bytes = embed those, None/False = none."""
    path = Path(path)
    weights = random_umt5_weights(config, seed)
    if layout == "wan":
        torch.save({k: v.to(dtype) for k, v in to_layout(weights, "wan").items()}, path)
        return path
    if layout == "comfy_hf":
        sd = {k: v.to(dtype) for k, v in to_layout(weights, "comfy_hf").items()}
    elif layout == "comfy_fp8":
        sd = to_comfy_fp8(weights)
    else:
        raise ValueError(f"unknown layout {layout!r}; use comfy_hf, comfy_fp8 or wan")
    if spiece is True:
        spiece = train_tiny_sentencepiece()
    if spiece:
        sd["spiece_model"] = torch.frombuffer(bytearray(spiece), dtype=torch.uint8)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def write_foreign_file(path: str | os.PathLike, kind: str = "dit") -> Path:
    """A small file with the key names of a Wan DiT ("dit"), a Wan VAE ("vae") or Flux's T5 v1.1
    ("t5"): what a user might pick by mistake as the text encoder."""
    from safetensors.torch import save_file

    z = lambda *s: torch.zeros(s, dtype=torch.float16)  # noqa: E731
    if kind == "dit":
        sd = {"patch_embedding.weight": z(8, 16, 1, 2, 2), "text_embedding.0.weight": z(8, 32),
              "blocks.0.self_attn.q.weight": z(8, 8), "blocks.0.cross_attn.k.weight": z(8, 8), "head.head.weight": z(64, 8)}
    elif kind == "vae":
        sd = {"encoder.conv1.weight": z(8, 3, 3, 3, 3), "decoder.conv1.weight": z(8, 16, 3, 3, 3),
              "decoder.head.2.weight": z(3, 8, 3, 3, 3), "encoder.middle.0.residual.0.gamma": z(8, 1, 1, 1)}
    elif kind == "t5":
        w = to_layout(random_umt5_weights(), "comfy_hf")
        sd = {k: v.half() for k, v in w.items() if "relative_attention_bias" not in k or ".block.0." in k}
    else:
        raise ValueError(f"unknown kind {kind!r}")
    save_file(sd, str(path))
    return Path(path)


def write_tokenizer_folder(folder: str | os.PathLike, spiece: bytes | None = None, tokenizer_json: bool = True) -> Path:
    """An HF-style tokenizer folder: spiece.model, and tokenizer.json converted by `transformers`
    (needs transformers + protobuf) when tokenizer_json is True."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spiece = spiece or train_tiny_sentencepiece()
    (folder / "spiece.model").write_bytes(spiece)
    if tokenizer_json:
        import transformers

        cls = getattr(transformers, "T5TokenizerFast", None) or transformers.T5Tokenizer
        tok = cls.from_pretrained(str(folder), extra_ids=0)  # converts spiece.model -> a `tokenizers` pipeline
        tok.backend_tokenizer.save(str(folder / "tokenizer.json"))
    return folder
