"""Timing, environment capture and CSV/PNG output shared by the benchmarks.

Timing: every measured callable is captured in a CUDA graph together with ``R`` rotated input sets
(so the bytes touched between two reads of the same data exceed L2, and back-to-back replays measure
HBM rather than cache), the set repeated to at least ``MIN_CALLS`` calls, the graph is replayed
``reps`` times with CUDA events around each replay, and the median replay time divided by the calls
in the graph is reported.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import platform
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import triton
import triton.language as tl

from polar_sparsity.reporting import atomic_path

from .. import _common as C
from .._tuning import graph_replay_us

REPS = 25
MIN_CALLS = 16  # calls per timed graph (see time_graph)


def env_info() -> dict:
    import triton

    props = torch.cuda.get_device_properties(0)
    return {
        "date": datetime.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name(0),
        "sms": props.multi_processor_count,
        "l2_bytes": getattr(props, "L2_cache_size", 50 * 2**20),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
    }


def l2_bytes() -> int:
    return getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)


def rotations(bytes_per_call: float, most: int = 16) -> int:
    """How many distinct input sets one graph cycles through so that >= 4x L2 is touched per cycle."""
    return max(1, min(most, math.ceil(4 * l2_bytes() / max(bytes_per_call, 1.0))))


def time_graph(fns: Sequence[Callable[[], object]], reps: int = REPS) -> float:
    """Median microseconds per call of ``fns`` (one call each), timed by CUDA-graph replay.

    The graph holds the calls repeated to at least ``MIN_CALLS``: the start event fires before the
    host has submitted the graph, so a graph of one call also counts the replay's launch latency
    (an H200: a one-kernel ``torch.arange`` timed 9.5-15 us alone, 1.4 us per call in a graph of 20).
    Inside the graph there remain the gaps between kernels that a captured decode step has too.
    """
    repeat = math.ceil(MIN_CALLS / len(fns))
    return graph_replay_us(list(fns) * repeat, reps) / (len(fns) * repeat)


@triton.jit
def _read_kernel(X, OUT, n_per_prog, BLOCK: tl.constexpr):
    """Stream a contiguous slice per program and keep one sum (so nothing is optimised away)."""
    base = X + tl.program_id(0).to(tl.int64) * n_per_prog
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(0, n_per_prog, BLOCK):
        acc += tl.load(base + i + tl.arange(0, BLOCK)).to(tl.float32)
    tl.store(OUT + tl.program_id(0), tl.sum(acc, 0))


_READ_BLOCK = 4096  # fp16 elements a program reads per step of _read_kernel


def read_bandwidth(gib: float = 4.0) -> float:
    """Streaming-read bandwidth in bytes/s (bytes read only): the ceiling for read-bound kernels."""
    programs = C.num_sms(torch.device("cuda")) * 16
    per = int(gib * 2**30) // 2 // programs // _READ_BLOCK * _READ_BLOCK
    x = torch.randn(per * programs, device="cuda", dtype=torch.float16)
    out = torch.empty(programs, device="cuda", dtype=torch.float32)
    best = 0.0
    for warps in (4, 8):
        us = time_graph(
            [lambda w=warps, x=x: _read_kernel[(programs,)](x, out, per, BLOCK=_READ_BLOCK, num_warps=w)]
        )
        best = max(best, x.numel() * 2 / (us * 1e-6))
    del x
    torch.cuda.empty_cache()
    return best


# Programs per SM the read floor tries (8 warps each): on the H200 (2026-11-29, 6 MB to 2.1 GB) the
# fastest of these three was within 1.5% of the fastest of 1-16 programs per SM with 4 or 8 warps at
# every size, and which of them wins moves with the size (1 at 6 MB, 2 at 12 MB, 4 from 24 MB).
_READ_PROGRAMS_PER_SM = (1, 2, 4)


@functools.cache  # one measurement per size and process
def same_bytes_read_us(nbytes: int) -> float:
    """Microseconds a plain streaming-read kernel takes to read ``nbytes`` from HBM, timed as the
    benchmarks time an op (graph replay over rotated buffers), the fastest of a few grid sizes. The
    bytes limit divides by the rate of a 4 GiB read; at tens of MB every kernel also pays launch,
    ramp-up and tail, and this is that floor measured: no kernel reading these bytes once can be
    faster."""
    elements = max(_READ_BLOCK, nbytes // 2)
    sms = C.num_sms(torch.device("cuda"))
    out = torch.empty(sms * max(_READ_PROGRAMS_PER_SM), device="cuda", dtype=torch.float32)
    best = math.inf
    for programs in sorted({min(sms * p, elements // _READ_BLOCK) for p in _READ_PROGRAMS_PER_SM}):
        per = elements // programs // _READ_BLOCK * _READ_BLOCK
        read = per * programs  # <= elements: the time is scaled up to all of them
        bufs = [torch.empty(read, device="cuda", dtype=torch.float16) for _ in range(rotations(read * 2))]
        fns = [
            lambda x=x, p=programs, n=per: _read_kernel[(p,)](x, out, n, BLOCK=_READ_BLOCK, num_warps=8)
            for x in bufs
        ]
        best = min(best, time_graph(fns) * elements / read)
        del bufs
    return best


def hbm_bandwidth(gib: float = 2.0) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    n = int(gib * 2**30) // 2
    src = torch.randn(n, device="cuda", dtype=torch.float16)
    dst = torch.empty_like(src)
    us = time_graph([lambda src=src, dst=dst: dst.copy_(src)])
    bw = 2 * src.numel() * src.element_size() / (us * 1e-6)
    del src, dst
    torch.cuda.empty_cache()
    return bw


def try_time(fn_factory: Callable[[], Sequence[Callable[[], object]]]) -> tuple[float, str]:
    """Time a baseline that may be unsupported here (e.g. an SDPA backend); NaN plus the reason if so."""
    try:
        return time_graph(fn_factory()), ""
    except Exception as exc:  # noqa: BLE001 - an unsupported backend is a recorded result, not a crash
        torch.cuda.synchronize()
        return float("nan"), f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"


def save_table(path: Path, tool: str, configs: dict, **fields: object) -> None:
    """Write tuned ``configs`` as a table ``merge_tables`` merges: this GPU, the tool that picked them
    and the environment (written to a temporary name, then renamed)."""
    env = env_info()
    table = {
        "gpu": env["gpu"],
        **fields,
        "source": f"python -m polar_sparsity.kernels.{tool} on {env['gpu']}",
        "env": env,
        "configs": dict(sorted(configs.items())),
    }
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(table, indent=1) + "\n")


def write_meta(path: Path, meta: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(meta, indent=2, default=str))


def plot(path: Path, rows: list[dict], title: str, panels: str = "shape") -> None:
    """Latency vs density: one panel per shape; series per method; dense methods as flat lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r[panels] for r in rows))
    ncols = min(4, len(shapes))
    nrows = math.ceil(len(shapes) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 4.2 * nrows), squeeze=False)
    for ax in axes.flat[len(shapes) :]:
        ax.set_visible(False)
    for ax, shape in zip(axes.flat, shapes, strict=False):
        sub = [r for r in rows if r[panels] == shape]
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, method in enumerate(dict.fromkeys(r["method"] for r in sub)):
            color = colors[i % len(colors)]
            pts = sorted((r["density"], r["latency_us"]) for r in sub if r["method"] == method)
            pts = [p for p in pts if not math.isnan(p[1])]
            if not pts:
                continue
            if len(pts) == 1:  # a dense baseline: one latency, drawn flat across the densities
                ax.axhline(pts[0][1], ls="--", lw=1, label=method, color=color)
                continue
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            ax.plot(xs, ys, "-", marker="o", ms=3, label=method, color=color)
        lim = sorted({(r["density"], r["limit_us"]) for r in sub if r.get("limit_us")})
        if lim:
            ax.plot([p[0] for p in lim], [p[1] for p in lim], ":", color="k", label="bandwidth limit")
        ax.set_title(str(shape), fontsize=9)
        ax.set_xlabel("density")
        ax.set_ylabel("latency (us)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
