"""Selective MLP down projection from compact activations.

    out[m] = sum_j a[m, j] * W_down[:, idx[j]] + b_down

Weight layout: the *transposed* down weight ``w_down_t = W_down.T.contiguous()`` of shape
``(n_neurons, d)``, converted once at load time (:func:`prepare_down_weight`). The ``nn.Linear``
layout ``(d, n)`` would make a selected neuron a strided column (one 2-byte element per 2*n-byte
row); transposed, it is one contiguous row, so the kernel reads only the selected rows, in full
128-byte lines.

Parallelism: programs tile (batch rows x ``BLOCK_D`` output columns); because ``d / BLOCK_D`` alone
is too few programs for an H100, the sum over the k selected neurons is split; each split stores its
fp32 partial sum (plain stores) and bumps an arrival counter of its output tile; the last split to
arrive adds the partials in split order (deterministic), adds the bias and casts, in the same kernel.
The stream-K schedule (``_down_stream_k_kernel``) launches one program per resident slot instead, each
taking an equal run of the tile-major (tile, neuron step) iterations, merged the same way. A config
with ``tma_a`` loads the activation tile through a host tensor descriptor (TMA) instead of per-thread
copies (see :func:`_activation_by_tma`).
"""

from __future__ import annotations

import math
from functools import cache

import torch
import triton
import triton.language as tl

from . import _common as C
from . import _tuning
from ._tl import dot, stream_k_tile, upcast_dot


