"""Launch-config selection, per GPU: shipped table -> user cache -> first-use tuning -> heuristic.

Keys are strings built from *bucketed* sizes (powers of two of k, batch x k, context), never the exact
k, so a new k reuses the bucket's config instead of re-tuning. For a key, the first source that has it
wins:

1. a shipped table (``kernels/tuned_*.json``) whose ``gpu`` field equals the GPU's exact name
   (``torch.cuda.get_device_name``); a table for another GPU never applies;
2. the user cache: one JSON file per (GPU name, Triton version) in :func:`cache_dir`
   (``$POLAR_SPARSITY_KERNEL_CACHE``, else ``${XDG_CACHE_HOME:-~/.cache}/polar_sparsity/kernels``,
   file ``<gpu>-triton<version>-v<layout>.json``);
3. tuning, the first time the key is met outside CUDA-graph capture: every candidate is timed by
   CUDA-graph replay with L2 cleared before each launch (as the benchmarks time the ops), and its
   result compared with the heuristic config's (:class:`OutputCheck`); the fastest that agrees
   is stored in the cache (file lock + merge + atomic rename: concurrent processes keep each other's
   entries) and reused by later processes;
4. the op's heuristic (a function of shape and SM count, never of the GPU name): always during graph
   capture when nothing above has the key, and whenever tuning is switched off. Unlike a tuned
   config, which serves every shape of its key's bucket, the heuristic sees each call's exact shape.

The mode (``$POLAR_SPARSITY_KERNEL_TUNING`` or :func:`set_mode`): ``tune`` (default, all four steps),
``cached`` (steps 1, 2, 4: never tune) or ``heuristic`` (step 4 only). The same cache holds the
measured sparse-vs-dense crossovers of :mod:`kernels.dense_fallback`. ``$POLAR_SPARSITY_KERNEL_TUNE_LOG``
names a CSV that tuning appends every timed candidate to (GPU, key, config, microseconds): the data
behind a pick, or behind a heuristic rule.
"""

from __future__ import annotations

import csv
import json
import os
import re
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from functools import cache, lru_cache
from pathlib import Path

import torch

# Absolute import: the folder is also importable as a top-level `kernels` from a checkout root (e.g.
# when a library probes for the PyPI `kernels` package), where a relative `..` would fail.
from polar_sparsity.reporting import locked, write_json_atomic

from ._common import is_capturing
from .testing import agreement_tol, rel_error

Config = dict[str, int]
TABLES_DIR = Path(__file__).parent  # shipped tables: tuned_<gpu>.json, each naming its exact GPU
CACHE_ENV = "POLAR_SPARSITY_KERNEL_CACHE"
MODE_ENV = "POLAR_SPARSITY_KERNEL_TUNING"
TUNE_LOG_ENV = "POLAR_SPARSITY_KERNEL_TUNE_LOG"
SHIPPED_ENV = "POLAR_SPARSITY_KERNEL_SHIPPED_TABLES"
MODES = ("tune", "cached", "heuristic")
# Bumped when a kernel's meaning of a config changes: caches written for another layout are not read.
CACHE_LAYOUT = 1

# Configs picked in this process from a table, the cache or tuning, by (gpu, key).
_CHOSEN: dict[tuple[str, str], Config] = {}
# Keys that fell to the heuristic, with the first shape's config (what `chosen()` reports): each call
# then takes the heuristic of its exact shape, not that of the first shape met in the key's bucket.
_HEURISTIC_KEYS: dict[tuple[str, str], Config] = {}
_TUNED: set[str] = set()  # keys tuned (timed) in this process
_SETTINGS: dict[str, object] = {}  # overrides of the environment, set by set_mode / use_shipped_tables / ...


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------


def mode() -> str:
    """The tuning mode in force: 'tune', 'cached' or 'heuristic' (see the module docstring)."""
    value = str(_SETTINGS.get("mode") or os.environ.get(MODE_ENV) or "tune").strip().lower()
    if value not in MODES:
        raise ValueError(f"{MODE_ENV}={value!r} is not a tuning mode; use one of {list(MODES)}")
    return value


def set_mode(value: str | None) -> None:
    """Set the tuning mode for this process ('tune', 'cached', 'heuristic'; None: back to the env)."""
    if value is not None and value not in MODES:
        raise ValueError(f"tuning mode {value!r} is not one of {list(MODES)}")
    _SETTINGS["mode"] = value
    _forget()


