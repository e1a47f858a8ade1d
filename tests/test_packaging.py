"""The built wheel installs one top-level package: ``kernels/`` goes in as ``polar_sparsity.kernels``.

PyPI's ``kernels`` distribution installs a top-level ``kernels`` module (transformers imports it); ours
must neither overwrite it when installed nor hide it where the checkout's root is on sys.path.
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
            str(source),
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


def _python(code: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *flags, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_the_checkout_root_on_sys_path_leaves_the_name_kernels_to_pypi(tmp_path: Path) -> None:
    # A stand-in for PyPI's distribution, found after the checkout's root (as `python train.py` sees it).
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("ORIGIN = 'pypi'\n")
    code = (
        f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(tmp_path)!r}]\n"
        "from kernels import ORIGIN\n"
        "import polar_sparsity.kernels as ours\n"
        "print(ORIGIN, sys.modules['kernels'].__file__, ours.selective_up.__module__)\n"
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr
    origin, path, module = done.stdout.split()
    assert origin == "pypi" and Path(path) == tmp_path / "kernels" / "__init__.py"
    assert module == "polar_sparsity.kernels.selective_mlp_up"


def test_without_pypi_kernels_the_name_kernels_stays_missing() -> None:
    # -S: no site-packages, so no other ``kernels`` anywhere; the checkout's folder must not stand in.
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
        "try:\n    import kernels\nexcept ModuleNotFoundError as e:\n"
        "    print(e.name, 'kernels' in sys.modules)\n"
    )
    done = _python(code, "-S")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["kernels", "False"]
