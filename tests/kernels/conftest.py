"""Kernel tests run on a GPU when there is one, else in Triton's CPU interpreter.

TRITON_INTERPRET is set by ``tests/conftest.py``, which pytest loads before anything imports Triton.
"""

import os

import pytest
import torch

from polar_sparsity.kernels import _tuning

HERE = os.path.dirname(__file__)
# Tests never tune by default (GPU tests at real shapes would spend minutes timing candidates): they
# use the shipped table of the GPU, else the heuristic. Tuning tests switch it on for themselves.
os.environ.setdefault(_tuning.MODE_ENV, "cached")


@pytest.fixture(autouse=True, scope="session")
def _private_tuning_cache(tmp_path_factory):
    """Keep the user's tuning cache out of the tests (and the tests out of it)."""
    _tuning.set_cache_dir(tmp_path_factory.mktemp("kernel_cache"))
    yield
    _tuning.set_cache_dir(None)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    reason = "needs CUDA (GPU test at real shapes; run `pytest -m gpu` on a GPU machine)"
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords and str(item.fspath).startswith(HERE):
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    """Where the small tests run: the GPU if present, else the CPU (through the interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def force_config(monkeypatch):
    """Make every op launch with the given config (to reach split / non-split / dot paths)."""

    def apply(cfg: dict) -> None:
        monkeypatch.setattr(_tuning, "pick", lambda key, device, heuristic, *launch_args: dict(cfg))

    return apply


@pytest.fixture
def gen() -> torch.Generator:
    """Fresh random inputs each test, reproducible from the printed seed on failure."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)