@triton.jit
def _down_epilogue(acc, BIAS, OUT, rm, rd, mask, mask_d, stride_om, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(BIAS + rd, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    o_ptrs = OUT + rm[:, None].to(tl.int64) * stride_om + rd[None, :]
    tl.store(o_ptrs, acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _down_step(acc, a, W, rows, rd, mask_d, n_rows, stride_wn, EVEN_D: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ W[rows, rd]. Out-of-range rows (padding slots, bad indices) read as zeros: only the
    weight mask depends on the loaded indices (a mask built from loaded values makes a load
    synchronous, so the activation tile must not have one)."""
    ok = (rows >= 0) & (rows < n_rows)
    w_ptrs = W + tl.where(ok, rows, 0).to(tl.int64)[:, None] * stride_wn + rd[None, :]
    w_mask = ok[:, None] if EVEN_D else ok[:, None] & mask_d[None, :]
    return dot(a, tl.load(w_ptrs, mask=w_mask, other=0.0), acc, UPCAST)


@triton.jit
def _down_range(
    a_rows,
    A_DESC,
    m0,
    W,
    IDX,
    rd,
    mask_d,
    n_rows,
    stride_wn,
    j_start,
    j_end,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_D: tl.constexpr,
    UPCAST: tl.constexpr,
    TMA_A: tl.constexpr,
):
    """Sum over the selected neurons j_start..j_end of one output tile, in fp32."""
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # The weight addresses depend on the indices: load the next step's indices one iteration ahead,
    # so the weight copies of a step never wait on an index load and pipeline like the activation
    # copies (see kernels/bench/compiled.py). Slots past the end read index -1 (a zero weight row).
    rj_next = j_start + tl.arange(0, BLOCK_K)
    rows_next = tl.load(IDX + rj_next, mask=rj_next < j_end, other=-1)
    # Whole steps first, with no activation mask: a mask ending at an odd k would make the
    # activation load element-wise, which cannot be an asynchronous copy. The partial step after.
    j_full = j_start + (j_end - j_start) // BLOCK_K * BLOCK_K
    for j0 in range(j_start, j_full, BLOCK_K):
        rj = j0 + tl.arange(0, BLOCK_K)
        rows = rows_next
        rows_next = tl.load(IDX + rj + BLOCK_K, mask=rj + BLOCK_K < j_end, other=-1)
        a = A_DESC.load([m0, j0]) if TMA_A else tl.load(a_rows + rj[None, :])
        acc = _down_step(acc, a, W, rows, rd, mask_d, n_rows, stride_wn, EVEN_D, UPCAST)
    if j_full < j_end:
        rj = j_full + tl.arange(0, BLOCK_K)
        if TMA_A:  # columns past j_end meet zero weight rows (index -1); past k the copy reads zeros
            a = A_DESC.load([m0, j_full])
        else:
            a = tl.load(a_rows + rj[None, :], mask=(rj < j_end)[None, :], other=0.0)
        acc = _down_step(acc, a, W, rows_next, rd, mask_d, n_rows, stride_wn, EVEN_D, UPCAST)
    return acc


@triton.jit
def _down_tile(A, tile, num_m, M, d, stride_am, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows, columns and activation row pointers of output tile ``tile`` (batch tiles vary fastest).
    Rows past M load row ``rm mod M``, each a different real row, never stored: pointed all at row 0
    they made one hot line in L2 (H200, Llama-3-8B down at M = 200: 1.3-1.8x slower than with this)."""
    rm = (tile % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rm < M
    rd = (tile // num_m) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = rd < d
    a_rows = A + tl.where(mask_m, rm, rm % M).to(tl.int64)[:, None] * stride_am
    return rm, rd, a_rows, mask_m[:, None] & mask_d[None, :], mask_d


@triton.jit
def _down_finish(
    acc,
    WS,
    CNT,
    BIAS,
    OUT,
    tile,
    part,
    n_parts,
    rm,
    rd,
    mask,
    mask_d,
    M,
    d,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """Write part ``part`` of an output tile's ``n_parts``-way sum. One part: the output directly.
    Several: store this fp32 partial, then count arrivals on the tile; the last to arrive adds all
    partials in slot order (deterministic whichever program is last), applies the bias, writes the
    output and resets the counter. No second kernel, no memset. Without SPLIT the partial path is not
    compiled at all (the workspace and counters are then stand-ins of another type)."""
    if SPLIT:
        if n_parts > 1:
            ws_tile = WS + (rm[:, None] * d + rd[None, :]).to(tl.int64)
            tl.store(ws_tile + (part * M * d).to(tl.int64), acc, mask=mask)
            tl.debug_barrier()  # every thread's partial is written before the (release) arrival
            arrived = tl.atomic_add(CNT + tile, 1, sem="acq_rel", scope="gpu")
            if arrived == n_parts - 1:
                tot = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
                for s in range(0, n_parts):
                    tot += tl.load(
                        ws_tile + (s * M * d).to(tl.int64), mask=mask, other=0.0, cache_modifier=".cg"
                    )
                _down_epilogue(tot, BIAS, OUT, rm, rd, mask, mask_d, stride_om, HAS_BIAS)
                tl.atomic_xchg(CNT + tile, 0, sem="relaxed", scope="gpu")
        else:
            _down_epilogue(acc, BIAS, OUT, rm, rd, mask, mask_d, stride_om, HAS_BIAS)
    else:
        _down_epilogue(acc, BIAS, OUT, rm, rd, mask, mask_d, stride_om, HAS_BIAS)


@triton.jit
def _down_kernel(
    A,
    A_DESC,
    W,
    BIAS,
    IDX,
    OUT,
    WS,
    CNT,
    M,
    n_sel,
    d,
    n_rows,
    k_chunk,
    num_m,
    n_splits,
    stride_am,
    stride_wn,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    EVEN_D: tl.constexpr,
    UPCAST: tl.constexpr,
    TMA_A: tl.constexpr,
):
    """Split-K schedule: program (tile, split) sums the split's ``k_chunk`` neurons of one tile."""
    pid = tl.program_id(0)
    sid = tl.program_id(1)
    rm, rd, a_rows, mask, mask_d = _down_tile(A, pid, num_m, M, d, stride_am, BLOCK_M, BLOCK_D)
    j_start = sid * k_chunk
    j_end = tl.minimum(j_start + k_chunk, n_sel)
    acc = _down_range(
        a_rows,
        A_DESC,
        (pid % num_m) * BLOCK_M,
        W,
        IDX,
        rd,
        mask_d,
        n_rows,
        stride_wn,
        j_start,
        j_end,
        BLOCK_M,
        BLOCK_D,
        BLOCK_K,
        EVEN_D,
        UPCAST,
        TMA_A,
    )
    _down_finish(
        acc,
        WS,
        CNT,
        BIAS,
        OUT,
        pid,
        sid,
        n_splits,
        rm,
        rd,
        mask,
        mask_d,
        M,
        d,
        stride_om,
        BLOCK_M,
        BLOCK_D,
        HAS_BIAS,
        SPLIT,
    )


@triton.jit
def _down_stream_k_kernel(
    A,
    A_DESC,
    W,
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
    stride_am,
    stride_wn,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    EVEN_D: tl.constexpr,
    UPCAST: tl.constexpr,
    TMA_A: tl.constexpr,
):
    """Stream-K schedule: the (tile, BLOCK_K step) iterations, tile-major, are dealt out in equal
    ``share``s, one per program, and a program launches once per resident slot of the GPU. Every
    program does the same work (no partial last wave); a tile whose steps span several programs is
    finished by the last of them to arrive, as in split-K."""
    p = tl.program_id(0)
    it = p * share
    it_end = tl.minimum(it + share, total)
    while it < it_end:
        tile, s_lo, s_hi, first, n_parts = stream_k_tile(it, it_end, steps, share)
        rm, rd, a_rows, mask, mask_d = _down_tile(A, tile, num_m, M, d, stride_am, BLOCK_M, BLOCK_D)
        j_end = tl.minimum(s_hi * BLOCK_K, n_sel)
        acc = _down_range(
            a_rows,
            A_DESC,
            (tile % num_m) * BLOCK_M,
            W,
            IDX,
            rd,
            mask_d,
            n_rows,
            stride_wn,
            s_lo * BLOCK_K,
            j_end,
            BLOCK_M,
            BLOCK_D,
            BLOCK_K,
            EVEN_D,
            UPCAST,
            TMA_A,
        )
        _down_finish(
            acc,
            WS,
            CNT,
            BIAS,
            OUT,
            tile,
            p - first,
            n_parts,
            rm,
            rd,
            mask,
            mask_d,
            M,
            d,
            stride_om,
            BLOCK_M,
            BLOCK_D,
            HAS_BIAS,
            SPLIT,
        )
        it = tile * steps + s_hi


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------


def config_key(M: int, n_sel: int, d: int) -> str:
    return f"down|M{_block_m(M) if M <= 64 else C.bucket(M)}|K{C.bucket(n_sel)}|D{C.bucket(d)}"


def _block_m(M: int) -> int:
    """Batch-tile rows of the key and of the small-batch configs (M <= 64)."""
    return min(64, max(16, C.next_pow2(M)))


def _splits_for(programs: int, n_sel: int, block_k: int, target: int) -> int:
    """Split the k neurons until there are >= ``target`` programs, keeping >= 2 steps per split."""
    split = 1
    while programs * split < target and n_sel // (split * 2) >= 2 * block_k:
        split *= 2
    return split


@cache  # pure; called on every launch of a key that has no tuned config
def _heuristic(
    M: int, n_sel: int, d: int, sms: int, smem: int, operands_in_registers: bool = False, tma: bool = False
) -> _tuning.Config:
    """A config from shape and SM count (what tuning picked on H100 and H200 at the benchmark shapes).

    M <= 64: 128-column tiles (64 when d / 128 gives less than half a wave at M > 16), 128 neurons per
    step at M <= 16 (3 stages; 64-neuron steps took up to 1.24x the best on an H200 cut to 48-80 SMs and
    1.05x at 132, 128-neuron steps 1.00-1.10x on 48-132 SMs) and 64 at M <= 64 (4 stages), and split-K
    so that tiles x splits fills about 3 waves (M <= 16) or 2 (M <= 64): more, shorter
    programs hide the index -> weight-row load chain better than a few long ones; where the tiles outnumber
    the SMs, M <= 16 takes that many times the waves and 16 < M <= 64 the large-batch wave cost over its
    resident programs with splits of >= 16 steps (H200 cut to 48-64 SMs, OPT-66B, 2026-11-30: 1.00-1.11x
    the best at M = 16 and 1.00-1.12x at M = 64, where the waves rule took up to 1.25x and 1.33x). On a
    narrow model (d / 128 under half a wave) M <= 16 takes 64-column tiles of 256-neuron steps with 3
    stages from 4096 neurons (128-neuron steps, 4 stages, below, or where shared memory holds only those;
    see :func:`_long_steps`) split to two waves: each step's copies two to four times as large (H200
    sweeps of every candidate, Llama-3-8B, 2026-11-29: within 1.04x of the best at every density, M = 1
    within 1.13x); 16 < M <= 64 (d / 128 at most half a wave) takes the one-program-per-SM tile that fills
    one wave the most (:func:`_fullest_wave`: those 64 columns, or 128 x 128 of 128-neuron steps; Llama-3-8B
    on 64-132 SMs within 1.00-1.10x of the best at every density, where the 64-column tile alone took up
    to 1.27x at 96-112 SMs and the waves rule 1.40x at 64). M > 64: 128 x 64 tensor-core tiles, 4 warps
    (three resident per SM), or 128 x 128 with 8 warps at M <= 128 when d / 128 fills half a wave (OPT-66B
    at M = 128: 1.00-1.11x the best, against 1.07-1.25x for 128 x 64); at M > 128 when it does not, the
    one of the two whose busiest SM streams fewer weight bytes (:func:`_split_tile`; H200 cut to 96-132
    SMs, Llama-3-8B at M = 200 and 256, 10-100% of the neurons, 2026-11-30: 128 x 128 from 4,301 neurons at
    112 SMs, 1.00-1.11x the best where 128 x 64 took up to 1.32x; 128 x 64 at fewer neurons and on 132
    SMs, 1.00-1.06x, where 128 x 128 took up to 1.27x). The split-K count is the one that fills
    whole waves of resident programs without too much fp32 partial traffic (:func:`_large_batch_splits`;
    Llama-3-8B at M = 128 wants 2-6 splits). M > 128 with long reductions (>= 96 steps)
    and a third of a wave of 256 x 128 tiles: one tile over the whole batch (each weight row read once)
    under stream-K, one program per SM, where its accumulators fit (not on an ``mma.sync`` GPU; Llama-3-70B's
    64 column tiles on the whole H200, M = 200 / 256, 30-100% of the neurons, 2026-11-30: 1.01-1.06x the
    best, where split 128-row tiles took 1.22-1.45x; Llama-3-8B's 32 took 1.12-1.21x on 132 SMs). From the
    H200 graph-timed sweeps at M = 1-256 (2026-11-29; the M = 256 rules from ``kernels.bench.config_sweep``,
    every candidate at each shape: the whole-batch tile was the fastest config for OPT-66B at k =
    7,373-25,805; 256-column tiles at k >= 6,144 took 1.08-1.33x the best for Llama-3-8B, 128 x 64 tiles
    1.00-1.05x). Each tile is then fitted to the GPU's registers and shared memory (:func:`_fit`), and
    64- and 256-row tiles load their activation tile by TMA where the GPU has it (:func:`_activation_by_tma`).
    """
    wide = C.cdiv(d, 128) >= sms / 2  # 128-column tiles alone fill half a wave
    whole_batch = M > 128 and n_sel >= 96 * 64 and C.cdiv(d, 128) >= sms / 3
    whole_batch &= not operands_in_registers or C.accumulators_fit(256, 128, 8)
    if whole_batch:
        bm, bd, (bk, nw, stages) = 256, 128, _fit(256, 128, 64, 8, 3, smem, operands_in_registers)
        splits = 1
    elif M > 64:
        narrow, square = (_split_tile(bd, M, n_sel, d, sms, smem, operands_in_registers) for bd in (64, 128))
        if M <= 128:  # one batch tile: a wide model's 128 x 128 tiles fill a wave of one program per SM
            chosen = square if wide else narrow
        elif wide:  # a wide model's long reductions take the whole-batch tile above where it fits
            chosen = narrow
        else:  # a narrow model's whole batch: the tile whose busiest SM streams less (a tie: 128 x 64)
            chosen = min((narrow, square), key=lambda tile: tile[1])
        bm, bd, bk, nw, stages, splits = chosen[0]
    elif (
        16 < M <= 64
        and C.cdiv(d, 128) <= sms / 2
        and (one_wave := _fullest_wave(n_sel, d, sms, smem, operands_in_registers))
    ):
        bm, (bd, bk, nw, stages, splits) = 64, one_wave
    elif M <= 16 and not wide and (long_steps := _long_steps(16, n_sel, smem, operands_in_registers)):
        bm, bd, nw = 16, 64, 4
        bk, stages = long_steps
        splits = max(1, min(2 * sms // C.cdiv(d, bd), n_sel // (2 * bk)))  # two waves
    else:
        bm = _block_m(M)
        bd = 128 if bm <= 16 or wide else 64
        bk, ns, waves = (128, 3, 3) if bm <= 16 else (64, 4, 2)
        bk, nw, stages = _fit(bm, bd, bk, 4, ns, smem, operands_in_registers)
        tiles = C.cdiv(M, bm) * C.cdiv(d, bd)
        if bm > 16 and tiles > sms:  # long programs outnumbering the SMs: whole waves of resident slots,
            # no split shorter than 16 steps (pipeline fill and split finish outweigh a fuller wave)
            slots = sms * C.resident_programs(nw, stages * _stage_bytes(bm, bd, bk), smem)
            splits = _large_batch_splits(tiles, slots, bm, n_sel, bk, min_steps=16)
        else:  # more tiles than SMs: that many times the waves, so that each SM gets its share
            splits = max(1, min(waves * C.cdiv(tiles, sms) * sms // tiles, n_sel // (2 * bk)))
    cfg = {
        "BLOCK_M": bm,
        "BLOCK_D": bd,
        "BLOCK_K": bk,
        "num_warps": nw,
        "num_stages": stages,
        "splits": splits,
    } | _activation_by_tma(bm, tma)
    return cfg | {"stream_k": 1} if whole_batch else cfg


def _split_tile(
    bd: int, M: int, n_sel: int, d: int, sms: int, smem: int, operands_in_registers: bool
) -> tuple[tuple[int, int, int, int, int, int], float]:
    """(BLOCK_M, BLOCK_D, BLOCK_K, num_warps, stages, splits) of a split-K tile of 128 batch rows by
    ``bd`` columns, split by :func:`_large_batch_splits`, and the weight elements its busiest SM
    streams: programs spread evenly over the SMs, each over n_sel / splits rows of ``bd`` columns.
    64 columns take 4 warps (three programs a SM); 128 take 8 (118 registers a thread on an H200 under
    Triton 3.6: two programs share an SM where shared memory holds both)."""
    nw, registers = (8, 118) if bd == 128 else (4, 168)
    bk, nw, stages = _fit(128, bd, 64, nw, 3, smem, operands_in_registers)
    resident = C.resident_programs(nw, stages * _stage_bytes(128, bd, bk), smem, registers=registers)
    tiles = C.cdiv(M, 128) * C.cdiv(d, bd)
    splits = _large_batch_splits(tiles, sms * resident, 128, n_sel, bk)
    busiest = math.ceil(tiles * splits / sms) * n_sel / splits * bd
    return (128, bd, bk, nw, stages, splits), busiest


def _fullest_wave(
    n_sel: int, d: int, sms: int, smem: int, operands_in_registers: bool
) -> tuple[int, int, int, int, int] | None:
    """(BLOCK_D, BLOCK_K, num_warps, stages, splits) of the deep-pipelined 64-row tile (one program per
    SM) whose tiles x splits fill one wave of resident programs the most: 64 columns of long steps
    (:func:`_long_steps`) or 128 x 128 with 3 stages of 128 neurons, each where shared memory holds all
    its stages; a tie goes to fewer splits (less fp32 partial traffic), then to the 64-column tile.
    None where neither fits, or neither fits its columns into one wave."""
    long_steps = _long_steps(64, n_sel, smem, operands_in_registers)
    tiles = [(64, long_steps[0], 4, long_steps[1])] if long_steps else []
    if (square := _fit(64, 128, 128, 4, 3, smem, operands_in_registers)) == (128, 4, 3):  # all its stages
        tiles.append((128, *square))
    options = []  # (fill, -splits, 64 columns), config
    for bd, bk, nw, stages in tiles:
        slots = sms * C.resident_programs(nw, stages * _stage_bytes(64, bd, bk), smem)
        columns = C.cdiv(d, bd)
        if columns <= slots:
            splits = max(1, min(slots // columns, n_sel // (4 * bk)))  # >= 4 steps: the pipeline's depth
            options.append(((columns * splits / slots, -splits, bd == 64), (bd, bk, nw, stages, splits)))
    return max(options)[1] if options else None


def _activation_by_tma(bm: int, tma: bool) -> dict[str, int]:
    """``{"tma_a": 1}`` (the activation tile copied by TMA, the weight rows still gathered by per-thread
    copies) for 64-row and whole-batch 256-row tiles on a GPU with TMA, else nothing. H200 interleaved
    A/B of the heuristic's configs (2026-11-29): 1.02-1.10x at M = 64, both models; OPT-66B's 256-row
    tiles at M = 200 and 256 1.05-1.24x (stream-K and split grid alike). 128-row tiles ran 0.85-1.13x
    (median 0.99): they keep per-thread copies."""
    return {"tma_a": 1} if tma and bm in (64, 256) else {}


def _fit(
    bm: int, bd: int, bk: int, nw: int, stages: int, smem: int, operands_in_registers: bool
) -> tuple[int, int, int]:
    """:func:`_common.fit_tile` of a down tile (one accumulator)."""
    return C.fit_tile(
        bm, bd, bk, nw, stages, 1, lambda k: _stage_bytes(bm, bd, k), smem, operands_in_registers
    )


def _long_steps(bm: int, n_sel: int, smem: int, operands_in_registers: bool) -> tuple[int, int] | None:
    """(BLOCK_K, stages) of the narrow-model rule for 64-column tiles: 256-neuron steps with 3 stages
    (16-row tiles from 4096 neurons only: below, 128-neuron steps were faster at M <= 16; 64-row tiles
    were faster with 256 at every count, 1,434-14,336 neurons on an H200 cut to 48-132 SMs), else 128
    with 4, whichever has all its stages in shared memory (a GPU with less keeps the 64-neuron steps:
    fewer stages would leave the copies of one step in flight). Steps of at most
    :data:`_common.REGISTER_STEP` on an ``mma.sync`` GPU."""
    steps = ((256, 3), (128, 4)) if bm > 16 or n_sel >= 16 * 256 else ((128, 4),)
    for bk, ns in steps:
        if bk > C.REGISTER_STEP and operands_in_registers:
            continue
        if C.fit_stages(ns, _stage_bytes(bm, 64, bk), smem) == ns:
            return bk, ns
    return None


def _stage_bytes(bm: int, bd: int, bk: int) -> int:
    return (bm + bd) * bk * 2  # fp16 / bf16 activation tile + weight tile per pipeline stage


def _large_batch_splits(tiles: int, slots: int, bm: int, n_sel: int, bk: int, min_steps: int = 2) -> int:
    """The split-K count with the least (waves of programs x work per program) + fp32 partials, each
    split keeping at least ``min_steps`` steps.

    Relative to one tile's weight bytes (k x BLOCK_D x 2), s splits cost ceil(tiles * s / slots) / s
    in waves of shorter programs, plus 4 * BLOCK_M / k per split for the partials (BLOCK_M x BLOCK_D
    fp32 written, then read by the tile's last program).
    A partial last wave is paid in full: 160 programs of one per SM on 132 SMs took 1.5x as long as
    128 (H200, Llama-3-8B down at M = 256).
    """
    most = max(1, min(16, n_sel // (min_steps * bk)))
    cost = {s: math.ceil(tiles * s / slots) / s + s * 4 * bm / n_sel for s in range(1, most + 1)}
    return min(cost, key=cost.get)


# (BLOCK_D, BLOCK_K, num_warps, num_stages) tried per batch-tile size (kept small: each compiles).
_TILES = {
    16: (
        (128, 64, 4, 4),
        (128, 64, 4, 3),
        (256, 64, 4, 4),
        (512, 32, 8, 4),
        (512, 64, 8, 3),
        (1024, 32, 8, 3),
        (64, 256, 4, 3),
        (64, 128, 4, 4),
        (128, 128, 4, 3),
    ),
    64: (
        (64, 64, 4, 4),
        (128, 64, 4, 4),
        (128, 32, 4, 4),
        (256, 32, 8, 4),
        (256, 64, 8, 3),
        (64, 128, 4, 4),
        (128, 128, 4, 3),
        (64, 256, 4, 3),
    ),
    128: ((128, 64, 8, 3), (64, 64, 4, 3), (256, 64, 8, 3), (128, 32, 8, 4)),
}


def _split_options(tiles: int, n_sel: int, block_k: int, sms: int, base: int) -> list[int]:
    """Power-of-two splits around ``base`` plus counts that make tiles x splits fill whole waves of
    1-4 programs per SM (a partial last wave of long programs costs up to a whole wave)."""
    opts = {max(1, base // 2), base, base * 2}
    opts |= {max(1, (w * sms) // tiles) for w in (1, 2, 3, 4)}
    return sorted(s for s in opts if s == 1 or (s <= 64 and n_sel // s >= 2 * block_k))


def _candidates(M: int, n_sel: int, d: int, sms: int, smem: int, tma: bool = False) -> list[_tuning.Config]:
    tile_shapes = [(_block_m(M), *t) for t in _TILES[16 if M <= 16 else 64]]
    if M > 64:  # the two best 64-row tiles of the H100 M=256 tuning, then the 128-row ones
        tile_shapes = [(64, 256, 64, 4, 3), (64, 128, 64, 4, 4)] + [(128, *t) for t in _TILES[128]]
        if M > 128:  # one tile over the whole batch: each weight row is read exactly once
            tile_shapes += [(256, 64, 64, 8, 3), (256, 128, 64, 8, 3)]
    out = []
    for bm, bd, bk, nw, ns in C.fitting_tiles(
        tile_shapes, lambda bm, bd, bk, _: _stage_bytes(bm, bd, bk), smem
    ):
        tile = {"BLOCK_M": bm, "BLOCK_D": bd, "BLOCK_K": bk, "num_warps": nw, "num_stages": ns}
        tile |= _activation_by_tma(bm, tma)
        tiles = C.cdiv(M, bm) * C.cdiv(d, bd)
        s = _splits_for(tiles, n_sel, bk, 2 * sms if bm <= 16 else sms)
        out += [{**tile, "splits": split} for split in _split_options(tiles, n_sel, bk, sms, s)]
        if M > 64:  # stream-K: 1-8% faster at M = 256 on OPT-66B shapes; 0-34% slower at M <= 64 (H200)
            resident = C.resident_programs(nw, ns * _stage_bytes(bm, bd, bk), smem)
            out += [{**tile, "splits": 1, "stream_k": r} for r in sorted({1, resident})]
    return out


def _check(a, w_down_t, idx, bias, out) -> None:
    C.check_ndim("a", a, 2, "(tokens, k) compact activations")
    C.check_dtype("a", a, C.LOW_PRECISION)
    C.check_kernel_device(a.device)
    C.check_last_dim_contiguous("a", a)
    C.check_ndim("w_down_t", w_down_t, 2, "(n_neurons, d): the transposed down weight")
    C.check_same_dtype("w_down_t", w_down_t, a.dtype)
    C.check_device("w_down_t", w_down_t, a.device)
    C.check_last_dim_contiguous("w_down_t", w_down_t)
    n, d = w_down_t.shape
    C.check_ndim("idx", idx, 1, "(k,) neuron indices")
    C.check_index_tensor("idx", idx, a.device, C.INDEX_DTYPES)
    if idx.shape[0] != a.shape[1]:
        raise ValueError(f"idx has {idx.shape[0]} entries but a has k={a.shape[1]} columns; they must match")
    if not 1 <= idx.shape[0] <= n:
        raise ValueError(f"idx has {idx.shape[0]} entries; expected 1..{n} (one per selected neuron)")
    C.check_contiguous_vector("idx", idx)
    if bias is not None:
        C.check_shape("bias", bias, (d,), "(d,)")
        C.check_contiguous_vector("bias", bias)
        C.check_same_dtype("bias", bias, a.dtype)
        C.check_device("bias", bias, a.device)
    if out is not None:
        C.check_shape("out", out, (a.shape[0], d), "(tokens, d)")
        C.check_same_dtype("out", out, a.dtype)
        C.check_device("out", out, a.device)
        C.check_last_dim_contiguous("out", out)


def prepare_down_weight(w_down: torch.Tensor) -> torch.Tensor:
    """Convert an ``nn.Linear`` down weight (d, n) to the kernel layout (n, d), once at load time."""
    C.check_ndim("w_down", w_down, 2, "(d, n_neurons) (the nn.Linear layout)")
    return w_down.t().contiguous()


def selective_down(
    a: torch.Tensor,
    w_down_t: torch.Tensor,
    idx: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """a @ w_down_t[idx] + bias -> (M, d). a: (M, k); w_down_t: (n, d) (see prepare_down_weight)."""
    _check(a, w_down_t, idx, bias, out)
    M, n_sel = a.shape
    n_rows, d = w_down_t.shape
    C.check_index_range("idx", idx, n_rows, validate)
    if out is None:
        out = torch.empty((M, d), device=a.device, dtype=a.dtype)
    gpu = C.gpu_facts(a.device)
    key = config_key(M, n_sel, d)

    def launch(cfg: _tuning.Config) -> None:
        _launch(a, w_down_t, idx, bias, out, cfg)

    cfg = _tuning.pick(
        key,
        a.device,
        lambda: _heuristic(M, n_sel, d, gpu.sms, gpu.smem, gpu.operands_in_registers, gpu.tma),
        lambda: _candidates(M, n_sel, d, gpu.sms, gpu.smem, gpu.tma),
        launch,
        out,
    )
    launch(cfg)
    return out


def _launch(a, w_down_t, idx, bias, out, cfg) -> None:
    M, n_sel = a.shape
    if M > 1 and a.stride(0) % 16:
        # Rows of `a` not 32-byte aligned (odd k): the kernel's activation loads would be element-wise
        # and could not be asynchronous copies. Re-pitch once (M * k * 4 bytes moved, ~1% of the
        # weight bytes at M = 64). selective_up's own outputs are pitched already; one row needs none.
        padded = torch.empty((M, C.cdiv(n_sel, 16) * 16), device=a.device, dtype=a.dtype)
        padded[:, :n_sel].copy_(a)
        a = padded[:, :n_sel]
    tma_a = _uses_tma(cfg, M, C.has_tma(a.device)) and a.data_ptr() % 16 == 0
    plan = _plan(
        M,
        n_sel,
        *w_down_t.shape,
        a.stride(0) if M > 1 else 0,  # one row: any stride, and 0 tells the compiler it aligns
        w_down_t.stride(0),
        out.stride(0),
        cfg,
        sms=C.num_sms(a.device),
        has_bias=bias is not None,
        tma_a=tma_a,
        upcast=upcast_dot(a.dtype),
    )
    ws, cnt = C.split_workspace(out, (plan.partial_slots, M, out.shape[1]), plan.counters)
    plan.launch(
        A=a,
        A_DESC=C.TensorDescriptor.from_tensor(a, [cfg["BLOCK_M"], cfg["BLOCK_K"]]) if tma_a else a,
        W=w_down_t,
        BIAS=bias if bias is not None else a,  # a stand-in, never read, without HAS_BIAS
        IDX=idx,
        OUT=out,
        WS=ws,
        CNT=cnt,
    )


def _uses_tma(cfg: _tuning.Config, M: int, gpu_has_tma: bool) -> bool:
    """Whether a launch of ``cfg`` loads its activation tile by TMA (see :func:`_activation_by_tma`):
    the config asks for it, the GPU has TMA and the rows are pitched (the wrapper pitches them when
    M > 1; a descriptor also needs a 16-byte aligned base, which the wrapper checks)."""
    return bool(cfg.get("tma_a", 0)) and gpu_has_tma and M > 1


def _plan(
    M: int,
    n_sel: int,
    n_rows: int,
    d: int,
    stride_am: int,
    stride_wn: int,
    stride_om: int,
    cfg: _tuning.Config,
    *,
    sms: int,
    has_bias: bool,
    tma_a: bool,
    upcast: bool,
) -> C.LaunchPlan:
    """The launch of ``cfg`` at these sizes: split-K grid or stream-K (:class:`_common.LaunchPlan`)."""
    bm, bd, bk = cfg["BLOCK_M"], cfg["BLOCK_D"], cfg["BLOCK_K"]
    num_m = C.cdiv(M, bm)
    tiles = num_m * C.cdiv(d, bd)
    steps = C.cdiv(n_sel, bk)
    scalars = dict(M=M, n_sel=n_sel, d=d, n_rows=n_rows, num_m=num_m)
    scalars |= dict(stride_am=stride_am, stride_wn=stride_wn, stride_om=stride_om)
    constexprs = dict(
        BLOCK_M=bm,
        BLOCK_D=bd,
        BLOCK_K=bk,
        HAS_BIAS=has_bias,
        EVEN_D=d % bd == 0,
        UPCAST=upcast,
        TMA_A=tma_a,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    if cfg.get("stream_k", 0):
        return C.gemm_stream_k_launch(
            _down_stream_k_kernel, tiles, steps, sms * cfg["stream_k"], scalars, constexprs
        )
    k_chunk, splits = C.split_chunks(n_sel, bk, cfg["splits"])
    return C.LaunchPlan(
        _down_kernel,
        (tiles, splits),
        scalars | dict(k_chunk=k_chunk, n_splits=splits),
        constexprs | dict(SPLIT=splits > 1),
        splits,
        tiles,
    )


def selective_down_reference(
    a: torch.Tensor,
    w_down_t: torch.Tensor,
    idx: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Torch reference of :func:`selective_down`, computed in ``dtype``."""
    out = a.to(dtype) @ w_down_t[idx.long()].to(dtype)
    return out + bias.to(dtype) if bias is not None else out
