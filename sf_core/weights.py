"""The one reader of weight files: every loader (DiT, VAE, TAEHV, UMT5, LoRA) stands on it.

- `open_weights(path)`: names, shapes and dtypes first, tensors one by one. ``.safetensors`` through its
  header (each tensor read once into its own buffer: resident memory is what the caller keeps); ``.pt`` /
  ``.pth`` with ``weights_only=True`` (memory-mapped when it is a zip file), nested dicts flattened with
  dots; a folder: its ``*.safetensors`` files (a diffusers ``transformer/`` subfolder preferred).
- `read_state_dict(path)`: the whole file as a dict (nested dicts kept); `peek_keys(path)`: names -> shapes.
- `unwrap(obj, ...)`: the tensors inside nested training checkpoints; `strip_prefix` for wrapper prefixes.
- `describe(keys)`: what a file is, for "this is not X: it looks like Y" messages in one style.
- `check_strict(sd, expected, ...)`: names and shapes exactly; `build_on_meta`: a module without
  allocating its weights twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .errors import CheckpointError

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
FP8_DTYPES = tuple(
    getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz") if hasattr(torch, n)
)

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


def check_weights_file(path: str | os.PathLike, what: str = "weights") -> Path:
    """A clear CheckpointError for a folder, a missing file or an empty (interrupted) download."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; give the {what} file")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty (an interrupted download?)")
    return path


def _unknown_suffix(path: Path) -> CheckpointError:
    return CheckpointError(f"{path}: unknown weights file type {path.suffix.lower()!r}; expected one of "
                           f"{', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)}")


# ---- readers ----------------------------------------------------------------------------------
class SafetensorsReader:
    """Header-first: names/shapes without touching data; each tensor read (once) with readinto into a
    fresh buffer, so resident memory is exactly what the caller keeps."""

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
                    raise CheckpointError(f"{path}: tensor {key!r} lies past the end of the file ({size} bytes); "
                                          "the file is truncated - download it again")
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


class DictReader:
    """Tensors already in a dict (a torch pickle, the files of a folder); nested dicts flattened with dots.
    `read` hands a tensor over: the reader keeps no reference to it."""

    def __init__(self, obj: Mapping):
        self._tensors = flatten(obj)
        self.entries = {k: TensorInfo(tuple(t.shape), t.dtype) for k, t in self._tensors.items()}

    def read(self, key: str) -> torch.Tensor:
        return self._tensors.pop(key)

    def close(self) -> None:
        self._tensors.clear()


def flatten(obj: Mapping, prefix: str = "") -> dict[str, torch.Tensor]:
    """Nested dicts of tensors -> one flat dict, names joined with '.'; other values dropped."""
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            out[prefix + str(k)] = v
        elif isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
    return out


