"""LoRA file layouts: ComfyUI's (``diffusion_model.<path>.lora_down.weight`` / ``.lora_up.weight`` /
``.alpha``), ``lora_A`` / ``lora_B`` names, and PEFT as LongLive saves it (``base_model.model.<path>.lora_A
.weight``, possibly in a .pt under ``generator_lora``). `LoRA.load` / `LoRA.save` stand on these.

A pair: A [rank, in] (``lora_down`` / ``lora_A``), B [out, rank] (``lora_up`` / ``lora_B``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Mapping

import torch
from safetensors.torch import save_file

from .errors import CheckpointError, SelfForcingError
from .io import atomic_path
from .weights import SAFETENSORS_SUFFIXES, read_state_dict, strip_prefix, unwrap

#: Prefix ComfyUI's LoraLoader maps onto the diffusion model.
COMFY_PREFIX = "diffusion_model."

# Prefixes stripped (repeatedly) from module paths found in LoRA files, and wrapper names removed anywhere.
_FILE_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "model.")
_WRAPPER_PARTS = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
# <path>.<lora_down|lora_up|lora_A|lora_B>[.<adapter name>].weight
_WEIGHT_KEY = re.compile(r"^(?P<path>.+)\.(?P<kind>lora_down|lora_up|lora_A|lora_B)(?:\.[A-Za-z0-9_-]+)?\.weight$")
_ALPHA_KEY = re.compile(r"^(?P<path>.+)\.alpha$")


@dataclass
class Pairs:
    """The LoRA pairs of a file, by Wan module path: A [rank, in], B [out, rank], alpha."""

    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]
    alpha: dict[str, float]

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """path -> (in_features, out_features)."""
        return {p: (a.shape[1], self.B[p].shape[0]) for p, a in self.A.items()}

    @property
    def ranks(self) -> dict[str, int]:
        return {p: a.shape[0] for p, a in self.A.items()}


def module_path(raw: str) -> str:
    """Normalise a module path found in a LoRA file to a Wan module path."""
    while (stripped := strip_prefix(raw, _FILE_PREFIXES, _WRAPPER_PARTS)) != raw:
        raw = stripped
    return raw


def parse_pairs(sd: Mapping[str, torch.Tensor], alpha: float | None = None) -> Pairs:
    """A flat dict in any layout above -> its pairs, checked (names, pairing, shapes). `alpha` is used where
    the file stores none (PEFT); default = the pair's rank."""
    downs, ups, alphas, unknown = {}, {}, {}, []
    for k, v in sd.items():
        m = _WEIGHT_KEY.match(k) if isinstance(v, torch.Tensor) else None
        if m:
            (downs if m["kind"] in ("lora_down", "lora_A") else ups)[module_path(m["path"])] = v
            continue
        m = _ALPHA_KEY.match(k) if isinstance(v, torch.Tensor) else None
        if m and v.numel() == 1:
            alphas[module_path(m["path"])] = float(v.float().item())
            continue
        unknown.append(k)
    if unknown:
        raise CheckpointError(f"{len(unknown)} keys are not LoRA weights this loader understands, e.g. "
                              f"{sorted(unknown)[:5]} (is this a LoRA file? DoRA, LoHa and conv LoRAs are not supported)")
    kohya = sorted(p for p in downs if p.startswith(("lora_unet_", "lora_te")))
    if kohya:
        raise CheckpointError(f"kohya-style names such as {kohya[0]!r} are not supported: convert the file to "
                              "ComfyUI 'diffusion_model.<module path>.lora_down.weight' names")
    if not downs and not ups:
        raise CheckpointError("no LoRA weights found (expected keys ending in lora_down.weight/lora_up.weight "
                              "or lora_A.weight/lora_B.weight)")
    unpaired = sorted(set(downs) ^ set(ups))
    if unpaired:
        raise CheckpointError(f"{len(unpaired)} modules have only one of the down/up (A/B) pair: {unpaired[:5]}")
    problems = [f"{p}: down {tuple(a.shape)} / up {tuple(ups[p].shape)} (expected [rank, in] / [out, rank]; conv "
                "LoRAs are not supported)" for p, a in downs.items()
                if a.dim() != 2 or ups[p].dim() != 2 or a.shape[0] != ups[p].shape[1]]
    if problems:
        raise CheckpointError("bad LoRA shapes: " + "; ".join(problems[:5]))
    stray = sorted(set(alphas) - set(downs))
    if stray:
        raise CheckpointError(f"alpha given for modules without weights: {stray[:5]}")
    return Pairs(downs, ups, {p: alphas.get(p, float(alpha) if alpha is not None else float(a.shape[0]))
                              for p, a in downs.items()})


def read_pairs(path: str | os.PathLike, alpha: float | None = None, key: str | None = None) -> Pairs:
    """The pairs of a LoRA file (flat, or nested in a .pt: `key`, else ``generator_lora``, else its only
    nested dict)."""
    obj = read_state_dict(path)
    nested = [k for k, v in obj.items() if isinstance(v, Mapping)]
    if key is not None and not isinstance(obj.get(key), Mapping):
        raise CheckpointError(f"{path}: no entry {key!r} holding LoRA weights; top-level entries: {sorted(obj)[:10]}")
    preference = (key,) if key is not None else ("generator_lora", *(nested if len(nested) == 1 else ()))
    try:
        sd, _ = unwrap(obj if key is None else {key: obj[key]}, preference, str(path))
        return parse_pairs(sd, alpha)
    except CheckpointError as e:
        msg = str(e) if str(e).startswith(str(path)) else f"{path}: {e}"
        if len(nested) > 1 and key is None:
            msg += "; say which entry holds the LoRA (key=...)"
        raise CheckpointError(msg) from e


def to_comfy(pairs: Pairs, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """ComfyUI's LoraLoader layout: ``diffusion_model.p.lora_down.weight`` [rank, in], ``.lora_up.weight``
    [out, rank], ``.alpha`` (0-dim float32); CPU copies in `dtype` (default: as they are)."""
    out: dict[str, torch.Tensor] = {}
    for p in sorted(pairs.A):
        base = COMFY_PREFIX + p
        out[base + ".lora_down.weight"] = pairs.A[p].detach().to("cpu", dtype or pairs.A[p].dtype).contiguous()
        out[base + ".lora_up.weight"] = pairs.B[p].detach().to("cpu", dtype or pairs.B[p].dtype).contiguous()
        out[base + ".alpha"] = torch.tensor(pairs.alpha[p], dtype=torch.float32)
    return out


def write_comfy(pairs: Pairs, path: str | os.PathLike, targets, dtype: torch.dtype | None = None,
                metadata: Mapping[str, str] | None = None) -> None:
    """Write a .safetensors file ComfyUI's stock LoraLoader applies to a Wan model (atomic: a temp file renamed
    into place). Metadata records rank, alpha and targets."""
    if not str(path).lower().endswith(SAFETENSORS_SUFFIXES):
        raise SelfForcingError(f"cannot save a LoRA to {path}: use a .safetensors file name")
    ranks, alphas = sorted(set(pairs.ranks.values())), sorted(set(pairs.alpha.values()))
    meta = {
        "format": "sf_core.lora",
        "rank": str(ranks[0]) if len(ranks) == 1 else json.dumps(ranks),
        "alpha": repr(alphas[0]) if len(alphas) == 1 else json.dumps(alphas),
        "targets": json.dumps(list(targets)),
        **{str(k): str(v) for k, v in (metadata or {}).items()},
    }
    tensors = to_comfy(pairs, dtype)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
