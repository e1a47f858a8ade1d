"""Shared helpers for the kernel wrappers: argument checks, sizes, launch-time facts.

Nothing here knows about models. Every check raises ``ValueError`` / ``TypeError`` with a message that
names the offending argument, its value and what would be valid, so a caller can fix the call site
without reading kernel code.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any, NamedTuple

import torch

try:  # host tensor descriptors (TMA copies) arrived in Triton 3.4; older releases copy tiles per thread
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

LOW_PRECISION = (torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (64, 80, 96, 128)


def interpret_mode() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (>= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def bucket(n: int) -> int:
    """Power-of-two bucket used as a tuning key, so a new k or batch never triggers a new tune."""
    return next_pow2(max(int(n), 1))


def is_capturing() -> bool:
    """True while a CUDA graph is being captured (no host syncs, no tuning runs allowed then)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


_planned_sms: int | None = None  # see planning_for_sms


@contextmanager
def planning_for_sms(sms: int) -> Iterator[None]:
    """Plan every launch (heuristics, waves, stream-K programs) for ``sms`` SMs instead of the whole GPU,
    inside the block: for work confined to part of the GPU by a CUDA green context
    (``kernels.bench.config_sweep --sms``), which the device properties do not show."""
    global _planned_sms
    before, _planned_sms = _planned_sms, sms
    try:
        yield
    finally:
        _planned_sms = before


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # interpreter: any small number keeps the launch grids tiny
    if _planned_sms is not None:
        return _planned_sms
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


@cache  # every launch asks; reading the device properties took ~5 us a call on an H200 host
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def max_shared_memory(device: torch.device) -> int:
    """Shared memory one program may use (bytes): bounds the pipeline stages a config may ask for."""
    if device.type != "cuda":
        return 228 * 1024  # interpreter: no limit that matters
    return _cuda_shared_memory(device.index if device.index is not None else torch.cuda.current_device())


@cache
def _cuda_shared_memory(index: int) -> int:
    from triton.runtime import driver

    return int(driver.active.utils.get_device_properties(index)["max_shared_mem"])


# Compute capability majors whose tensor cores take both operand tiles from registers (``mma.sync``:
# 8 Ampere and Ada, 12 consumer Blackwell), so a tile's accumulators and K-step operands share a
# thread's 255 registers; Hopper's ``wgmma`` (9) and datacenter Blackwell's ``tcgen05`` (10) read
# them from shared memory.
MMA_SYNC_MAJORS = (8, 12)


@cache
def operands_in_registers(device: torch.device) -> bool:
    """Whether this GPU's tensor cores take their operands from registers (see :data:`MMA_SYNC_MAJORS`);
    False in the interpreter, which models no GPU."""
    if device.type != "cuda":
        return False
    return tensor_cores_read_registers(torch.cuda.get_device_capability(device)[0])


def tensor_cores_read_registers(major: int) -> bool:
    """:func:`operands_in_registers` of a compute-capability major (for GPUs known by name only)."""
    return major in MMA_SYNC_MAJORS


TMA_MAJOR = 9  # Hopper and later copy tiles with the tensor memory accelerator (TMA)


def tma_feeds_shared_memory_mma(major: int) -> bool:
    """Whether a GPU of this compute capability major copies tiles by TMA into shared memory that its
    tensor cores read directly (Hopper 9.x, datacenter Blackwell 10.x): where the descriptor path was
    measured. Before Hopper, Triton lowers a descriptor load to plain loads outside the copy pipeline;
    consumer Blackwell (12.x) has TMA but reads operands from registers, and was not measured. False
    on any GPU under a Triton without host tensor descriptors (before 3.4)."""
    return TensorDescriptor is not None and major >= TMA_MAJOR and major not in MMA_SYNC_MAJORS


@cache
def has_tma(device: torch.device) -> bool:
    """:func:`tma_feeds_shared_memory_mma` for this GPU. The interpreter runs tensor descriptors too:
    True there where this Triton has them, so the CPU tests cover the descriptor path."""
    if device.type != "cuda":
        return TensorDescriptor is not None
    return tma_feeds_shared_memory_mma(torch.cuda.get_device_capability(device)[0])


class GpuFacts(NamedTuple):
    """What the GEMM heuristics and candidate lists know of a GPU."""

    sms: int
    smem: int  # bytes of shared memory one program may use
    operands_in_registers: bool  # see MMA_SYNC_MAJORS
    tma: bool  # see has_tma