def _folder_files(folder: Path) -> list[Path]:
    sub = folder / "transformer"
    files = sorted((sub if sub.is_dir() else folder).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: folder holds no .safetensors weights (expected a diffusers transformer folder)")
    return files


def _load_pickle(path: Path, device: str | torch.device = "cpu") -> dict:
    try:
        obj = torch.load(str(path), map_location=device, weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # torch raises many types for corrupt pickles
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({load_error_reason(e)}); the file may "
                              "be truncated, or not a weights file (only plain tensors are read from .pt files, for "
                              "safety)") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a dict of tensors")
    return obj


def load_error_reason(e: Exception) -> str:
    """torch.load's error as one short line: for its refusals only the reason (e.g. "Unsupported global:
    GLOBAL datetime.datetime"), never its advice to load with weights_only=False, which would run arbitrary
    code from an unknown file."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        m = re.search(r"\S.*", text.split("WeightsUnpickler error:", 1)[1])
        text = re.split(r"(?<=\.) |\. Please", m.group(0))[0].rstrip(".") if m else "not plain tensors"
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def _load_safetensors(path: Path, device: str | torch.device = "cpu") -> dict:
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({e}); the file may be truncated - download it again"
        ) from e


@contextlib.contextmanager
def open_weights(path: str | os.PathLike, what: str = "weights") -> Iterator[SafetensorsReader | DictReader]:
    """A reader with `.entries` {name: TensorInfo} and `.read(name)` for a file or a folder of safetensors."""
    path = Path(path)
    if path.is_dir():
        sd: dict = {}
        for f in _folder_files(path):
            sd.update(_load_safetensors(f))
        reader = DictReader(sd)
    else:
        path = check_weights_file(path, what)
        suffix = path.suffix.lower()
        if suffix in SAFETENSORS_SUFFIXES:
            reader = SafetensorsReader(path)
        elif suffix in PICKLE_SUFFIXES:
            reader = DictReader(_load_pickle(path))
        else:
            raise _unknown_suffix(path)
    try:
        yield reader
    finally:
        reader.close()


def read_state_dict(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict:
    """A safetensors file, a torch pickle (nested dicts kept; ``weights_only=True``) or a folder of
    safetensors files -> a dict. A missing, truncated or foreign file raises CheckpointError naming it."""
    path = Path(path)
    if path.is_dir():
        out: dict = {}
        for f in _folder_files(path):
            out.update(_load_safetensors(f, device))
        return out
    path = check_weights_file(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return _load_safetensors(path, device)
    if suffix in PICKLE_SUFFIXES:
        return _load_pickle(path, device)
    raise _unknown_suffix(path)


def peek_keys(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor names -> shapes without reading tensor data (safetensors header, or a memory-mapped pickle)."""
    with open_weights(path) as reader:
        return {k: e.shape for k, e in reader.entries.items()}


# ---- unwrapping -------------------------------------------------------------------------------
def unwrap(obj: Mapping, preference: Sequence[str], name: str) -> tuple[dict, str]:
    """The tensors of a (possibly nested) checkpoint dict: the top level when it holds tensors, else the
    first entry of `preference` that is a dict (recursively). Returns (tensors, dotted source or "")."""
    if any(isinstance(v, torch.Tensor) for v in obj.values()):
        return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}, ""
    for key in preference:
        if isinstance(obj.get(key), Mapping):
            inner, src = unwrap(obj[key], preference, name)
            return inner, key + ("." + src if src else "")
    raise CheckpointError(f"{name}: holds no tensors at the top level and none of {', '.join(preference)}; "
                          f"found {describe(list(map(str, obj)))}")


def strip_prefix(key: str, prefixes: Sequence[str], wrappers: Sequence[str] = ()) -> str:
    """Remove wrapper segments (e.g. `_orig_mod.`) anywhere, then the first matching prefix."""
    for w in wrappers:
        key = key.replace(w, "")
    for p in prefixes:
        if key.startswith(p):
            return key[len(p):]
    return key


# ---- what is this file ------------------------------------------------------------------------
_KINDS = (  # (what, patterns any key may match), first match wins
    ("a Self Forcing training checkpoint (a diffusion model)", (r"^(generator_ema|generator|critic)$",)),
    ("a LoRA, not a full model", (r"lora_(A|B|up|down)\b",)),
    ("a Wan diffusion model (DiT)", (r"(^|\.)patch_embedding\.weight$", r"(^|\.)blocks\.\d+\.(self|cross)_attn\.[qkvo]\.",
                                     r"(^|\.)condition_embedder\.", r"(^|\.)time_embedding\.")),
    ("a Stable Diffusion / SDXL UNet checkpoint", (r"input_blocks\.", r"^conditioner\.", r"first_stage_model\.")),
    ("a diffusers-layout VAE (use the original Wan2.1_VAE.pth or ComfyUI's wan_2.1_vae.safetensors)",
     (r"^post_quant_conv\.", r"^decoder\.up_blocks\.")),
    ("a Wan-style VAE", (r"^(encoder|decoder)\.conv1\.", r"^decoder\.middle\.", r"^decoder\.head\.")),
    ("a TAEHV tiny autoencoder", (r"^decoder\.\d+\.conv\.0\.weight$",)),
    ("a CLIP text encoder", (r"text_model\.encoder\.layers", r"transformer\.resblocks")),
    ("an original T5 v1.0 encoder", (r"DenseReluDense\.wi\.weight",)),
    ("a T5/UMT5 text encoder", (r"^(encoder\.)?block\.\d+\.layer\.", r"^shared\.weight$", r"token_embedding",
                                r"^blocks\.\d+\.attn\.q\.")),
    ("a decoder-only language model", (r"model\.layers\.0\.", r"self_attn\.q_proj")),
)


