"""Launch-config selection: shipped table -> optional runtime tune -> heuristic.

Keys are strings built from *bucketed* sizes (powers of two of k, batch x k, context), never the exact
k, so a new k reuses the bucket's config instead of re-tuning. The shipped table
(``tuned_h100.json``, written by ``python -m kernels.tune``) covers the decode shapes of the benchmarks
on an H100 so first calls are fast; it is used only on a GPU whose name contains the table's ``gpu``
field. Runtime tuning is opt-in (``KERNELS_AUTOTUNE=1``) and never runs while a CUDA graph is being
captured (a capture must not launch timing runs); during capture the heuristic is used instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch

from kernels._common import is_capturing

Config = dict[str, int]
TABLE_PATH = Path(__file__).with_name("tuned_h100.json")

# Chosen configs, by key; filled lazily. `kernels.tune` reads it to write a new table.
_CHOSEN: dict[str, Config] = {}
_FORCE_TUNE = False  # set by kernels.tune to tune every key it meets


@lru_cache(maxsize=1)
def _table() -> dict:
    if not TABLE_PATH.exists():
        return {"gpu": "", "configs": {}}
    return json.loads(TABLE_PATH.read_text())


def _table_applies(device: torch.device) -> bool:
    gpu = _table().get("gpu", "")
    return bool(gpu) and device.type == "cuda" and gpu in torch.cuda.get_device_name(device)


def _autotune_enabled() -> bool:
    return _FORCE_TUNE or os.environ.get("KERNELS_AUTOTUNE", "0") not in ("", "0")


def _tune(candidates: list[Config], launch: Callable[[Config], None]) -> Config:
    """Time each candidate (median of a short CUDA-event run) and return the fastest that compiles."""
    import triton.testing

    best, best_ms = None, float("inf")
    for cfg in candidates:
        try:
            ms = triton.testing.do_bench(lambda c=cfg: launch(c), warmup=5, rep=20, return_mode="median")
        except Exception:  # noqa: BLE001 - a config that does not fit (registers, smem) is skipped
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        raise RuntimeError(f"no candidate config could be launched among {candidates}")
    return best


def pick(
    key: str,
    device: torch.device,
    heuristic: Callable[[], Config],
    candidates: Callable[[], list[Config]],
    launch: Callable[[Config], None],
) -> Config:
    """Return the launch config for ``key`` (memoised per process)."""
    if key in _CHOSEN and not (_FORCE_TUNE and key not in _TUNED):
        return _CHOSEN[key]
    cfg: Config | None = None
    if not _FORCE_TUNE and _table_applies(device):
        cfg = _table()["configs"].get(key)
    if cfg is None and device.type == "cuda" and _autotune_enabled() and not is_capturing():
        cfg = _tune(candidates(), launch)
        _TUNED.add(key)
    if cfg is None:
        cfg = heuristic()
    _CHOSEN[key] = dict(cfg)
    return _CHOSEN[key]


_TUNED: set[str] = set()


def chosen() -> dict[str, Config]:
    """Configs picked so far in this process (what `kernels.tune` saves)."""
    return dict(_CHOSEN)


def tuned_keys() -> set[str]:
    return set(_TUNED)


def set_force_tune(flag: bool) -> None:
    global _FORCE_TUNE
    _FORCE_TUNE = flag
