"""Installing the project puts only the engine (sf_core) on the path: no top-level `nodes` module that would
shadow ComfyUI's own `nodes` for any tool importing it outside ComfyUI's folder."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A copy of what the build reads (the build writes egg-info next to the sources)."""
    dst = tmp_path_factory.mktemp("project")
    for name in ("pyproject.toml", "README.md", "__init__.py"):
        shutil.copy(ROOT / name, dst / name)
    for folder in ("sf_core", "nodes"):
        shutil.copytree(ROOT / folder, dst / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def _build(project: Path, hook: str, out: Path) -> Path:
    out.mkdir()
    code = f"from setuptools import build_meta as b; print(b.{hook}({str(out)!r}))"
    res = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return out / res.stdout.strip().splitlines()[-1]


def test_wheel_holds_the_engine_and_no_nodes_module(project, tmp_path):
    names = zipfile.ZipFile(_build(project, "build_wheel", tmp_path / "wheel")).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"sf_core"}, tops
    assert "sf_core/train/trainer.py" in names  # subpackages come along


def test_editable_install_does_not_provide_nodes(project, tmp_path):
    wheel = _build(project, "build_editable", tmp_path / "editable")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    pth = next(site.glob("*.pth")).read_text().strip()
    # a bare interpreter (no site-packages) with only this install on its path, its .pth line run as site would
    code = (f"import sys; sys.path.insert(0, {str(site)!r}); "
            f"exec({pth!r}) if {pth!r}.startswith('import') else sys.path.append({pth!r}); "
            "import importlib.util as u; "
            "print(u.find_spec('nodes') is None, u.find_spec('sf_core').origin)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    no_nodes, origin = res.stdout.split()
    assert no_nodes == "True"  # `import nodes` finds nothing of ours
    assert Path(origin).resolve() == (project / "sf_core" / "__init__.py").resolve()  # the engine is installed