def _forget() -> None:
    """Drop the configs picked so far (a setting that changes where they come from)."""
    _CHOSEN.clear()
    _HEURISTIC_KEYS.clear()


def shipped_tables_enabled() -> bool:
    flag = _SETTINGS.get("shipped")
    if flag is None:
        return os.environ.get(SHIPPED_ENV, "1").strip() not in ("0", "false", "no")
    return bool(flag)


def use_shipped_tables(flag: bool | None) -> None:
    """Whether shipped tables are consulted (False: e.g. to measure first-use tuning on their GPU)."""
    _SETTINGS["shipped"] = flag
    _forget()


def set_force_tune(flag: bool) -> None:
    """Tune every key met, even one a table or the cache already has (``kernels.tune --retune``)."""
    _SETTINGS["force"] = flag
    _forget()


def _force_tune() -> bool:
    return bool(_SETTINGS.get("force"))


def cache_dir() -> Path:
    """The user tuning cache: ``$POLAR_SPARSITY_KERNEL_CACHE`` or the XDG cache directory."""
    override = _SETTINGS.get("cache_dir") or os.environ.get(CACHE_ENV)
    if override:
        return Path(str(override)).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "polar_sparsity" / "kernels"


def set_cache_dir(path: str | Path | None) -> None:
    """Use ``path`` as the tuning cache of this process (None: back to the environment / default)."""
    _SETTINGS["cache_dir"] = None if path is None else str(path)
    _forget()


def gpu_name(device: torch.device) -> str:
    """Exact name tables and cache entries are keyed by ('' for the CPU interpreter)."""
    if device.type != "cuda":
        return ""
    return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())


@cache
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def triton_version() -> str:
    import triton

    return triton.__version__


# ----------------------------------------------------------------------------------------------
# Shipped tables and the user cache
# ----------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def shipped_tables() -> dict[str, dict]:
    """Shipped tables by the exact GPU name in their ``gpu`` field."""
    tables = {}
    for path in sorted(TABLES_DIR.glob("tuned_*.json")):
        table = json.loads(path.read_text())
        tables[table["gpu"]] = table
    return tables


def shipped_config(key: str, gpu: str) -> Config | None:
    """The shipped table's config for ``key`` on the GPU named exactly ``gpu``, if any."""
    if not shipped_tables_enabled():
        return None
    cfg = shipped_tables().get(gpu, {}).get("configs", {}).get(key)
    return None if cfg is None else dict(cfg)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "unknown"


class TuningCache:
    """The user cache file of one GPU and Triton version: ``{"configs": {...}, "crossovers": {...}}``.

    Reads tolerate a corrupt file (a warning, then it counts as empty, so its keys are tuned again and
    the next write replaces it); entries recorded for another GPU or Triton version are ignored. Writes
    take a file lock, re-read the file, merge the new entries in and rename a temporary file over it,
    so two processes tuning at once keep both their entries.
    """

    def __init__(self, directory: Path, gpu: str, triton: str):
        self.gpu, self.triton = gpu, triton
        self.path = Path(directory) / f"{_safe(gpu)}-triton{_safe(triton)}-v{CACHE_LAYOUT}.json"

    def _read(self) -> dict:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict):
                raise ValueError(f"top level is {type(data).__name__}, not an object")
        except (OSError, ValueError) as exc:
            warnings.warn(
                f"kernel tuning cache {self.path} is unreadable ({exc}); "
                "ignoring it, its keys are tuned again",
                stacklevel=3,
            )
            return {}
        if data.get("gpu") != self.gpu or data.get("triton") != self.triton:
            return {}  # another GPU's or Triton version's entries (e.g. a copied file): never used
        return data

    def section(self, name: str) -> dict:
        return dict(self._read().get(name, {}))

    def get(self, key: str, section: str = "configs"):
        return self._read().get(section, {}).get(key)

    def put(self, entries: dict, section: str = "configs") -> None:
        with locked(self.path):
            data = self._read()
            merged = {"gpu": self.gpu, "triton": self.triton, "configs": {}, "crossovers": {}}
            for name in ("configs", "crossovers"):
                merged[name].update(data.get(name, {}))
            merged[section].update(entries)
            write_json_atomic(self.path, merged)


def user_cache(device: torch.device) -> TuningCache:
    return TuningCache(cache_dir(), gpu_name(device), triton_version())


