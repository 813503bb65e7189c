"""Video decoders for Wan2.1 latents: the full Wan2.1 VAE and the TAEHV tiny decoder.

Both satisfy `VideoDecoder`; their `stream_decoder()` objects satisfy `StreamDecoder`:

    dec = load_decoder("wan_2.1_vae.safetensors", device="cuda", dtype=torch.bfloat16)  # or taew2_1.pth
    stream = dec.stream_decoder()
    for z_chunk in chunks:                       # normalised DiT latents [B, 16, t, h, w]
        frames = stream.decode_normalized(z_chunk)   # [B, 3, n, 8h, 8w] in [-1, 1]

n = 1 + 4(t - 1) for the first chunk and 4t after it; the frames of all chunks concatenated equal
``dec.decode_normalized(whole)``. ``decode(mu)`` takes un-normalised latents (ComfyUI's LATENT).
"""

from __future__ import annotations

import os
from typing import Mapping, Union

import torch

from ..errors import CheckpointError
from ..weights import not_a, read_state_dict, unwrap
from .common import StreamDecoder, VideoDecoder
from .taehv import TAEHV, TAEHVConfig, TAEHVStreamDecoder, infer_taehv_config
from .wan_vae import WanStreamDecoder, WanVAE
from .wan_vae_config import WanVAEConfig, infer_wan_vae_config

AnyDecoder = Union[WanVAE, TAEHV]

__all__ = [
    "AnyDecoder",
    "StreamDecoder",
    "TAEHV",
    "TAEHVConfig",
    "TAEHVStreamDecoder",
    "VideoDecoder",
    "WanStreamDecoder",
    "WanVAE",
    "WanVAEConfig",
    "decoder_from_state_dict",
    "detect_decoder_kind",
    "infer_taehv_config",
    "infer_wan_vae_config",
    "load_decoder",
    "load_encoder",
    "load_vae",
    "vae_from_state_dict",
]


def detect_decoder_kind(sd: Mapping[str, object]) -> str | None:
    """'wan' (Wan2.1 VAE names), 'taehv' (taew2_1 names) or None, from the keys alone."""
    if "decoder.conv1.weight" in sd and "conv2.weight" in sd:
        return "wan"
    if "decoder.1.weight" in sd and "decoder.3.conv.0.weight" in sd:
        return "taehv"
    return None


_NESTED = ("state_dict", "model", "module", "vae", "decoder_state_dict")
_PREFIXES = ("module.", "_orig_mod.", "vae.", "first_stage_model.")


def _read(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The VAE tensors of a file: unnested, wrapper prefixes that every name shares stripped, or the VAE part
    of a whole-pipeline checkpoint (under `first_stage_model.` / `vae.`)."""
    sd, _ = unwrap(read_state_dict(path), _NESTED, str(path))
    while prefix := next((p for p in _PREFIXES if sd and all(k.startswith(p) for k in sd)), None):
        sd = {k[len(prefix):]: v for k, v in sd.items()}
    if detect_decoder_kind(sd) is None:
        for prefix in ("first_stage_model.", "vae."):
            part = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            if detect_decoder_kind(part) is not None:
                return part
    return sd


def decoder_from_state_dict(sd: Mapping[str, torch.Tensor], device: str | torch.device = "cpu",
                            dtype: torch.dtype = torch.float32, source: str = "state dict") -> AnyDecoder:
    """A decoder-only `WanVAE` or `TAEHV`, whichever layout `sd` has (names checked strictly)."""
    kind = detect_decoder_kind(sd)
    if kind == "wan":
        return WanVAE.from_state_dict(sd, device, dtype, source, decoder_only=True)
    if kind == "taehv":
        return TAEHV.from_state_dict(sd, device, dtype, source, decoder_only=True)
    raise not_a(source, "a video decoder", list(sd), "the Wan2.1 VAE (Wan2.1_VAE.pth / wan_2.1_vae.safetensors, "
                "names like 'decoder.conv1.weight', 'conv2.weight') or the TAEHV tiny decoder (taew2_1.pth, names like "
                "'decoder.1.weight', 'decoder.3.conv.0.weight')", sd)


def vae_from_state_dict(sd: Mapping[str, torch.Tensor], device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, source: str = "state dict") -> WanVAE:
    """The full Wan2.1 VAE (encoder and decoder) from a state dict (names checked strictly)."""
    if detect_decoder_kind(sd) == "taehv":
        raise CheckpointError(
            f"{source}: this is the TAEHV tiny decoder, not the full Wan2.1 VAE; it can decode "
            "(use load_decoder) but this needs Wan2.1_VAE.pth or wan_2.1_vae.safetensors"
        )
    cfg = infer_wan_vae_config(sd, source)
    if not cfg.has_encoder:
        raise CheckpointError(f"{source}: this Wan VAE file has no encoder weights ('encoder.*'); the full VAE is needed")
    return WanVAE.from_state_dict(sd, device, dtype, source)


def load_vae(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> WanVAE:
    """Load the full Wan2.1 VAE (``Wan2.1_VAE.pth`` or ``wan_2.1_vae.safetensors``) for encode + decode."""
    return vae_from_state_dict(_read(path), device, dtype, str(path))


def load_decoder(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> AnyDecoder:
    """Load a video decoder, Wan2.1 VAE or TAEHV (``taew2_1.pth``), detected from the names.

    Only the decoder weights are kept (the encoder's are checked, not loaded).
    """
    return decoder_from_state_dict(_read(path), device, dtype, str(path))


def load_encoder(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> AnyDecoder:
    """Load a Wan2.1 VAE or a TAEHV with its encoder (for `.stream_encoder()`; it decodes too)."""
    sd = _read(path)
    kind = detect_decoder_kind(sd)
    if kind == "taehv":
        if "encoder.0.weight" not in sd:
            raise CheckpointError(f"{path}: this TAEHV file has no encoder weights ('encoder.*'); use the Wan2.1 VAE")
        return TAEHV.from_state_dict(sd, device, dtype, str(path))
    return vae_from_state_dict(sd, device, dtype, str(path))
