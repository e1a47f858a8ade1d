"""Small Triton device helpers shared by the kernels."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import interpret_mode


def upcast_dot(dtype: torch.dtype) -> bool:
    """Whether dot operands must be upcast to fp32.

    Triton's CPU interpreter (seen on 3.9) returns garbage for bf16 ``tl.dot``; fp32 operands hold
    bf16 values exactly, so upcasting there keeps the tested arithmetic the same. Never on a GPU.
    """
    return interpret_mode() and dtype == torch.bfloat16


@triton.jit
def dot(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


@triton.jit
def stream_k_tile(it, it_end, steps, share):
    """Where stream-K iteration ``it`` (tile-major, ``steps`` per tile) falls: its tile, the steps of
    that tile this program runs (``step_lo`` to ``step_hi``, its share ending at ``it_end``), and the
    programs the tile's steps span, the first and how many (equal shares make both divisions; the
    host side of the rule is ``_common.stream_k_plan``)."""
    tile = it // steps
    step_lo = it - tile * steps
    step_hi = tl.minimum(it_end - tile * steps, steps)
    first = tile * steps // share
    return tile, step_lo, step_hi, first, ((tile + 1) * steps - 1) // share - first + 1