# ----------------------------------------------------------------------------------------------
# Timing (as the benchmarks time the ops: CUDA-graph replay, L2 cleared before each launch)
# ----------------------------------------------------------------------------------------------


def event_median_us(call: Callable[[], object], reps: int) -> float:
    """Median microseconds of ``call`` between two CUDA events, over ``reps`` calls."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def graph_replay_us(
    fns: Sequence[Callable[[], object]], reps: int, device: torch.device | None = None
) -> float:
    """Median microseconds of one replay of a CUDA graph that runs ``fns`` in order.

    Each function first runs once eagerly on a side stream (compiles, picks configs, allocates; a
    config that does not fit raises here), then all are captured in one graph, replayed once to warm
    up and timed by :func:`event_median_us`. Graph replay removes the host launch overhead that
    would dominate 10-100 us kernels.
    """
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for f in fns:
            f()
    torch.cuda.current_stream(device).wait_stream(stream)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    # A graph's kernels run on the SMs of the stream it was captured on, wherever it is replayed: capture
    # on the caller's stream when that is a side stream (one of a green context holding part of the GPU,
    # H200 2026-11-29: captured elsewhere, a 64-SM context's replays ran on all 132), else on a side
    # stream of the graph's own (the default stream cannot capture).
    current = torch.cuda.current_stream(device)
    on_caller = current != torch.cuda.default_stream(device)
    with torch.cuda.graph(graph, stream=current if on_caller else None):
        for f in fns:
            f()
    graph.replay()
    torch.cuda.synchronize(device)
    return event_median_us(graph.replay, reps)


class GraphTimer:
    """Microseconds per launch, each from a cold L2, timed like the benchmarks.

    ``calls`` launches, each after a read of twice the L2 size (evicts without dirtying it), are
    captured in one CUDA graph; the replay's median minus that of the reads alone (measured once per
    timer), divided by ``calls``, is the time of one launch. Graph replay removes the host launch
    overhead that would dominate single launches of 10-100 us kernels and mis-rank their configs.
    """

    def __init__(self, device: torch.device, reps: int = 8, calls: int = 3):
        self.device, self.reps, self.calls = device, reps, calls
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 * 2**20)
        self._flush = torch.ones(l2, dtype=torch.float16, device=device)  # 2 x L2 bytes
        self._sink = torch.empty((), dtype=torch.float32, device=device)
        self._reads_us: float | None = None

    def _clear(self) -> None:
        torch.sum(self._flush, dim=0, dtype=torch.float32, out=self._sink)

    def _replay_us(self, body: Callable[[], object]) -> float:
        return graph_replay_us([body] * self.calls, self.reps, self.device)

    def __call__(self, launch: Callable[[], object]) -> float:
        if self._reads_us is None:
            self._reads_us = self._replay_us(self._clear)

        def cold():
            self._clear()
            launch()

        return max(self._replay_us(cold) - self._reads_us, 0.0) / self.calls


def schedule(cfg: Config) -> str:
    """How a config spreads its work: ``stream-K`` (one program per resident slot, equal shares of
    the iterations), ``last-wave split`` (one program per tile, the last partial wave's tiles split)
    or ``grid`` (one program per tile, or per tile and split)."""
    if cfg.get("stream_k", 0):
        return "stream-K"
    return "last-wave split" if cfg.get("last_wave_split", 0) else "grid"


def best_by_schedule(timed: Sequence[tuple[Config, float]]) -> str:
    """``grid 23.1 us, stream-K 21.9 us``: the fastest timed config of each schedule, for tuning logs."""
    fastest: dict[str, float] = {}
    for cfg, us in timed:
        fastest[schedule(cfg)] = min(us, fastest.get(schedule(cfg), us))
    return ", ".join(f"{name} {us:.1f} us" for name, us in sorted(fastest.items()))


class OutputCheck:
    """Keeps a timed config only where it computes what the first config that ran computed.

    Timing alone keeps the fastest config even where it is wrong (a kernel bug at one shape, a
    miscompile on one GPU or Triton version), and a wrong kernel is often a fast one. Every config
    timed for a key writes the same output buffer from the same inputs, so each result is compared
    with the first one's: the heuristic's config, which tuning times first and the GPU tests check
    against the torch references. The buffer is NaN-filled before each config, so elements a config
    leaves unwritten cannot pass for the previous config's, and it is given back with the content it
    had (on leaving the ``with`` block). ``out=None``: nothing to compare, every config is kept.
    """

    def __init__(self, out: torch.Tensor | None):
        self.out = out
        self._found = None if out is None else out.clone()
        self._reference: torch.Tensor | None = None

    def __enter__(self) -> OutputCheck:
        return self

    def __exit__(self, *exc_info) -> None:
        if self.out is not None:
            self.out.copy_(self._found)

    def before(self) -> None:
        """Call before each config runs."""
        if self.out is not None:
            self.out.fill_(float("nan"))

    def difference(self) -> float | None:
        """After a config ran: its relative difference from the reference where that exceeds what
        rounding explains (:func:`agreement_tol`), else None. The first config to run sets the reference."""
        if self.out is None:
            return None
        if self._reference is None:
            self._reference = self.out.clone()
            return None
        diff = rel_error(self.out, self._reference)
        return diff if diff > agreement_tol(self.out.dtype) else None


def tune(
    key: str,
    candidates: Iterable[Config],
    time_config: Callable[[Config], float],
    device: torch.device,
    out: torch.Tensor | None,
) -> Config:
    """Time each candidate (``time_config``: its microseconds, running the op into ``out``) and return
    the fastest that compiles, fits and computes what the first one did (:class:`OutputCheck`)."""
    tune_log_path()  # a bad log path is named before the timing, not after
    t0 = time.time()
    best, best_us, errors, tried, timed = None, float("inf"), [], 0, []
    with OutputCheck(out) as check:
        for cfg in candidates:
            tried += 1
            check.before()
            try:
                us = time_config(cfg)
            except Exception as exc:  # noqa: BLE001 - a config that does not fit (registers, smem) is skipped
                torch.cuda.synchronize(device)
                first_line = str(exc).splitlines()[0][:200] if str(exc) else ""
                errors.append(f"{cfg}: {type(exc).__name__}: {first_line}")
                continue
            if (diff := check.difference()) is not None:
                warn_wrong_result(key, cfg, diff)
                continue
            timed.append((cfg, us))
            if us < best_us:
                best, best_us = cfg, us
    log_candidates(gpu_name(device), key, timed)
    if best is None:
        raise RuntimeError(f"no candidate config could be launched for {key}; first errors: {errors[:3]}")
    print(
        f"[tune] {key}: {best} {best_us:.1f} us ({tried} tried, {time.time() - t0:.1f} s; "
        f"{best_by_schedule(timed)})",
        flush=True,
    )
    return dict(best)


def warn_wrong_result(key: str, cfg: Config, diff: float) -> None:
    """A config whose result is not the reference's: never kept, and worth a bug report."""
    warnings.warn(
        f"kernel config {cfg} for {key} computes a different result from the first config that ran "
        f"(the heuristic's where it fits; relative difference {diff:.2e}); it is not used. Please "
        "report it with your GPU and Triton version.",
        stacklevel=2,
    )


def tune_log_path() -> Path | None:
    """``$POLAR_SPARSITY_KERNEL_TUNE_LOG`` as a CSV path that can be appended to (None if unset).

    Checked before any candidate is timed, so a bad value never costs a tuning run."""
    value = os.environ.get(TUNE_LOG_ENV)
    if not value:
        return None
    path = Path(value).expanduser()
    if path.is_dir() or not path.parent.is_dir():
        raise ValueError(
            f"{TUNE_LOG_ENV}={value!r} must name a CSV file in an existing directory "
            "(appended to; created if missing)"
        )
    return path


def log_candidates(gpu: str, key: str, timed: Sequence[tuple[Config, float]]) -> None:
    """Append the timed candidates of one key to ``$POLAR_SPARSITY_KERNEL_TUNE_LOG`` (if set)."""
    path = tune_log_path()
    if path is None or not timed:
        return
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["gpu", "key", "schedule", "us", "config"])
        for cfg, us in timed:
            writer.writerow([gpu, key, schedule(cfg), f"{us:.2f}", json.dumps(cfg, sort_keys=True)])


