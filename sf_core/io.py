"""Reading weight files safely, and writing files atomically."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

import torch

from .errors import CheckpointError

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # command-line names


def compute_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """A --dtype choice, or the default: fp32 on CPU, bf16 elsewhere."""
    if name:
        return DTYPES[name]
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


FP8_DTYPES = tuple(
    getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz") if hasattr(torch, n)
)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


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


def read_state_dict(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict:
    """Read a safetensors or torch-pickle file into a dict (nested dicts kept for .pt files).

    Pickles load with ``weights_only=True``. A missing, truncated or foreign file raises
    CheckpointError naming the file.
    """
    path = check_weights_file(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device=str(device))
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(
                f"{path}: not a readable safetensors file ({e}); the file may be truncated - download it again"
            ) from e
    if suffix in PICKLE_SUFFIXES:
        try:
            obj = torch.load(str(path), map_location=device, weights_only=True, mmap=_can_mmap(path))
        except Exception as e:  # torch raises many types for corrupt pickles
            raise CheckpointError(
                f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e}); "
                "the file may be truncated or not a weights file"
            ) from e
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a dict of tensors")
        return obj
    raise CheckpointError(
        f"{path}: unknown weights file type {suffix!r}; expected one of "
        f"{', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)}"
    )


def _can_mmap(path: Path) -> bool:
    import zipfile

    return zipfile.is_zipfile(path)


def _writable_parent(target: Path) -> Path:
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"cannot write {target}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"cannot write {target}: folder {parent} is not writable")
    return parent


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `target`; on success rename it over `target`, else delete it.

    The parent folder must exist (a clear error otherwise): nothing half-written is ever left.
    """
    target = Path(target)
    parent = _writable_parent(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial" + target.suffix, dir=parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def check_writable(target: str | os.PathLike) -> Path:
    """Fail early, before heavy work, if `target` cannot be written."""
    target = Path(target)
    _writable_parent(target)
    if target.is_dir():
        raise IsADirectoryError(f"cannot write {target}: it is a folder; give a file name")
    return target


def peek_keys(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor names -> shapes of a weights file without reading its data (safetensors header, or a
    memory-mapped pickle). Nested dicts of .pt files are flattened with '.'."""
    path = Path(path)
    if path.is_dir():
        out: dict[str, tuple[int, ...]] = {}
        for f in sorted(path.rglob("*.safetensors")):
            out.update(peek_keys(f))
        return out
    if path.suffix.lower() in SAFETENSORS_SUFFIXES and path.is_file() and path.stat().st_size > 0:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e}); it may be truncated") from e
    flat: dict[str, tuple[int, ...]] = {}

    def walk(obj, prefix):
        for k, v in obj.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, torch.Tensor):
                flat[f"{prefix}{k}"] = tuple(v.shape)

    walk(read_state_dict(path), "")
    return flat
