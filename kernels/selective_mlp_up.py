"""Selective MLP up projection: only the neurons in ``idx`` (shared by the whole batch).

    relu / plain:  out[m, j] = act(x[m] . W_up[idx[j]] + b_up[idx[j]])
    gated (SwiGLU): out[m, j] = silu(x[m] . W_gate[idx[j]]) * (x[m] . W_up[idx[j]])

Weights keep the ``nn.Linear`` layout ``(n_neurons, d)``: a selected neuron is one contiguous row, so
the kernel streams exactly the selected rows once. Output is compact, (M, k), ready for
:func:`kernels.selective_mlp_down.selective_down`.

Parallelism: one program per (row tile of the batch, ``BLOCK_N`` selected neurons). When that gives
too few programs to fill the GPU (small k), the reduction over ``d`` is split across programs that
store fp32 partial sums (plain stores) and bump an arrival counter of their output tile; the last
split to arrive adds the partials in split order (deterministic) and applies bias and activation (a
nonlinearity needs the full sum first), in the same kernel. The stream-K schedule
(``_up_stream_k_kernel``) launches one program per resident slot instead, each taking an equal run of
the tile-major (tile, d step) iterations, merged the same way.
"""

from __future__ import annotations

from functools import cache
from typing import Literal

import torch
import triton
import triton.language as tl

from . import _common as C
from . import _tuning
from ._tl import dot, stream_k_tile, upcast_dot

Activation = Literal["relu", "none"]