# ----------------------------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------------------------


def known_config(key: str, device: torch.device) -> Config | None:
    """The config a shipped table or the user cache holds for ``key`` on this GPU (None if neither)."""
    return _known(key, gpu_name(device), user_cache(device))


def _known(key: str, gpu: str, cache: TuningCache) -> Config | None:
    cfg = shipped_config(key, gpu)
    if cfg is None:
        cached = cache.get(key)
        cfg = dict(cached) if cached is not None else None
    return cfg


def with_first(first: Iterable[Config | None], candidates: Iterable[Config]) -> list[Config]:
    """``candidates`` with the configs of ``first`` (None skipped) timed before them, each config once:
    a tuning run then never keeps a config slower than the heuristic's or a known one."""
    out: list[Config] = []
    for cfg in (*first, *candidates):
        if cfg is not None and cfg not in out:
            out.append(dict(cfg))
    return out


def pick(
    key: str,
    device: torch.device,
    heuristic: Callable[[], Config],
    candidates: Callable[[], list[Config]],
    launch: Callable[[Config], None],
    out: torch.Tensor | None,
) -> Config:
    """Return the launch config for ``key`` (memoised per process and GPU). ``launch(cfg)`` runs the op
    under a config, writing ``out`` (which tuning checks; None: nothing to check)."""
    if device.type != "cuda":  # the CPU interpreter: nothing to time
        return dict(heuristic())
    gpu = gpu_name(device)
    if (gpu, key) in _CHOSEN:  # the hot path of every op call: no cache object, no file access
        return _CHOSEN[(gpu, key)]
    if (gpu, key) in _HEURISTIC_KEYS:
        return dict(heuristic())

    def run_tuning() -> Config:
        timer = GraphTimer(device)
        configs = with_first([heuristic()], candidates())
        return tune(key, configs, lambda cfg: timer(lambda: launch(cfg)), device, out)

    return resolve(key, gpu, user_cache(device), heuristic, run_tuning, capturing=is_capturing())


