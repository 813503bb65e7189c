"""Writing files atomically, and the command-line dtype names."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import torch

from .paths import create_partial, publish_partial
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # command-line names


def compute_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """A --dtype choice, or the default: fp32 on CPU, bf16 elsewhere."""
    if name:
        return DTYPES[name]
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


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

    The parent folder must exist (a clear error otherwise): nothing half-written is ever left under the
    target's name (see `paths` for the partial file's name and its cleanup).
    """
    target = Path(target)
    parent = _writable_parent(target)
    tmp_path = create_partial(target)  # mode 0o666 & ~umask, like any new file
    try:
        yield tmp_path
        publish_partial(tmp_path, target)
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
