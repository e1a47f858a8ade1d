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
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch

from ._common import is_capturing

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


def _time_ms(launch: Callable[[], None], flush: torch.Tensor, reps: int = 7) -> float:
    """Median of ``reps`` timed launches, each after overwriting L2 (cold-cache, like decode)."""
    launch()  # compile / warm up
    times = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        launch()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[reps // 2]


def _tune(key: str, candidates: list[Config], launch: Callable[[Config], None]) -> Config:
    """Time each candidate and return the fastest one that compiles and fits."""
    t0 = time.time()
    flush = torch.empty(128 * 2**20, dtype=torch.uint8, device="cuda")
    best, best_ms, errors = None, float("inf"), []
    for cfg in candidates:
        try:
            ms = _time_ms(lambda c=cfg: launch(c), flush)
        except Exception as exc:  # noqa: BLE001 - a config that does not fit (registers, smem) is skipped
            first_line = str(exc).splitlines()[0][:200] if str(exc) else ""
            errors.append(f"{cfg}: {type(exc).__name__}: {first_line}")
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        raise RuntimeError(f"no candidate config could be launched for {key}; first errors: {errors[:3]}")
    print(
        f"[tune] {key}: {best} {best_ms * 1e3:.1f} us ({len(candidates)} tried, {time.time() - t0:.1f} s)",
        flush=True,
    )
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
        cfg = _tune(key, candidates(), launch)
        _TUNED.add(key)
        _CHOSEN[key] = dict(cfg)
        _save()
    if cfg is None:
        cfg = heuristic()
    _CHOSEN[key] = dict(cfg)
    return _CHOSEN[key]


_TUNED: set[str] = set()


def record(key: str, cfg: Config) -> None:
    """Store a config tuned elsewhere (e.g. the graph-timed sweep of ``kernels.bench gemm --tune``)."""
    _CHOSEN[key] = dict(cfg)
    _TUNED.add(key)
    _save()


def chosen() -> dict[str, Config]:
    """Configs picked so far in this process (what `kernels.tune` saves)."""
    return dict(_CHOSEN)


def tuned_keys() -> set[str]:
    return set(_TUNED)


_SAVE_PATH: Path | None = None


def set_save_path(path: Path | None) -> None:
    """After every tuned key, write the tuned configs so far to ``path`` (survives a killed run)."""
    global _SAVE_PATH
    _SAVE_PATH = path


def _save() -> None:
    if _SAVE_PATH is None:
        return
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    table = {
        "gpu": "H100",
        "source": f"kernels tuning run on {gpu}",
        "configs": {k: v for k, v in sorted(_CHOSEN.items()) if k in _TUNED},
    }
    _SAVE_PATH.write_text(json.dumps(table, indent=1))


def set_force_tune(flag: bool) -> None:
    global _FORCE_TUNE
    _FORCE_TUNE = flag