def describe(keys: Sequence[str], shapes: Mapping[str, Sequence[int]] | None = None) -> str:
    """A short guess at what a file with these tensor names holds, e.g. "a Wan VAE (194 tensors, e.g. ...)"."""
    keys = [str(k) for k in keys]
    what = "an unknown model"
    for kind, patterns in _KINDS:
        rx = [re.compile(p) for p in patterns]
        if any(r.search(k) for k in keys for r in rx):
            what = kind
            break
    conv = (shapes or {}).get("decoder.conv1.weight")
    if what == "a Wan-style VAE" and conv is not None and tuple(getattr(conv, "shape", conv))[1:2] == (48,):
        what = "the Wan2.2 VAE (48 latent channels); Self Forcing needs the Wan2.1 VAE (16 channels)"
    sample = ", ".join(repr(k) for k in keys[:4]) + (", ..." if len(keys) > 4 else "")
    return f"{what} ({len(keys)} tensors, e.g. {sample or 'none'})"


def not_a(path_or_name, what: str, keys: Sequence[str], expected: str, shapes=None) -> CheckpointError:
    """The one message style for a foreign file: "<file>: not <what>: found <describe>; expected <...>"."""
    return CheckpointError(f"{path_or_name}: not {what}: found {describe(keys, shapes)}; expected {expected}")


# ---- strict checks and building ---------------------------------------------------------------
def _short(items: list[str], limit: int = 6) -> str:
    items = sorted(items)
    more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def check_strict(sd: Mapping[str, object], expected: Mapping[str, Sequence[int]], source: str, what: str,
                 allow_extra: bool = False) -> None:
    """Raise CheckpointError unless `sd` (name -> tensor or shape) has exactly the `expected` names and
    shapes (extra names allowed with `allow_extra`), listing what is missing, unexpected or mis-shaped."""
    shapes = {k: tuple(getattr(v, "shape", v)) for k, v in sd.items()}
    missing = [k for k in expected if k not in shapes]
    unexpected = [] if allow_extra else [k for k in shapes if k not in expected]
    wrong = [f"{k} {tuple(shapes[k])} (expected {tuple(expected[k])})"
             for k in expected if k in shapes and tuple(shapes[k]) != tuple(expected[k])]
    if missing or unexpected or wrong:
        parts = [f"missing {len(missing)}: {_short(missing)}"] if missing else []
        parts += [f"unexpected {len(unexpected)}: {_short(unexpected)}"] if unexpected else []
        parts += [f"wrong shape {len(wrong)}: {_short(wrong, 4)}"] if wrong else []
        raise CheckpointError(f"{source}: the weights do not match the {what} layout ({'; '.join(parts)}); "
                              f"the file may be truncated, or it is {describe(list(shapes), shapes)}")


def meta_shapes(build: Callable[[], nn.Module]) -> dict[str, tuple[int, ...]]:
    """Parameter/buffer names -> shapes of a module, built on the meta device (no memory)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in build().state_dict().items()}


def build_on_meta(build: Callable[[], nn.Module], sd: Mapping[str, torch.Tensor], device="cpu",
                  dtype: torch.dtype | None = None) -> nn.Module:
    """Build a module on the meta device (free) and assign `sd` to it (floating tensors cast to `dtype`
    unless None; fp8 tensors are kept as they are), in eval mode without gradients."""
    with torch.device("meta"):
        module = build()

    def cast(v: torch.Tensor) -> torch.Tensor:
        if dtype is not None and v.is_floating_point() and v.dtype not in FP8_DTYPES:
            v = v.to(dtype)
        return v.to(device)

    module.load_state_dict({k: cast(sd[k]) for k in module.state_dict()}, strict=True, assign=True)
    return module.eval().requires_grad_(False)
