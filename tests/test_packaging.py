"""The built wheel installs one top-level package: ``kernels/`` goes in as ``polar_sparsity.kernels``.

PyPI's ``kernels`` distribution installs a top-level ``kernels`` module; ours must not overwrite it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_has_no_top_level_kernels(tmp_path: Path) -> None:
    # Build from a copy: setuptools writes build/ and *.egg-info beside the sources.
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("polar_sparsity", "kernels"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("polar_sparsity-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"polar_sparsity"}
    assert "polar_sparsity/kernels/__init__.py" in names
    assert "polar_sparsity/kernels/bench/__main__.py" in names
    assert "polar_sparsity/kernels/tuned_h100.json" in names
    # Every package of the source tree is in the wheel (a new subpackage needs no packaging edit).
    for init in (ROOT / "polar_sparsity").rglob("__init__.py"):
        assert init.relative_to(ROOT).as_posix() in names