@triton.jit
def _up_epilogue(
    acc_u,
    acc_g,
    BIAS,
    OUT,
    rows,
    rm,
    rn,
    mask,
    stride_om,
    GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RELU: tl.constexpr,
):
    if HAS_BIAS:
        acc_u += tl.load(BIAS + rows).to(tl.float32)[None, :]
    if GATED:
        acc_u = acc_u * acc_g * tl.sigmoid(acc_g)
    elif RELU:
        acc_u = tl.maximum(acc_u, 0.0)
    o_ptrs = OUT + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    tl.store(o_ptrs, acc_u.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _up_range(
    X,
    WG,
    WU,
    rows,
    rm_load,
    k_start,
    k_end,
    stride_xm,
    stride_wg,
    stride_wu,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GATED: tl.constexpr,
    EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """x[rows of the tile, k_start:k_end] @ W[rows, k_start:k_end].T for up (and gate), in fp32."""
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = X + rm_load[:, None] * stride_xm + (k_start + rk)[None, :]
    wu_ptrs = WU + rows[:, None] * stride_wu + (k_start + rk)[None, :]
    wg_ptrs = WG + rows[:, None] * stride_wg + (k_start + rk)[None, :]
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs)
            wu = tl.load(wu_ptrs)
        else:
            mk = (k0 + rk < k_end)[None, :]
            x = tl.load(x_ptrs, mask=mk, other=0.0)
            wu = tl.load(wu_ptrs, mask=mk, other=0.0)
        acc_u = dot(x, tl.trans(wu), acc_u, UPCAST)
        if GATED:
            wg = tl.load(wg_ptrs) if EVEN_K else tl.load(wg_ptrs, mask=(k0 + rk < k_end)[None, :], other=0.0)
            acc_g = dot(x, tl.trans(wg), acc_g, UPCAST)
        x_ptrs += BLOCK_K
        wu_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K
    return acc_u, acc_g


@triton.jit
def _up_finish(
    acc_u,
    acc_g,
    WS,
    CNT,
    IDX,
    BIAS,
    OUT,
    tile,
    part,
    n_parts,
    col0,
    rows,
    rm,
    rn,
    mask,
    M,
    n_sel,
    n_rows,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RELU: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """Write part ``part`` of an output tile's ``n_parts``-way sum. One part: the output directly.
    Several: store this fp32 partial, then count arrivals on the tile; the last to arrive sums all
    partials and writes the output (:func:`_up_sum_partials`), then resets the counter. No second
    kernel, no memset. Without SPLIT the partial path is not compiled at all (the workspace and
    counters are then stand-ins of another type)."""
    if SPLIT:  # a constexpr test alone: without SPLIT the partial path is not compiled
        if n_parts > 1:
            ws_own = WS + (part * (2 if GATED else 1) * M * n_sel).to(tl.int64)
            ws_own += (rm[:, None] * n_sel + rn[None, :]).to(tl.int64)
            tl.store(ws_own, acc_u, mask=mask)
            if GATED:
                tl.store(ws_own + M * n_sel, acc_g, mask=mask)
            tl.debug_barrier()  # every thread's partial is written before the (release) arrival
            arrived = tl.atomic_add(CNT + tile, 1, sem="acq_rel", scope="gpu")
            if arrived == n_parts - 1:
                _up_sum_partials(
                    WS,
                    IDX,
                    BIAS,
                    OUT,
                    col0,
                    rm,
                    n_parts,
                    M,
                    n_sel,
                    n_rows,
                    stride_om,
                    BLOCK_M,
                    BLOCK_N,
                    GATED,
                    HAS_BIAS,
                    RELU,
                )
                tl.atomic_xchg(CNT + tile, 0, sem="relaxed", scope="gpu")
        else:  # the accumulators are dead in the branch above: its sums may reuse their registers
            _up_epilogue(acc_u, acc_g, BIAS, OUT, rows, rm, rn, mask, stride_om, GATED, HAS_BIAS, RELU)
    else:
        _up_epilogue(acc_u, acc_g, BIAS, OUT, rows, rm, rn, mask, stride_om, GATED, HAS_BIAS, RELU)


@triton.jit
def _up_sum_partials(
    WS,
    IDX,
    BIAS,
    OUT,
    col0,
    rm,
    n_parts,
    M,
    n_sel,
    n_rows,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RELU: tl.constexpr,
):
    """Add one output tile's fp32 partials in slot order (deterministic whichever program is last)
    and apply bias and activation (a nonlinearity needs the full sum). Tiles of more than 128 x 128
    sums (gated: two per element) go 64 columns at a time: a whole second tile in registers next to
    the accumulator made them spill (255 registers a thread and 392-800 bytes of stack under Triton
    3.6), and split configs of the 128 x 256 and 256 x 128 tiles ran 1.2-1.4x faster in pieces on an
    H200. Smaller tiles sum whole (in pieces, 128 x 128 splits ran up to 1.2x slower there)."""
    PIECE: tl.constexpr = 64 if BLOCK_M * BLOCK_N * (2 if GATED else 1) > 128 * 128 else BLOCK_N
    slot_stride = (2 if GATED else 1) * M * n_sel
    for c in tl.static_range(0, BLOCK_N, PIECE):
        rn = col0 + c + tl.arange(0, PIECE)
        rows, ok_n = _up_columns(IDX, rn, n_sel, n_rows)
        mask = (rm < M)[:, None] & ok_n[None, :]
        ws = WS + (rm[:, None] * n_sel + rn[None, :]).to(tl.int64)
        sum_u = tl.zeros([BLOCK_M, PIECE], tl.float32)
        sum_g = tl.zeros([BLOCK_M, PIECE], tl.float32)
        for s in range(0, n_parts):
            slot = ws + (s * slot_stride).to(tl.int64)
            sum_u += tl.load(slot, mask=mask, other=0.0, cache_modifier=".cg")
            if GATED:
                sum_g += tl.load(slot + M * n_sel, mask=mask, other=0.0, cache_modifier=".cg")
        _up_epilogue(sum_u, sum_g, BIAS, OUT, rows, rm, rn, mask, stride_om, GATED, HAS_BIAS, RELU)


@triton.jit
def _up_columns(IDX, rn, n_sel, n_rows):
    """Gathered weight rows of output columns ``rn`` and which columns are real; padding columns
    read a valid row and are never stored."""
    mask_n = rn < n_sel
    rows = tl.load(IDX + rn, mask=mask_n, other=0)
    ok_n = mask_n & (rows >= 0) & (rows < n_rows)
    return tl.where(ok_n, rows, 0).to(tl.int64), ok_n


@triton.jit
def _up_tile(IDX, M, n_sel, n_rows, tile, num_m, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """First column, gathered weight rows, rows and columns of output tile ``tile`` (batch tiles vary
    fastest, so tiles sharing the same weight rows run together: L2 reuse)."""
    pid_m = tile % num_m
    col0 = (tile // num_m) * BLOCK_N
    rn = col0 + tl.arange(0, BLOCK_N)
    rows, ok_n = _up_columns(IDX, rn, n_sel, n_rows)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rm < M
    # Rows past M load a real row (so the loop loads need no row mask), each a different one: pointed
    # all at row 0 they made one hot line in L2 (H200, OPT-66B up at M = 200: up to 1.7x slower).
    rm_load = tl.where(mask_m, rm, rm % M).to(tl.int64)
    return col0, rows, rm, rn, rm_load, mask_m[:, None] & ok_n[None, :]


@triton.jit
def _up_kernel(
    X,
    WG,
    WU,
    BIAS,
    IDX,
    OUT,
    WS,
    CNT,
    M,
    n_sel,
    d,
    n_rows,
    d_chunk,
    num_m,
    n_splits,
    whole_tiles,
    stride_xm,
    stride_wg,
    stride_wu,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RELU: tl.constexpr,
    SPLIT: tl.constexpr,
    EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Split-d schedule: the first ``whole_tiles`` programs each sum one whole output tile; the
    others, split-major over the remaining tiles, each sum one split's ``d_chunk`` of a tile."""
    pid = tl.program_id(0)
    # Always 0 (one column of programs), but a runtime value: with a constant 0 the unsplit loop
    # compiled to 18 more registers a thread (sm_90, Triton 3.6), too many for three 4-warp programs.
    sid = tl.program_id(1)
    n_parts = n_splits
    chunk = d_chunk
    if SPLIT:  # a constexpr test: unsplit launches (one program per tile) compile none of this
        whole = pid < whole_tiles
        split_tiles = tl.maximum(num_m * tl.cdiv(n_sel, BLOCK_N) - whole_tiles, 1)
        rest = tl.maximum(pid - whole_tiles, 0)
        sid = tl.where(whole, 0, rest // split_tiles)
        pid = tl.where(whole, pid, whole_tiles + rest % split_tiles)  # batch tiles fastest, as in _up_tile
        n_parts = tl.where(whole, 1, n_splits)
        chunk = tl.where(whole, d, d_chunk)
    col0, rows, rm, rn, rm_load, mask = _up_tile(IDX, M, n_sel, n_rows, pid, num_m, BLOCK_M, BLOCK_N)
    k_start = sid * d_chunk
    k_end = tl.minimum(k_start + chunk, d)
    acc_u, acc_g = _up_range(
        X,
        WG,
        WU,
        rows,
        rm_load,
        k_start,
        k_end,
        stride_xm,
        stride_wg,
        stride_wu,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
        GATED,
        EVEN_K,
        UPCAST,
    )
    _up_finish(
        acc_u,
        acc_g,
        WS,
        CNT,
        IDX,
        BIAS,
        OUT,
        pid,
        sid,
        n_parts,
        col0,
        rows,
        rm,
        rn,
        mask,
        M,
        n_sel,
        n_rows,
        stride_om,
        BLOCK_M,
        BLOCK_N,
        GATED,
        HAS_BIAS,
        RELU,
        SPLIT,
    )


@triton.jit
def _up_stream_k_kernel(
    X,
    WG,
    WU,
    BIAS,
    IDX,
    OUT,
    WS,
    CNT,
    M,
    n_sel,
    d,
    n_rows,
    steps,
    share,
    total,
    num_m,
    stride_xm,
    stride_wg,
    stride_wu,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RELU: tl.constexpr,
    SPLIT: tl.constexpr,
    EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Stream-K schedule (as in selective_mlp_down): equal shares of the tile-major (tile, BLOCK_K
    step of d) iterations, one per program; a tile spanning several programs is finished by the last
    of them to arrive."""
    p = tl.program_id(0)
    it = p * share
    it_end = tl.minimum(it + share, total)
    while it < it_end:
        tile, s_lo, s_hi, first, n_parts = stream_k_tile(it, it_end, steps, share)
        col0, rows, rm, rn, rm_load, mask = _up_tile(IDX, M, n_sel, n_rows, tile, num_m, BLOCK_M, BLOCK_N)
        k_end = tl.minimum(s_hi * BLOCK_K, d)
        acc_u, acc_g = _up_range(
            X,
            WG,
            WU,
            rows,
            rm_load,
            s_lo * BLOCK_K,
            k_end,
            stride_xm,
            stride_wg,
            stride_wu,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            GATED,
            EVEN_K,
            UPCAST,
        )
        _up_finish(
            acc_u,
            acc_g,
            WS,
            CNT,
            IDX,
            BIAS,
            OUT,
            tile,
            p - first,
            n_parts,
            col0,
            rows,
            rm,
            rn,
            mask,
            M,
            n_sel,
            n_rows,
            stride_om,
            BLOCK_M,
            BLOCK_N,
            GATED,
            HAS_BIAS,
            RELU,
            SPLIT,
        )
        it = tile * steps + s_hi


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------


def config_key(M: int, n_sel: int, d: int, gated: bool) -> str:
    return f"up|g{int(gated)}|M{_block_m(M) if M <= 64 else C.bucket(M)}|K{C.bucket(n_sel)}|D{C.bucket(d)}"


def _block_m(M: int) -> int:
    """Batch-tile rows of the key and of the small-batch configs (M <= 64)."""
    return min(64, max(16, C.next_pow2(M)))


def _splits_for(programs: int, d: int, block_k: int, target: int) -> int:
    """Split d until there are >= ``target`` programs, keeping >= 4 K-steps per split."""
    split = 1
    while programs * split < target and d // (split * 2) >= 4 * block_k:
        split *= 2
    return split


def _stage_bytes(bm: int, bn: int, bk: int, gated: bool) -> int:
    return (bm + bn * (2 if gated else 1)) * bk * 2  # fp16 / bf16 x tile + weight tile(s) per stage


def _wave_use(programs: int, sms: int) -> float:
    """Share of the launched waves' program slots that hold a program."""
    return programs / (C.cdiv(programs, sms) * sms)


@cache  # pure; called on every launch of a key that has no tuned config
def _heuristic(
    M: int, n_sel: int, d: int, sms: int, gated: bool, smem: int, operands_in_registers: bool = False
) -> _tuning.Config:
    """A config from shape and SM count (what tuning picked on H100 and H200 at the benchmark shapes).

    M > 64: 128 x 64 tensor-core tiles (the selected weight rows are re-read once per 128 batch rows only),
    128-wide steps and 8 warps under one wave of programs, 64-row tiles under half a wave, split-d only where
    even those fill less than half a wave (H200 sweeps at M = 128 and 256; Llama-3-8B gated up at M = 128, 10%
    of the neurons: two splits 16.1 us, none 21.9 us); one program per SM of a deep-pipelined 128 x 256 or 128
    x 128 tile where those fill their waves (:func:`_wide_tiles`). 16 < M <= 64: the widest ``BLOCK_N`` that
    still gives about half a wave of programs (wider tiles re-read the activation tile fewer times; narrow
    tiles take longer K-steps), no split then (tuning split only one of 20 such keys); 128-wide tiles that fit
    one wave (ungated) take 128-wide steps with 4 warps, one program per SM where shared memory holds all four
    stages (OPT-66B at M = 64, density 0.3: 53.7 against 66.5 us with 64-wide steps and 8 warps; H200 sweep,
    2026-11-29). M <= 16, ungated: 64 neurons x 128 per step under stream-K, as many programs per SM as fit,
    at any count of tiles (equal shares leave no partial wave; H200 cut to 96-132 SMs, OPT-66B at M = 1,
    5-20% of the neurons, 2026-11-30: 1.00-1.12x the best config, where split-d to one wave took up to
    1.23x: its split counts fill the slots unevenly, and 32-wide tiles of few neurons 1.23x). Gated, M <=
    16, few neurons: 64 neurons a tile when that gives a quarter wave of programs, else 32; split-d to one
    wave, or stream-K once the tiles alone fill a wave. Gated, M <= 16, with half a wave of 32-wide tiles:
    no split and no stream-K (a program streams two weight tiles per step, and split partials are two
    accumulators), 64-wide tiles unless 32-wide ones fill their waves clearly better (H200 sweep of every
    candidate, Llama-3-8B at M = 1 and 16: 1.00-1.13 of the best, against up to 1.30 with the split
    rule); 32-wide tiles take 256-neuron steps only where all of them run at once
    (one program per SM holds those stages; two waves of them took 1.28-1.36x on an H200 cut to 48-64
    SMs). Every tile is then fitted to the GPU: on an ``mma.sync`` GPU steps of at most 128 and enough
    warps for the accumulators (:func:`_common.fit_registers`), and shorter steps before fewer pipeline
    stages where shared memory is short (:func:`_common.fit_steps`).
    """
    whole_tiles = M <= 16 and gated and C.cdiv(n_sel, 32) >= sms / 2  # no split, no stream-K
    if halved := _halved_last_wave(M, n_sel, d, sms, gated, smem):
        return halved
    if M > 64:
        bm, bn, ns = 128, 64, 3
        tiles = C.cdiv(M, bm) * C.cdiv(n_sel, bn)
        bk, nw = (128, 8) if tiles < sms else (64, 4)  # under one wave: longer steps, more warps
        if tiles < sms / 2:  # few neurons: 64-row tiles, twice the programs
            bm, bk, nw, ns = 64, 128, 4, 4
        elif wide := _wide_tiles(M, n_sel, sms, gated, smem, operands_in_registers):
            bm, bn, bk, nw, ns = wide
    elif whole_tiles:  # gated, M <= 16
        bm, nw, ns = 16, 4, 4
        wide = C.cdiv(n_sel, 64)
        bn = 64 if wide >= sms / 2 and _wave_use(wide, sms) >= 0.9 * _wave_use(C.cdiv(n_sel, 32), sms) else 32
        per_sm = C.resident_programs(nw, ns * _stage_bytes(bm, 32, 256, gated), smem)  # 256-neuron steps
        bk = 256 if bn == 32 and C.cdiv(n_sel, 32) <= per_sm * sms else 128  # all the tiles at once
    elif M <= 16:
        bm, bk, nw, ns = 16, 128, 4, 4
        bn = 64 if not gated or C.cdiv(n_sel, 64) >= sms / 4 else 32
    else:
        bm = _block_m(M)
        bn = next((w for w in (128, 64, 32, 16) if C.cdiv(n_sel, w) >= sms / 2), 16)
        bk = 64 if bn == 128 else 128 if bn == 64 else 256
        nw, ns = (8 if bn == 128 else 4), 4
        one_wave = bn == 128 and not gated and C.cdiv(M, bm) * C.cdiv(n_sel, bn) <= sms
        if one_wave and C.fit_stages(ns, _stage_bytes(bm, bn, 128, gated), smem) == ns:
            bk, nw = 128, 4  # one program per SM, each with twice the bytes in flight per step
    programs = C.cdiv(M, bm) * C.cdiv(n_sel, bn)
    accumulators, stage_bytes = 2 if gated else 1, lambda k: _stage_bytes(bm, bn, k, gated)
    bk, nw, stages = C.fit_tile(bm, bn, bk, nw, ns, accumulators, stage_bytes, smem, operands_in_registers)
    cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw, "num_stages": stages}
    if whole_tiles:  # fp32 partials cost more than the waves they fill (two accumulators when gated)
        return cfg | {"splits": 1}
    if bm == 16 and (programs >= sms or not gated):
        return cfg | {
            "splits": 1,
            "stream_k": C.resident_programs(nw, stages * _stage_bytes(bm, bn, bk, gated), smem),
        }
    # Beyond 64 rows this splits only 64-row tiles short of half a wave (the others already fill it).
    splits = _splits_for(programs, d, bk, sms if bm == 16 else sms // 2)
    if splits > 1 and gated and operands_in_registers and bm * bn >= 64 * 64:
        cfg["num_warps"] = 8  # split partials beside two accumulators: 4 warps spilled (sm_89, Triton 3.6)
    return cfg | {"splits": splits}


def _halved_last_wave(M: int, n_sel: int, d: int, sms: int, gated: bool, smem: int) -> _tuning.Config | None:
    """128 x 128 tiles (8 warps, 5 stages) whose last wave is at most half full, that wave's tiles
    split over d in two (``last_wave_split``): the whole waves' programs write their tiles directly,
    and the last wave takes half a tile's time instead of a whole one's. For compute-bound batches
    (M > 128) of ungated MLPs; None where the last wave is full or more than half full, or the
    stages do not fit. Interleaved timings on an H200, OPT-66B up at M = 200 and 256 (2026-11-29):
    0.97-1.23x the speed of the same tiles unsplit (1.23x with 42 of 174 tiles in the last wave,
    better at 5 of 8 shapes, within 3% at the others); 4 or 8 splits, and gated MLPs (two fp32
    partials a tile), ran slower."""
    bm, bn, bk, nw, ns = 128, 128, 64, 8, 5
    stage_bytes = _stage_bytes(bm, bn, bk, False)
    if M <= 128 or gated or C.fit_stages(ns, stage_bytes, smem) < ns or d // 2 < 2 * bk:
        return None
    resident = C.resident_programs(nw, ns * stage_bytes, smem)
    slots = sms * resident
    tiles = C.cdiv(M, bm) * C.cdiv(n_sel, bn)
    if tiles <= slots or not 0 < tiles % slots <= slots // 2:
        return None
    tile = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw, "num_stages": ns}
    return tile | {"splits": 2, "last_wave_split": resident}


def _wide_tiles(
    M: int, n_sel: int, sms: int, gated: bool, smem: int, operands_in_registers: bool = False
) -> tuple[int, int, int, int, int] | None:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the large-batch tile that runs one program
    per SM with a deep pipeline, or None.

    128 x 256 tiles with four stages (192 KB of loads in flight) or 128 x 128 with five (four when gated:
    two weight tiles a step): a lone program per SM then streams its weight rows with the most bytes in
    flight, and the wide tile re-reads the activation tile half as often. Taken, the one whose programs
    fill their waves best (the wider on a tie), where that is >= 50% of the waves' slots at M <= 128
    (memory-bound) and >= 70% beyond, and only where three stages fit in shared memory (a GPU with less
    keeps the 128 x 64 tiles; gated 128 x 256 fits nowhere), and whose accumulators fit a thread's
    registers on an ``mma.sync`` GPU (:func:`_common.accumulators_fit`: 128 x 128, ungated, only). H200
    sweeps of every candidate, 2026-11-29: OPT-66B at M = 128, 1.00-1.07 of the best from 30% to 100% of
    the neurons, where 128 x 64 tiles with three stages took up to 1.27x; at M = 256, 1.00 at 20-100%;
    Llama-3-8B gated, the best config at the six shapes this rule takes (M = 128 and 256), 1.06-1.07x
    faster than 128 x 64 tiles.
    """
    options = []  # (share of the waves' slots filled, tile), the wider tile first
    for bn, stages in ((256, 4), (128, 5)):
        if operands_in_registers and not C.accumulators_fit(128, bn, 8, 2 if gated else 1):
            continue
        stages = C.fit_stages(stages, _stage_bytes(128, bn, 64, gated), smem)
        if stages >= 3:
            options.append((_wave_use(C.cdiv(M, 128) * C.cdiv(n_sel, bn), sms), (128, bn, 64, 8, stages)))
    use, tile = max(options, key=lambda o: o[0], default=(0.0, None))  # max keeps the first of a tie
    return tile if use >= (0.5 if M <= 128 else 0.7) else None


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) tried per batch-tile size (kept small: each
# compiles). At M=64 the activation tile (M x BLOCK_K) is re-read per program step, as many bytes as
# a BLOCK_N=64 weight tile: wider BLOCK_N (with split-d to keep enough programs) halves that traffic.
# M > 64 adds 128-row tensor-core tiles.
_TILES = {
    16: ((16, 256, 4, 4), (32, 256, 4, 4), (32, 128, 4, 4), (64, 128, 4, 4), (64, 256, 8, 3)),
    64: (
        (16, 256, 4, 4),
        (32, 256, 4, 4),
        (32, 128, 4, 4),
        (64, 128, 4, 4),
        (64, 128, 8, 4),
        (128, 64, 8, 4),
        (128, 128, 4, 4),
    ),
    128: (
        (128, 64, 8, 3),
        (64, 64, 4, 3),
        (128, 32, 8, 4),
        (64, 128, 8, 3),
        (256, 64, 8, 3),
        (128, 64, 8, 5),
        (256, 64, 8, 4),
        (64, 64, 4, 4),
        (128, 64, 8, 4),
    ),
}


def _candidates(M: int, n_sel: int, d: int, sms: int, gated: bool, smem: int) -> list[_tuning.Config]:
    tiles = [(_block_m(M), *t) for t in _TILES[16 if M <= 16 else 64]]
    if M > 64:  # the two best 64-row tiles of the H100 M=256 tuning, then the 128-row ones
        tiles = [(64, 64, 128, 4, 4), (64, 16, 256, 4, 4)] + [(128, *t) for t in _TILES[128]]
        if M > 128:  # one tile over the whole batch: each weight row is read exactly once
            tiles += [(256, 64, 64, 8, 3), (256, 128, 64, 8, 3)]
    out = []
    for bm, bn, bk, nw, ns in C.fitting_tiles(
        tiles, lambda bm, bn, bk, _: _stage_bytes(bm, bn, bk, gated), smem
    ):
        tile = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw, "num_stages": ns}
        programs = C.cdiv(M, bm) * C.cdiv(n_sel, bn)
        s = _splits_for(programs, d, bk, 2 * sms if bm <= 16 else sms)
        # Beyond 64 rows only 64-row tiles split: 128-row ones split took 1.40x their shape's best
        # (median of 50 H200 sweep shapes, M = 128 / 256, 2026-11-29).
        splits = sorted({1, 2, 3, 4, 6, s, s * 2} if M <= 64 else {1, 2, 4, s} if bm <= 64 else {1})
        out += [{**tile, "splits": split} for split in splits if split == 1 or d // split >= 2 * bk]
        if M <= 64:  # stream-K: up to 6% faster at M <= 16 (H200); 4-48% slower at M = 256
            resident = C.resident_programs(nw, ns * _stage_bytes(bm, bn, bk, gated), smem)
            out += [{**tile, "splits": 1, "stream_k": r} for r in sorted({1, resident})]
    if halved := _halved_last_wave(M, n_sel, d, sms, gated, smem):
        out.append(halved)
    return out


def _check(x, weights, bias, idx, out) -> None:
    C.check_ndim("x", x, 2, "(tokens, d)")
    C.check_dtype("x", x, C.LOW_PRECISION)
    C.check_kernel_device(x.device)
    C.check_last_dim_contiguous("x", x)
    d = x.shape[1]
    n = None
    for name, w in weights:
        C.check_ndim(name, w, 2, "(n_neurons, d) (the nn.Linear layout)")
        if w.shape[1] != d:
            raise ValueError(f"{name} has shape {tuple(w.shape)}; its second dim must equal x's d={d}")
        if n is not None and w.shape[0] != n:
            raise ValueError(f"{name} has {w.shape[0]} neurons but the other weight has {n}")
        n = w.shape[0]
        C.check_same_dtype(name, w, x.dtype)
        C.check_device(name, w, x.device)
        C.check_last_dim_contiguous(name, w)
    if bias is not None:
        C.check_shape("bias", bias, (n,), "(n_neurons,)")
        C.check_contiguous_vector("bias", bias)
        C.check_same_dtype("bias", bias, x.dtype)
        C.check_device("bias", bias, x.device)
    C.check_ndim("idx", idx, 1, "(k,) neuron indices")
    C.check_index_tensor("idx", idx, x.device, C.INDEX_DTYPES)
    if not 1 <= idx.shape[0] <= n:
        raise ValueError(f"idx has {idx.shape[0]} entries; expected 1..{n} (one per selected neuron)")
    C.check_contiguous_vector("idx", idx)
    if out is not None:
        C.check_shape("out", out, (x.shape[0], idx.shape[0]), "(tokens, k)")
        C.check_same_dtype("out", out, x.dtype)
        C.check_device("out", out, x.device)
        C.check_last_dim_contiguous("out", out)


def _run(x, w_gate, w_up, bias, idx, out, relu: bool, validate: bool) -> torch.Tensor:
    M, d = x.shape
    n_rows, n_sel = w_up.shape[0], idx.shape[0]
    C.check_index_range("idx", idx, n_rows, validate)
    if out is None:
        out = torch.empty((M, n_sel), device=x.device, dtype=x.dtype)
    gated = w_gate is not None
    gpu = C.gpu_facts(x.device)
    key = config_key(M, n_sel, d, gated)

    def launch(cfg: _tuning.Config) -> None:
        _launch(x, w_gate, w_up, bias, idx, out, relu, cfg)

    cfg = _tuning.pick(
        key,
        x.device,
        lambda: _heuristic(M, n_sel, d, gpu.sms, gated, gpu.smem, gpu.operands_in_registers),
        lambda: _candidates(M, n_sel, d, gpu.sms, gated, gpu.smem),
        launch,
        out,
    )
    launch(cfg)
    return out


def _launch(x, w_gate, w_up, bias, idx, out, relu, cfg) -> None:
    M, d = x.shape
    n_sel = idx.shape[0]
    gated = w_gate is not None
    wg = w_gate if gated else w_up  # a stand-in, never read, when not gated
    plan = _plan(
        M,
        n_sel,
        d,
        w_up.shape[0],
        (x.stride(0), wg.stride(0), w_up.stride(0), out.stride(0)),
        cfg,
        sms=C.num_sms(x.device),
        gated=gated,
        has_bias=bias is not None,
        relu=relu,
        upcast=upcast_dot(x.dtype),
    )
    ws, cnt = C.split_workspace(out, (plan.partial_slots, 2 if gated else 1, M, n_sel), plan.counters)
    plan.launch(
        X=x,
        WG=wg,
        WU=w_up,
        BIAS=bias if bias is not None else w_up,  # a stand-in, never read, without HAS_BIAS
        IDX=idx,
        OUT=out,
        WS=ws,
        CNT=cnt,
    )


def _plan(
    M: int,
    n_sel: int,
    d: int,
    n_rows: int,
    strides: tuple[int, int, int, int],
    cfg: _tuning.Config,
    *,
    sms: int,
    gated: bool,
    has_bias: bool,
    relu: bool,
    upcast: bool,
) -> C.LaunchPlan:
    """The launch of ``cfg`` at these sizes (``strides``: rows of x, the gate and up weights, out):
    split-d grid, with the last wave's tiles alone split where the config says so, or stream-K."""
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    num_m = C.cdiv(M, bm)
    tiles = num_m * C.cdiv(n_sel, bn)
    steps = C.cdiv(d, bk)
    scalars = dict(M=M, n_sel=n_sel, d=d, n_rows=n_rows, num_m=num_m)
    scalars |= dict(zip(("stride_xm", "stride_wg", "stride_wu", "stride_om"), strides, strict=True))
    constexprs = dict(
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        GATED=gated,
        HAS_BIAS=has_bias,
        RELU=relu,
        EVEN_K=d % bk == 0,
        UPCAST=upcast,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    if cfg.get("stream_k", 0):
        return C.gemm_stream_k_launch(
            _up_stream_k_kernel, tiles, steps, sms * cfg["stream_k"], scalars, constexprs
        )
    d_chunk, splits = C.split_chunks(d, bk, cfg["splits"])
    whole = 0
    if splits > 1 and cfg.get("last_wave_split"):
        whole = C.whole_wave_tiles(tiles, sms * cfg["last_wave_split"])
    return C.LaunchPlan(
        _up_kernel,
        (whole + (tiles - whole) * splits, 1),
        scalars | dict(d_chunk=d_chunk, n_splits=splits, whole_tiles=whole),
        constexprs | dict(SPLIT=splits > 1),
        splits,
        tiles,
    )


def selective_up(
    x: torch.Tensor,
    w_up: torch.Tensor,
    idx: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: Activation = "relu",
    out: torch.Tensor | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """act(x @ w_up[idx].T + bias[idx]) -> (M, k). x: (M, d); w_up: (n, d); idx: (k,) int32 or int64."""
    if activation not in ("relu", "none"):
        raise ValueError(f"activation {activation!r} is not supported; use 'relu' or 'none'")
    _check(x, [("w_up", w_up)], bias, idx, out)
    return _run(x, None, w_up, bias, idx, out, activation == "relu", validate)


def selective_gated_up(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    idx: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """silu(x @ w_gate[idx].T) * (x @ w_up[idx].T) -> (M, k); both weights (n, d), rows gathered together."""
    _check(x, [("w_gate", w_gate), ("w_up", w_up)], None, idx, out)
    return _run(x, w_gate, w_up, None, idx, out, False, validate)


def selective_up_reference(
    x: torch.Tensor,
    w_up: torch.Tensor,
    idx: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: Activation = "relu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Torch reference of :func:`selective_up`, computed in ``dtype``."""
    h = x.to(dtype) @ w_up[idx.long()].to(dtype).T
    if bias is not None:
        h = h + bias[idx.long()].to(dtype)
    return torch.relu(h) if activation == "relu" else h


def selective_gated_up_reference(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    idx: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Torch reference of :func:`selective_gated_up`, computed in ``dtype``."""
    xf, rows = x.to(dtype), idx.long()
    return torch.nn.functional.silu(xf @ w_gate[rows].to(dtype).T) * (xf @ w_up[rows].to(dtype).T)
