"""Where a command reads and writes: the rules every command and node applies before heavy work.

- An output is never one of the inputs (same file by inode when both exist, else the same resolved
  path), nor another output.
- An existing output is refused unless the caller allows replacing it (`--overwrite`).
- The output's folder must exist and take a new file: proven by creating the very temporary file the
  write will use, then removing it.
- Files are first written as hidden partial files next to the target, `.NAME.<pid>-<random>.partial.EXT`,
  created with mode 0o666 so the process umask applies, and renamed over the target when complete.
  Partial files of the same target left by a process that no longer runs (killed, power loss) are
  removed by the next check of that target; they never carry the target's name, so they are never
  taken for results.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Collection, Mapping

from .errors import SelfForcingError

PathLike = str | os.PathLike


def _partial_prefix(target: Path) -> str:
    return f".{target.name}."


def _partial_suffix(target: Path) -> str:
    return ".partial" + target.suffix


def create_partial(target: PathLike) -> Path:
    """Create (empty, exclusively, mode 0o666 & ~umask) a new partial file next to `target`; return its path."""
    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    for _ in range(100):
        tmp = parent / f"{_partial_prefix(target)}{os.getpid()}-{secrets.token_hex(4)}{_partial_suffix(target)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"cannot create a temporary file next to {target}")


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish_partial(tmp: PathLike, target: PathLike) -> None:
    """Give the finished partial file the mode a new file gets (0o666 & ~umask; some writers, e.g.
    safetensors, create their own 0o600 file) and rename it over `target`."""
    try:
        os.chmod(tmp, 0o666 & ~current_umask())
    except OSError:
        pass
    os.replace(tmp, target)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def stale_partials(target: PathLike) -> list[Path]:
    """Partial files of `target` whose writing process has ended (see the module docstring)."""
    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    prefix, suffix = _partial_prefix(target), _partial_suffix(target)
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    stale = []
    for name in names:
        if not (name.startswith(prefix) and name.endswith(suffix)) or len(name) <= len(prefix) + len(suffix):
            continue
        tag = name[len(prefix): -len(suffix)]
        pid = tag.split("-", 1)[0]
        if "-" in tag and pid.isdigit() and _alive(int(pid)):
            continue  # still being written
        stale.append(parent / name)
    return stale


def clean_stale_partials(target: PathLike) -> list[Path]:
    """Remove the stale partial files of `target`; returns those removed."""
    removed = []
    for p in stale_partials(target):
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def clean_stale_partials_in(folder: PathLike) -> None:
    """Remove every stale partial file in an output folder (e.g. frames of a killed run)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if name.startswith(".") and ".partial." in name:
            target = Path(folder) / name[1:].split(".partial.")[0].rsplit(".", 1)[0]
            if Path(folder) / name in stale_partials(target):
                (Path(folder) / name).unlink(missing_ok=True)


def same_file(a: PathLike, b: PathLike) -> bool:
    """True when a and b name the same file: same inode if both exist, else the same resolved path."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def prove_writable(target: PathLike, what: str = "output") -> Path:
    """Fail now, with the reason, if a file cannot be created next to `target` (creates and removes the
    temporary file the real write will use)."""
    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.exists():
        raise SelfForcingError(f"cannot write {what} {target}: folder {parent} does not exist; create it first")
    if not parent.is_dir():
        raise SelfForcingError(f"cannot write {what} {target}: {parent} is a file, not a folder")
    if target.is_dir():
        raise SelfForcingError(f"cannot write {what} {target}: it is a folder; give a file name")
    try:
        tmp = create_partial(target)
    except OSError as e:
        raise SelfForcingError(f"cannot write {what} {target}: {e.strerror or e} in {parent}") from e
    tmp.unlink(missing_ok=True)
    return target


def check_paths(
    inputs: Mapping[str, PathLike | None],
    outputs: Mapping[str, PathLike | None],
    *,
    overwrite: bool = False,
    replaceable: Collection[str] = (),
    folders: Mapping[str, PathLike | None] | None = None,
) -> None:
    """The path rules for one command, before any heavy work.

    inputs / outputs: {what: path} (None entries are skipped); `what` names the option in messages
    (e.g. "--model"). replaceable: outputs that may be replaced without `overwrite` (e.g. the checkpoint
    of a resumed run). folders: output folders (created later by the command):
    refused when they are a file or one of the inputs.
    """
    ins = {k: Path(v) for k, v in inputs.items() if v is not None}
    outs = {k: Path(v) for k, v in outputs.items() if v is not None}
    dirs = {k: Path(v) for k, v in (folders or {}).items() if v is not None}
    for name, out in outs.items():
        for iname, inp in ins.items():
            if same_file(out, inp):
                raise SelfForcingError(
                    f"{name} {out} is the same file as {iname}: an input is never overwritten; "
                    f"choose another {name} name"
                )
            if inp.is_dir() and _inside(out, inp):
                raise SelfForcingError(f"{name} {out} lies inside the {iname} folder {inp}; write it elsewhere")
    names = list(outs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if same_file(outs[a], outs[b]):
                raise SelfForcingError(f"{a} and {b} are the same file {outs[a]}; give them different names")
    for name, folder in dirs.items():
        if folder.exists() and not folder.is_dir():
            raise SelfForcingError(f"{name} {folder} is a file; give a folder (it is created if missing)")
        for iname, inp in ins.items():
            if same_file(folder, inp) or (inp.is_dir() and _inside(folder, inp)):
                raise SelfForcingError(f"{name} {folder} is the {iname} input; choose another folder")
        for oname, out in outs.items():
            if same_file(folder, out):
                raise SelfForcingError(f"{name} {folder} and {oname} are the same path; give them different names")
    for name, out in outs.items():
        prove_writable(out, name)
        if out.exists() and not overwrite and name not in replaceable:
            raise SelfForcingError(f"{name} {out} already exists; pass --overwrite to replace it, or choose another name")
    for out in outs.values():
        clean_stale_partials(out)
    for folder in dirs.values():
        clean_stale_partials_in(folder)