def gpu_facts(device: torch.device) -> GpuFacts:
    """Every op call asks: each fact is read from the device once and cached where it is read (the SM
    count honours :func:`planning_for_sms`)."""
    return GpuFacts(
        num_sms(device), max_shared_memory(device), operands_in_registers(device), has_tma(device)
    )


# A tile fits a thread's registers on an ``mma.sync`` GPU with at most 64 fp32 accumulators a thread
# and K-steps of at most 128: no GEMM tile within both bounds spilled, and every tile that spilled
# broke one of them (compiled for sm_80 and sm_89 with Triton 3.6, 2026-11-29: up to 20 KB of stack
# at 128 accumulators).
REGISTER_ACCUMULATORS = 64
REGISTER_STEP = 128


def fit_registers(
    bm: int, bn: int, bk: int, num_warps: int, accumulators: int, operands_in_registers: bool
) -> tuple[int, int]:
    """(BLOCK_K, num_warps) of a ``bm`` x ``bn`` tile (``accumulators`` fp32 tiles of that size) that
    compiles without spilling: on an ``mma.sync`` GPU, steps of at most :data:`REGISTER_STEP` and up to
    8 warps to hold the accumulators; unchanged where the operands come from shared memory."""
    if not operands_in_registers:
        return bk, num_warps
    while num_warps < 8 and not accumulators_fit(bm, bn, num_warps, accumulators):
        num_warps *= 2
    return min(bk, REGISTER_STEP), num_warps


def accumulators_fit(bm: int, bn: int, num_warps: int, accumulators: int = 1) -> bool:
    """Whether ``accumulators`` fp32 ``bm`` x ``bn`` tiles leave an ``mma.sync`` thread room for its
    operands (:data:`REGISTER_ACCUMULATORS` a thread)."""
    return accumulators * bm * bn <= REGISTER_ACCUMULATORS * 32 * num_warps


def fit_steps(bk: int, wanted: int, stage_bytes: Callable[[int], int], smem: int) -> tuple[int, int]:
    """(BLOCK_K, stages): ``wanted`` stages of ``bk``-long steps where at least three of them (or all
    wanted, if fewer) fit in shared memory; else steps halved, down to 32, until they do. A GPU with
    less shared memory (99 KB on Ada and consumer Blackwell, 163 KB on an A100) then keeps copies in
    flight while it multiplies instead of running one unpipelined stage of a long step."""
    least = min(wanted, 3)
    while bk > 32 and fit_stages(wanted, stage_bytes(bk), smem) < least:
        bk //= 2
    return bk, fit_stages(wanted, stage_bytes(bk), smem)


def fit_tile(
    bm: int,
    bn: int,
    bk: int,
    num_warps: int,
    stages: int,
    accumulators: int,
    stage_bytes: Callable[[int], int],
    smem: int,
    operands_in_registers: bool,
) -> tuple[int, int, int]:
    """(BLOCK_K, num_warps, stages) of a ``bm`` x ``bn`` tile on this GPU: its registers first
    (:func:`fit_registers`), then as many of ``stages`` as shared memory holds, with shorter steps
    before fewer stages (:func:`fit_steps`; ``stage_bytes(bk)`` is one stage's bytes)."""
    bk, num_warps = fit_registers(bm, bn, bk, num_warps, accumulators, operands_in_registers)
    bk, stages = fit_steps(bk, stages, stage_bytes, smem)
    return bk, num_warps, stages


