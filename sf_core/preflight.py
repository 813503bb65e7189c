"""Checks every command runs before heavy work: values, devices, text files, model shapes, memory.

Each check raises SelfForcingError saying what to change; none loads weights (file headers and
memory-mapped keys only).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .checkpoints import NESTED_PREFERENCE, normalize_keys
from .config import WanConfig
from .errors import CheckpointError, SelfForcingError
from .wan.attention import resolve_backend
from .weights import PICKLE_SUFFIXES, peek_keys, read_state_dict, unwrap

GiB = 2**30


def positive(name: str, value: float) -> float:
    """A finite number > 0 (e.g. --fps, --shift, --seconds)."""
    if value is None or not math.isfinite(value) or value <= 0:
        raise SelfForcingError(f"{name} must be a finite number above 0, got {value}")
    return value


def finite(name: str, value: float) -> float:
    if value is None or not math.isfinite(value):
        raise SelfForcingError(f"{name} must be a finite number, got {value}")
    return value


def share(name: str, value: float) -> float:
    """A finite number in [0, 1] (a share of something)."""
    if value is None or not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise SelfForcingError(f"{name} must be a share between 0 and 1, got {value}")
    return value


def at_least(name: str, value: int, low: int) -> int:
    if value < low:
        raise SelfForcingError(f"{name} must be at least {low}, got {value}")
    return value


def check_device(name: str, what: str = "--device") -> torch.device:
    """A device string that exists here, with its backend available (cuda, cuda:N, mps, xpu, cpu)."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise SelfForcingError(f"{what} {name!r} is not a device; use cpu, cuda or cuda:N") from e
    kind = device.type
    if kind == "cpu":
        return device
    module = getattr(torch, kind, None)
    if kind == "mps":
        ok, count = torch.backends.mps.is_available(), 1
    elif module is not None and hasattr(module, "is_available"):
        ok = module.is_available()
        count = module.device_count() if ok and hasattr(module, "device_count") else 0
    else:
        ok, count = False, 0
    if not ok:
        raise SelfForcingError(f"{what} {name}: this PyTorch has no working {kind} backend here; use {what} cpu")
    if device.index is not None and device.index >= count:
        raise SelfForcingError(f"{what} {name}: only {count} {kind} device(s) here (0 to {count - 1})")
    return device


def check_attention(name: str, device: torch.device) -> str:
    try:
        return resolve_backend(name, device)[0]
    except (ValueError, ImportError) as e:
        raise SelfForcingError(f"--attn: {e}") from e


def read_text_file(path: str | os.PathLike, what: str) -> str:
    """A UTF-8 text file's content, with clear errors for a folder, a missing or a binary file."""
    path = Path(path)
    if path.is_dir():
        raise SelfForcingError(f"{what} {path} is a folder; give a text file")
    if not path.is_file():
        raise SelfForcingError(f"{what} {path} does not exist")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:
        raise SelfForcingError(f"{what} {path} is not a UTF-8 text file (binary data?); give plain text")
    return text


def dit_config(path: str | os.PathLike) -> WanConfig:
    """The config of a DiT file (or diffusers folder) from its header / memory-mapped keys (no weights read).
    A folder holding several complete models is refused (which one was meant is unknown)."""
    path = Path(path)
    if path.is_dir():
        sub = path / "transformer"
        files = sorted((sub if sub.is_dir() else path).glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: folder holds no .safetensors weights (expected a diffusers transformer folder)")
        per_file = [peek_keys(f) for f in files]
        heads = [f.name for f, keys in zip(files, per_file) if any(k.endswith("patch_embedding.weight") for k in keys)]
        if len(heads) > 1:
            raise CheckpointError(f"{path}: this folder holds {len(heads)} separate models ({', '.join(heads[:3])}); "
                                  "give the file of the one to use")
        shapes = {k: v for keys in per_file for k, v in keys.items()}
    elif path.suffix.lower() in PICKLE_SUFFIXES:
        sd, _ = unwrap(read_state_dict(path), NESTED_PREFERENCE, str(path))  # zip .pt files are memory-mapped
        shapes = {k: tuple(v.shape) for k, v in sd.items()}
    else:
        shapes = peek_keys(path)
    named, _ = normalize_keys(shapes, str(path))
    with torch.device("meta"):
        meta = {k: torch.empty(s) for k, s in named.items()}
    return WanConfig.from_state_dict(meta, str(path))


def available_memory(device: torch.device) -> int:
    """Bytes free for this process on `device` now: GPU free memory, or the RAM the OS can hand out."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown here: do not refuse


def memory_plan(config: WanConfig, latent_height: int, latent_width: int, frames_per_chunk: int, dtype: torch.dtype,
                cache: int, batch: int = 1, models: int = 1, extra: int = 0) -> dict[str, int]:
    """Bytes a run holds at once: `models` DiTs' weights, the KV cache (`cache` bytes, from
    `StreamSettings.cache_bytes`), one chunk's activations (residual, q/k/v/o, FFN hidden), plus `extra`
    (e.g. a decoder)."""
    elem = torch.empty(0, dtype=dtype).element_size()
    chunk_tokens = batch * frames_per_chunk * config.tokens_per_frame(latent_height, latent_width)
    plan = {
        "weights": models * config.num_params() * elem,
        "cache": cache,
        "activations": 2 * chunk_tokens * (6 * config.dim + 2 * config.ffn_dim) * elem,
        "other": extra,
    }
    plan["total"] = sum(plan.values())
    return plan


def check_memory(plan: dict[str, int], device: torch.device, what: str, fix: str) -> None:
    """Refuse, with the estimate and `fix`, a plan larger than the free memory of `device`."""
    free = available_memory(device)
    if plan["total"] > free:
        parts = ", ".join(f"{k} {v / GiB:.1f}" for k, v in plan.items() if k != "total" and v)
        raise SelfForcingError(
            f"{what} needs about {plan['total'] / GiB:.1f} GiB ({parts} GiB) but {device} has "
            f"{free / GiB:.1f} GiB free; {fix}"
        )