def resolve(
    key: str,
    gpu: str,
    cache: TuningCache,
    heuristic: Callable[[], Config],
    run_tuning: Callable[[], Config],
    capturing: bool = False,
) -> Config:
    """The selection order of the module docstring for one key, given how to tune it."""
    memo = (gpu, key)
    if memo in _CHOSEN:
        return _CHOSEN[memo]
    current = mode()
    if current == "heuristic":
        return _use_heuristic(memo, heuristic)
    cfg = None if _force_tune() else _known(key, gpu, cache)
    if cfg is None and current == "tune":
        if capturing:
            # A capture must not launch timing runs: use the heuristic for this graph, but do not
            # memoise it, so the next eager call still tunes the key.
            return dict(heuristic())
        cfg = run_tuning()
        cache.put({key: dict(cfg)})
        _TUNED.add(key)
    if cfg is None:
        return _use_heuristic(memo, heuristic)
    _CHOSEN[memo] = dict(cfg)
    return _CHOSEN[memo]


def _use_heuristic(memo: tuple[str, str], heuristic: Callable[[], Config]) -> Config:
    cfg = dict(heuristic())
    _HEURISTIC_KEYS.setdefault(memo, cfg)
    return cfg


def record(key: str, cfg: Config, device: torch.device) -> None:
    """Store a config tuned elsewhere (e.g. a benchmark's sweep) in the user cache and this process."""
    user_cache(device).put({key: dict(cfg)})
    _CHOSEN[(gpu_name(device), key)] = dict(cfg)
    _HEURISTIC_KEYS.pop((gpu_name(device), key), None)
    _TUNED.add(key)


def chosen() -> dict[str, Config]:
    """Configs picked so far in this process, by key."""
    return {key: dict(cfg) for (_, key), cfg in (_HEURISTIC_KEYS | _CHOSEN).items()}


def tuned_keys() -> set[str]:
    """Keys timed (tuned) in this process."""
    return set(_TUNED)


def warm_up(calls: Iterable[Callable[[], object]]) -> None:
    """Run each op call once eagerly, outside graph capture, so every key it meets is resolved.

    The decoder calls this with the exact calls its CUDA graph will capture (same shapes, and so the
    same keys): tuning, compilation and cache reads then happen here, never during capture.
    """
    if is_capturing():
        raise RuntimeError("warm_up must run before CUDA-graph capture, not inside it")
    for call in calls:
        call()
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def export_table(path: Path, device: torch.device, source: str) -> dict:
    """Write this GPU's cached configs as a shippable table (``kernels/tuned_<gpu>.json`` format)."""
    cache = user_cache(device)
    table = {
        "gpu": cache.gpu,
        "triton": cache.triton,
        "source": source,
        "configs": dict(sorted(cache.section("configs").items())),
    }
    write_json_atomic(path, table)
    return table