def fit_stages(wanted: int, stage_bytes: int, smem: int) -> int:
    """The most pipeline stages <= ``wanted`` whose buffers (``stage_bytes`` each) fit in ``smem``
    (with 8 KB kept for the epilogue and scratch); at least 1."""
    return max(1, min(wanted, (smem - 8192) // max(stage_bytes, 1)))


def fitting_tiles(
    tiles: list[tuple[int, ...]], stage_bytes: Callable[..., int], smem: int
) -> list[tuple[int, ...]]:
    """Tuning candidates' tiles on this GPU: each ``(*shape, stages)`` with as many of its stages as
    fit in shared memory (:func:`fit_stages`; a launch that does not fit fails), dropped where fewer
    than two would, and each resulting tile once. ``stage_bytes(*shape)`` gives one stage's bytes."""
    out: list[tuple[int, ...]] = []
    for *shape, wanted in tiles:
        tile = (*shape, fit_stages(wanted, stage_bytes(*shape), smem))
        if tile[-1] >= 2 and tile not in out:
            out.append(tile)
    return out


def check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}; move it there")


def check_kernel_device(device: torch.device) -> None:
    """Kernels run on CUDA, or on the CPU only through the Triton interpreter."""
    if device.type == "cuda":
        return
    if device.type == "cpu" and interpret_mode():
        return
    raise ValueError(
        f"inputs are on {device}; the Triton kernels need CUDA tensors "
        "(CPU tensors are accepted only with TRITON_INTERPRET=1 set before triton is imported)"
    )


def check_dtype(name: str, t: torch.Tensor, allowed: Sequence[torch.dtype]) -> None:
    if t.dtype not in allowed:
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of {list(allowed)}")


def check_same_dtype(name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but must match the activations' dtype {dtype}")


def check_ndim(name: str, t: torch.Tensor, ndim: int, layout: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}; got shape {tuple(t.shape)}")


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int], layout: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} {layout}; got {tuple(t.shape)}")


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    # Kernels address rows with strides but assume unit stride along the innermost axis so that
    # loads are 16-byte vectors; a transposed view would silently turn them into gathers.
    if t.stride(-1) != 1:
        raise ValueError(
            f"{name} must have unit stride in its last dim (got strides {t.stride()}); "
            "call .contiguous() once when the tensor is created"
        )


def check_contiguous_vector(name: str, t: torch.Tensor) -> None:
    # 1-D operands (biases, lengths, indices) are read at unit stride: a strided view such as b[::2]
    # would silently read the wrong elements.
    if t.dim() != 1 or t.stride(0) != 1:
        raise ValueError(
            f"{name} must be a contiguous 1-D tensor (got shape {tuple(t.shape)}, strides {t.stride()}); "
            "call .contiguous() once when the tensor is created"
        )


# Unit indices (heads, KV groups, neurons) may be int32 or torch.topk's own int64: no conversion
# kernel between a router's top-k and the op that uses it.
INDEX_DTYPES = (torch.int32, torch.int64)


def check_index_tensor(
    name: str, idx: torch.Tensor, device: torch.device, allowed: Sequence[torch.dtype] = (torch.int32,)
) -> None:
    if idx.dtype not in allowed:
        expected = " or ".join(str(d) for d in allowed)
        raise TypeError(f"{name} has dtype {idx.dtype}; expected {expected}")
    check_device(name, idx, device)


def check_index_range(name: str, idx: torch.Tensor, upper: int, validate: bool) -> None:
    """Range-check indices on the host when it is cheap and legal (never during graph capture).

    The kernels themselves skip out-of-range indices, so a skipped check can never fault memory;
    this check only turns a silent skip into a clear error for eager callers.
    """
    if not validate or idx.numel() == 0 or is_capturing():
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= upper:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} holds index {bad}; valid indices are 0..{upper - 1}")


_COUNTERS: dict[tuple, torch.Tensor] = {}


def split_counters(device: torch.device, n: int) -> torch.Tensor:
    """A zeroed int32 buffer of >= n arrival counters for in-kernel split-K reductions.

    A split kernel's programs of one output tile each add 1 to the tile's counter after storing their
    partial sum; the last to arrive sums all partials in split order (deterministic) and resets the
    counter to 0, so the buffer is zero again whenever a launch has finished and can be reused without
    a memset. Cached per (device, stream): launches on one stream never overlap. (Two CUDA graphs
    captured on the same stream and replayed concurrently on different streams would share counters;
    replay such graphs one after the other.) If the first split launch on a stream happens during graph
    capture, the buffer is allocated in the graph's pool and its zero-fill becomes a node of that graph
    (harmless: it runs before the graph's kernels); the cache keeps the tensor alive.
    """
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(4096, next_pow2(n)), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


def resident_programs(num_warps: int, smem_per_program: int, smem: int, registers: int = 168) -> int:
    """Programs one SM holds at once: by shared memory, and by registers (``registers`` of the 64K
    32-bit registers per thread: a tensor-core tile program takes ~168, so 8 warps hold an SM alone;
    a kernel whose count was measured passes it)."""
    return max(1, min(smem // max(smem_per_program, 1), 65536 // (num_warps * 32 * registers)))


@dataclass(frozen=True)
class LaunchPlan:
    """One kernel launch worked out from sizes and a config alone, with no tensors: the wrappers
    launch it, and ``kernels.bench.compiled`` compiles it for GPUs it does not have, so both take
    their grid, sizes and compile-time arguments from the same rule."""

    kernel: Any  # a triton.JITFunction
    grid: tuple[int, ...]
    scalars: dict[str, int]  # integer arguments by name
    constexprs: dict[str, Any]  # compile-time arguments by name, with num_warps and num_stages
    partial_slots: int = 1  # fp32 partial sums per output tile (1: nothing is split)
    counters: int = 0  # arrival counters of the split sums (output tiles, or pairs in attention)

    def runtime_names(self) -> list[str]:
        """The kernel's arguments passed at run time (all but its compile-time ones), in order."""
        return [name for name in self.kernel.arg_names if name not in self.constexprs]

    def launch(self, **pointers: Any) -> None:
        """Launch with the tensor (and descriptor or float) arguments by name."""
        values = pointers | self.scalars
        # Positional: Triton binds keyword arguments slower (a 20-argument no-op kernel on an H200 host:
        # 33.2 against 27.9 us a launch).
        self.kernel[self.grid](*[values[name] for name in self.runtime_names()], **self.constexprs)


def gemm_stream_k_launch(
    kernel: Any, tiles: int, steps: int, programs: int, scalars: dict[str, int], constexprs: dict[str, Any]
) -> LaunchPlan:
    """A selective GEMM's stream-K launch: ``tiles`` output tiles of ``steps`` reduction steps each,
    dealt out to about ``programs`` programs (:func:`stream_k_plan`); the kernel takes ``steps``,
    ``share`` and ``total`` besides ``scalars``."""
    share, launched, slots = stream_k_plan(tiles * steps, steps, programs)
    return LaunchPlan(
        kernel,
        (launched,),
        scalars | dict(steps=steps, share=share, total=tiles * steps),
        constexprs | dict(SPLIT=slots > 1),
        slots,
        tiles,
    )


def split_workspace(
    out: torch.Tensor, shape: tuple[int, ...], tiles: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 partial sums of ``shape`` (leading dim: partial slots per tile) and ``tiles`` arrival
    counters; with one slot nothing is split, and ``out`` stands in, unread, for both."""
    if shape[0] == 1:
        return out, out
    return torch.empty(shape, device=out.device, dtype=torch.float32), split_counters(out.device, tiles)


def split_chunks(length: int, block: int, wanted: int) -> tuple[int, int]:
    """Split-K of a reduction of ``length`` into about ``wanted`` chunks of whole ``block`` steps.

    Returns (chunk, splits): the chunk length and the splits it really makes (rounding to whole
    steps can leave fewer than asked; never an empty split, never more splits than steps).
    """
    steps = cdiv(length, block)
    chunk = cdiv(steps, max(1, min(wanted, steps))) * block
    return chunk, cdiv(length, chunk)


def stream_k_plan(total: int, steps: int, programs: int, min_share: int = 2) -> tuple[int, int, int]:
    """Stream-K schedule of a split reduction (GEMM or attention): deal ``total`` tile-major (tile, step)
    iterations, ``steps`` per tile, to about ``programs`` programs (one per resident slot).

    Returns (share, programs, slots): equal shares of >= ``min_share`` steps (a program pays its
    pipeline start-up once per tile it touches), the programs that makes, and the most programs one
    tile's steps can span (partial-sum slots per tile; 1 when shares hold whole tiles and nothing is
    split). The kernels find a tile's programs as ``tile * steps // share`` to
    ``((tile + 1) * steps - 1) // share``.
    """
    if programs < 1:
        raise ValueError(
            f"stream-K needs at least one program; got {programs} "
            "(a config's 'stream_k' is programs per SM, >= 1)"
        )
    share = max(cdiv(total, programs), min(min_share, steps))
    slots = 1 if share % steps == 0 else cdiv(steps - 1, share) + 1
    return share, cdiv(total, share), slots


def whole_wave_tiles(tiles: int, slots: int) -> int:
    """Tiles of the whole waves of ``slots`` programs: a split schedule that splits only the tiles of
    the last, partial wave runs these whole (all tiles when the waves are whole)."""
    if slots < 1:
        raise ValueError(
            f"a last-wave split needs at least one program slot; got {slots} "
            "(a config's 'last_wave_split' is programs per SM, >= 1)"
        )
    return tiles // slots * slots
