"""Shared decode-attention kernel behind the MHA-head, GQA-group and dense decode ops.

One query token per sequence attends over a static KV cache.

KV cache layout: ``(B, H_kv, N_max, D)``, unit stride in D (a view of any larger buffer with that
innermost layout is fine). A selected (sequence, KV head) pair then owns one contiguous
``N_max * D`` stream for K and one for V, so the kernel reads selected bytes only, in long bursts.
This is also the layout SDPA takes, so the dense baselines read the very same tensors.

Per-sequence lengths live on the device (``seqlens``: (B,) int32) and are read inside the kernel:
nothing is read back to the host, so the ops can be captured in a CUDA graph. Split-K
(flash-decoding) cuts the context into ``splits`` chunks when there are too few (sequence, group)
programs to fill the GPU; a second kernel (or the last chunk to finish) merges the chunks' partial
softmax states. The stream-K schedule instead runs one program per resident slot over equal runs of
(pair, token block) iterations that cross pair boundaries (``_attn_stream_k_kernel``).

GQA: the program for a KV group loads all ``G = H_q / H_kv`` query heads of the group as the rows of
one tile (padded to 16 for the tensor cores), so each selected KV head is read exactly once.
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

LOG2E = 1.4426950408889634
# Finite "minus infinity" for running maxima (avoids inf - inf = NaN); constexpr so kernels may read it.
MASKED_MAX = tl.constexpr(-1.0e30)


@triton.jit
def _attn_pair(
    Q,
    K,
    V,
    SEQLENS,
    IDX,
    OUT,
    pid,
    n_sel,
    n_kv,
    n_max,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_vb,
    stride_vh,
    stride_ob,
    stride_oh,
    stride_ib,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_IDX: tl.constexpr,
):
    """The (sequence, selected group) pair ``pid``: its query tile, K/V bases, output pointers, masks
    (query rows; rows x head dims) and valid length."""
    b = pid // n_sel
    j = pid % n_sel
    g = tl.load(IDX + b * stride_ib + j) if HAS_IDX else j
    # Out-of-range indices do no work and write nothing (memory safety without a host check).
    ok = (g >= 0) & (g < n_kv)
    g = tl.where(ok, g, 0)
    seqlen = tl.where(ok, tl.minimum(tl.load(SEQLENS + b), n_max), 0)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    # Row mask as a vector (scalar-and-tensor masks are not portable to the CPU interpreter).
    mask_g = (offs_g < GROUP) & ((offs_g * 0 + ok.to(tl.int32)) != 0)
    b64 = b.to(tl.int64)  # B * H * N_max * D overflows int32 at real cache sizes
    g64 = g.to(tl.int64)
    heads = g * GROUP + offs_g
    mask_gd = mask_g[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(Q + b64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=mask_gd, other=0.0)
    k_base = K + b64 * stride_kb + g64 * stride_kh
    v_base = V + b64 * stride_vb + g64 * stride_vh
    o_ptrs = OUT + b64 * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
    return b, j, q, k_base, v_base, o_ptrs, mask_g, mask_gd, seqlen


@triton.jit
def _attn_range(
    q,
    k_base,
    v_base,
    start,
    end,
    qk_scale,
    stride_kn,
    stride_vn,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_DOT: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Unnormalised online-softmax state (running max, sum, P @ V) over the tokens start..end."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < HEAD_DIM
    m_i = tl.full([BLOCK_G], MASKED_MAX, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + offs_n
        mask_n = cols < end
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        if USE_DOT:
            s = dot(q, tl.trans(k), tl.zeros([BLOCK_G, BLOCK_N], tl.float32), UPCAST)
        else:
            # BLOCK_G == 1: a tensor-core tile would be 15/16 padding; reduce in registers instead.
            s = tl.reshape(tl.sum(k.to(tl.float32) * q.to(tl.float32), 1), (1, BLOCK_N))
        s = tl.where(mask_n[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if USE_DOT:
            pv = dot(p.to(v.dtype), v, tl.zeros([BLOCK_G, BLOCK_D], tl.float32), UPCAST)
        else:
            pv = tl.sum(tl.reshape(p, (BLOCK_N,))[:, None] * v.to(tl.float32), 0)[None, :]
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _attn_store_partial(
    PO,
    PML,
    slot,
    m_i,
    l_i,
    acc,
    mask_g,
    mask_gd,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    slot = slot.to(tl.int64)
    tl.store(PO + slot * (GROUP * HEAD_DIM) + offs_g[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=mask_gd)
    pml = PML + slot * (GROUP * 2) + offs_g * 2
    tl.store(pml, m_i, mask=mask_g)
    tl.store(pml + 1, l_i, mask=mask_g)


@triton.jit
def _attn_merge_here(
    PO,
    PML,
    CNT,
    OUT,
    pid,
    first_slot,
    n_parts,
    o_ptrs,
    mask_g,
    mask_gd,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """After storing its partial: count arrivals on pair ``pid``; the last of its ``n_parts`` programs
    adds the partial states in slot order (deterministic whichever is last), writes the output and
    resets the counter. No merge launch, no memset."""
    tl.debug_barrier()  # every thread's partial is written before the (release) arrival
    arrived = tl.atomic_add(CNT + pid, 1, sem="acq_rel", scope="gpu")
    if arrived == n_parts - 1:
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        m_t = tl.full([BLOCK_G], MASKED_MAX, tl.float32)
        l_t = tl.zeros([BLOCK_G], tl.float32)
        o_t = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for s in range(0, n_parts):
            ps = (first_slot + s).to(tl.int64)
            pml_s = PML + ps * (GROUP * 2) + offs_g * 2
            m_s = tl.load(pml_s, mask=mask_g, other=MASKED_MAX, cache_modifier=".cg")
            l_s = tl.load(pml_s + 1, mask=mask_g, other=0.0, cache_modifier=".cg")
            po_s = PO + ps * (GROUP * HEAD_DIM) + offs_g[:, None] * HEAD_DIM + offs_d[None, :]
            o_s = tl.load(po_s, mask=mask_gd, other=0.0, cache_modifier=".cg")
            m_n = tl.maximum(m_t, m_s)
            a_t = tl.exp2(m_t - m_n)
            a_s = tl.exp2(m_s - m_n)
            l_t = l_t * a_t + l_s * a_s
            o_t = o_t * a_t[:, None] + o_s * a_s[:, None]
            m_t = m_n
        o = o_t / tl.where(l_t > 0, l_t, 1.0)[:, None]
        tl.store(o_ptrs, o.to(OUT.dtype.element_ty), mask=mask_gd)
        tl.atomic_xchg(CNT + pid, 0, sem="relaxed", scope="gpu")


@triton.jit
def _attn_write(acc, l_i, OUT, o_ptrs, mask_gd):
    """Normalise a whole pair's state and write it (an empty sequence gives zeros, not NaN)."""
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_ptrs, o.to(OUT.dtype.element_ty), mask=mask_gd)


@triton.jit
def _attn_finish(
    PO,
    PML,
    CNT,
    OUT,
    pid,
    slot,
    first_slot,
    n_parts,
    m_i,
    l_i,
    acc,
    o_ptrs,
    mask_g,
    mask_gd,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr,
    MERGE_HERE: tl.constexpr,
):
    """Finish part ``slot`` (of ``n_parts``, from ``first_slot``) of pair ``pid``. One part: write it.
    Several: store the unnormalised partial state; the merge is a second kernel or, with MERGE_HERE,
    the last of the pair's programs to arrive. Without SPLIT the partial path is not compiled at all
    (its buffers are then stand-ins of another type)."""
    if SPLIT:
        if n_parts > 1:
            _attn_store_partial(
                PO, PML, slot, m_i, l_i, acc, mask_g, mask_gd, GROUP, HEAD_DIM, BLOCK_G, BLOCK_D
            )
            if MERGE_HERE:
                _attn_merge_here(
                    PO,
                    PML,
                    CNT,
                    OUT,
                    pid,
                    first_slot,
                    n_parts,
                    o_ptrs,
                    mask_g,
                    mask_gd,
                    GROUP,
                    HEAD_DIM,
                    BLOCK_G,
                    BLOCK_D,
                )
        else:
            _attn_write(acc, l_i, OUT, o_ptrs, mask_gd)
    else:
        _attn_write(acc, l_i, OUT, o_ptrs, mask_gd)


@triton.jit
def _attn_zero_unselected(
    OUT,
    IDX,
    b,
    n_sel,
    n_q,
    stride_ob,
    stride_oh,
    stride_ib,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Zeros to the query heads of sequence ``b``'s groups not in its index row (done by one program
    of the sequence: no memset launch and no extra programs, which cost a scheduling slot each)."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    sel = tl.load(IDX + b * stride_ib + offs_k, mask=offs_k < n_sel, other=-1)
    offs_h = tl.arange(0, BLOCK_H)
    hit = tl.sum(((offs_h // GROUP)[:, None] == sel[None, :]).to(tl.int32), 1)
    mask_h = (offs_h < n_q) & (hit == 0)
    z_ptrs = OUT + b.to(tl.int64) * stride_ob + offs_h[:, None] * stride_oh + offs_d[None, :]
    zeros = tl.zeros([BLOCK_H, BLOCK_D], tl.float32).to(OUT.dtype.element_ty)
    tl.store(z_ptrs, zeros, mask=mask_h[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit
def _attn_chunk_kernel(
    Q,
    K,
    V,
    SEQLENS,
    IDX,
    OUT,
    PO,
    PML,
    CNT,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_ib,
    n_sel,
    n_kv,
    n_q,
    n_max,
    chunk,
    n_splits,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_IDX: tl.constexpr,
    SPLIT: tl.constexpr,
    MERGE_HERE: tl.constexpr,
    ZERO_FILL: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Split-K (flash-decoding) schedule: program (pair, split) attends over one context chunk."""
    pid = tl.program_id(0)  # one (sequence, selected group) pair
    sid = tl.program_id(1)  # one context chunk of it
    b, j, q, k_base, v_base, o_ptrs, mask_g, mask_gd, seqlen = _attn_pair(
        Q,
        K,
        V,
        SEQLENS,
        IDX,
        OUT,
        pid,
        n_sel,
        n_kv,
        n_max,
        stride_qb,
        stride_qh,
        stride_kb,
        stride_kh,
        stride_vb,
        stride_vh,
        stride_ob,
        stride_oh,
        stride_ib,
        GROUP,
        BLOCK_G,
        HEAD_DIM,
        BLOCK_D,
        HAS_IDX,
    )
    start = sid * chunk
    m_i, l_i, acc = _attn_range(
        q,
        k_base,
        v_base,
        start,
        tl.minimum(start + chunk, seqlen),
        qk_scale,
        stride_kn,
        stride_vn,
        BLOCK_G,
        HEAD_DIM,
        BLOCK_D,
        BLOCK_N,
        USE_DOT,
        UPCAST,
    )
    _attn_finish(
        PO,
        PML,
        CNT,
        OUT,
        pid,
        pid * n_splits + sid,
        pid * n_splits,
        n_splits,
        m_i,
        l_i,
        acc,
        o_ptrs,
        mask_g,
        mask_gd,
        GROUP,
        HEAD_DIM,
        BLOCK_G,
        BLOCK_D,
        SPLIT,
        MERGE_HERE,
    )
    if ZERO_FILL:  # noqa: SIM102 - a constexpr branch, kept apart from the runtime test below
        if (j == 0) & (sid == 0):
            _attn_zero_unselected(
                OUT,
                IDX,
                b,
                n_sel,
                n_q,
                stride_ob,
                stride_oh,
                stride_ib,
                GROUP,
                HEAD_DIM,
                BLOCK_D,
                BLOCK_H,
                BLOCK_K,
            )


@triton.jit
def _attn_stream_k_kernel(
    Q,
    K,
    V,
    SEQLENS,
    IDX,
    OUT,
    PO,
    PML,
    CNT,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_ib,
    n_sel,
    n_kv,
    n_q,
    n_max,
    blocks,
    share,
    total,
    slots,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_IDX: tl.constexpr,
    SPLIT: tl.constexpr,
    ZERO_FILL: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Stream-K schedule: the pair-major (pair, BLOCK_N-token block of the cache) iterations are dealt
    out in equal ``share``s, one per program, one program per resident slot of the GPU: no partial
    last wave, one pipeline start-up per pair a program touches. A pair spanning several programs is
    merged by the last of them to arrive. Shares follow the cache size ``n_max``; blocks past a
    sequence's length cost a skipped loop."""
    p = tl.program_id(0)
    it = p * share
    it_end = tl.minimum(it + share, total)
    while it < it_end:
        pid, blk_lo, blk_hi, first, n_parts = stream_k_tile(it, it_end, blocks, share)
        b, j, q, k_base, v_base, o_ptrs, mask_g, mask_gd, seqlen = _attn_pair(
            Q,
            K,
            V,
            SEQLENS,
            IDX,
            OUT,
            pid,
            n_sel,
            n_kv,
            n_max,
            stride_qb,
            stride_qh,
            stride_kb,
            stride_kh,
            stride_vb,
            stride_vh,
            stride_ob,
            stride_oh,
            stride_ib,
            GROUP,
            BLOCK_G,
            HEAD_DIM,
            BLOCK_D,
            HAS_IDX,
        )
        m_i, l_i, acc = _attn_range(
            q,
            k_base,
            v_base,
            blk_lo * BLOCK_N,
            tl.minimum(blk_hi * BLOCK_N, seqlen),
            qk_scale,
            stride_kn,
            stride_vn,
            BLOCK_G,
            HEAD_DIM,
            BLOCK_D,
            BLOCK_N,
            USE_DOT,
            UPCAST,
        )
        _attn_finish(
            PO,
            PML,
            CNT,
            OUT,
            pid,
            pid * slots + p - first,
            pid * slots,
            n_parts,
            m_i,
            l_i,
            acc,
            o_ptrs,
            mask_g,
            mask_gd,
            GROUP,
            HEAD_DIM,
            BLOCK_G,
            BLOCK_D,
            SPLIT,
            True,
        )
        if ZERO_FILL:  # noqa: SIM102 - a constexpr branch, kept apart from the runtime test below
            if (j == 0) & (blk_lo == 0):
                _attn_zero_unselected(
                    OUT,
                    IDX,
                    b,
                    n_sel,
                    n_q,
                    stride_ob,
                    stride_oh,
                    stride_ib,
                    GROUP,
                    HEAD_DIM,
                    BLOCK_D,
                    BLOCK_H,
                    BLOCK_K,
                )
        it = pid * blocks + blk_hi


@triton.jit
def _attn_merge_kernel(
    PO,
    PML,
    IDX,
    OUT,
    stride_ob,
    stride_oh,
    stride_ib,
    n_sel,
    n_kv,
    n_splits,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HAS_IDX: tl.constexpr,
):
    # One program per (sequence, selected group, query head of the group): all splits are loaded
    # in one tile, so the merge costs one memory round trip instead of one per split.
    pid = tl.program_id(0)
    r = tl.program_id(1)
    b = pid // n_sel
    j = pid % n_sel
    g = tl.load(IDX + b * stride_ib + j) if HAS_IDX else j
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = ((g >= 0) & (g < n_kv)).to(tl.int32)  # vector masks below: see the chunk kernel
    ok_s = (offs_s < n_splits) & ((offs_s * 0 + g_ok) != 0)
    mask_d = offs_d < HEAD_DIM
    part = (pid * n_splits + offs_s).to(tl.int64)
    m_s = tl.load(PML + part * (GROUP * 2) + r * 2, mask=ok_s, other=MASKED_MAX)
    l_s = tl.load(PML + part * (GROUP * 2) + r * 2 + 1, mask=ok_s, other=0.0)
    o_s = tl.load(
        PO + part[:, None] * (GROUP * HEAD_DIM) + r * HEAD_DIM + offs_d[None, :],
        mask=ok_s[:, None] & mask_d[None, :],
        other=0.0,
    )
    w = tl.exp2(m_s - tl.max(m_s, 0))
    l_tot = tl.sum(l_s * w, 0)
    o = tl.sum(o_s * w[:, None], 0) / tl.where(l_tot > 0, l_tot, 1.0)
    head = tl.where(g_ok != 0, g, 0) * GROUP + r
    o_ptrs = OUT + b.to(tl.int64) * stride_ob + head * stride_oh + offs_d
    tl.store(o_ptrs, o.to(OUT.dtype.element_ty), mask=mask_d & ((offs_d * 0 + g_ok) != 0))


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------

MIN_CHUNK = 256  # tokens: shorter chunks spend more on the merge than they win in parallelism


def _split_options(programs: int, n_max: int, sms: int) -> list[int]:
    """Power-of-two split counts worth trying: from 1 up to enough programs for ~4 waves (more,
    shorter chunks only lost in the H100 sweeps: each chunk pays the pipeline start-up)."""
    most = max(1, C.next_pow2(C.cdiv(n_max, MIN_CHUNK)))
    opts, s = [], 1
    while s <= most:
        opts.append(s)
        if programs * s >= 4 * sms:
            break
        s *= 2
    return opts


@cache  # pure; called on every launch of a key that has no tuned config
def _heuristic(group: int, programs: int, n_max: int, sms: int, head_dim: int, smem: int) -> _tuning.Config:
    """A config from shape and SM count (what tuning picked on H100 and H200 at the benchmark shapes).

    Tensor-core products for every group size (tuning never picked the register reduction, even for one
    query head), on the K/V tile of :func:`_heuristic_tile`. Under four waves of (sequence, group)
    pairs: stream-K with as many programs per SM as fit, which balances any pair count (H200, Llama-3-70B
    B=64 N=8192, every candidate at 1-8 of 8 groups, 128-token tiles: 1.003-1.037x the best config of
    each shape, grid tiles 1.00-1.18x; OPT-66B B=64 N=1920 at 7 of 72 heads, 3.4 waves of pairs: 1.021x,
    the grid 1.058x). Otherwise splits: the fewest that fill one wave, since long chunks pay the
    pipeline start-up (index -> K/V load chain) once per program and many short chunks pay it per chunk
    (H100, Llama-3-70B one group of 8: 103.6 us with 2 splits vs 127.6 us with 32).
    """
    bn, nw, ns = _heuristic_tile(head_dim, smem)
    cfg = {"BLOCK_N": bn, "num_warps": nw, "num_stages": ns, "use_dot": 1, "merge_here": 0}
    if programs < 4 * sms:
        return cfg | {
            "splits": 1,
            "stream_k": C.resident_programs(nw, ns * bn * _kv_row_bytes(head_dim), smem),
        }
    splits = _split_options(programs, n_max, sms)
    return cfg | {"splits": next((s for s in splits if programs * s >= sms), splits[-1])}


def _heuristic_tile(head_dim: int, smem: int) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages): 64-token K/V tiles of 4 warps, with 3 or 2 pipeline stages,
    whichever keeps more K/V bytes in flight per SM (stages x programs resident; a tie keeps 3).

    Each SM must keep more bytes in flight the more bandwidth it has to pull: several small programs
    per SM do that where one program of 128-token tiles and 8 warps did not. An H200 cut to 64, 96,
    112 and 132 SMs by CUDA green contexts (2026-11-29; MHA OPT-66B B=64 N=1920 and Llama-2-7B B=256
    N=4096, GQA Llama-3-70B B=64 N=8192, every candidate at each shape): this tile (two programs per
    SM there) came within 1.00-1.06x of each shape's best at 132 SMs and 1.00-1.15x at 64-112, where
    128-token tiles of 8 warps took 1.01-1.04x and 1.02-1.53x.
    """
    row = _kv_row_bytes(head_dim)
    fitting = [s for s in (3, 2) if C.fit_stages(s, 64 * row, smem) == s]
    if not fitting:  # wide heads on a small shared memory: half as long tiles keep a pipeline
        return 32, 4, C.fit_stages(3, 32 * row, smem)
    return 64, 4, max(fitting, key=lambda s: s * C.resident_programs(4, s * 64 * row, smem))


# (BLOCK_N, num_warps, num_stages) tried: every combination that won a tuning run at the benchmark
# shapes on the H100 (2026-11-23/24) or the H200 (2026-11-29), plus one narrower GQA tile.
_TILES = {
    "mha": ((128, 8, 3), (128, 4, 3), (128, 4, 2), (64, 4, 2), (64, 8, 2), (64, 4, 3)),
    "gqa": ((64, 4, 3), (64, 8, 2), (128, 8, 3), (64, 4, 2), (32, 4, 3)),
}


def _candidates(
    group: int, programs: int, n_max: int, sms: int, head_dim: int, smem: int
) -> list[_tuning.Config]:
    # Split counts up to ~4 waves: at low density one long chunk per program (one or two waves, few
    # pipeline start-ups) can beat many short ones. The in-kernel merge is tried for <= 4 splits (its
    # last-arriving program reads the partials one after another). Tensor-core products only: the
    # register reduction (use_dot=0) never won a tuning run on H100 or H200. Stream-K (one program
    # per SM, and as many as fit) where a grid of pairs leaves a partial last wave that matters: under
    # 4 waves (H200, 2026-11-29: the fastest config at OPT-66B's 7 of 72 heads, 3.4 waves of pairs).
    out = []
    for bn, nw, ns in _TILES["mha" if group == 1 else "gqa"]:
        tile = {"BLOCK_N": bn, "num_warps": nw, "num_stages": ns, "use_dot": 1}
        for s in _split_options(programs, n_max, sms):
            out += [{**tile, "splits": s, "merge_here": mh} for mh in ((0, 1) if 1 < s <= 4 else (0,))]
        if programs < 4 * sms:
            resident = C.resident_programs(nw, ns * bn * _kv_row_bytes(head_dim), smem)
            out += [{**tile, "splits": 1, "merge_here": 0, "stream_k": r} for r in sorted({1, resident})]
    return out


def _kv_row_bytes(head_dim: int) -> int:
    """Shared memory per cached token and pipeline stage: one K row and one V row, fp16 / bf16."""
    return 2 * C.next_pow2(head_dim) * 2


def config_key(head_dim: int, group: int, programs: int, n_max: int) -> str:
    """Tuning-table key: head dim, query heads per KV head, bucketed (sequence, group) pairs and length."""
    return f"attn|D{C.next_pow2(head_dim)}|G{group}|P{C.bucket(programs)}|N{C.bucket(n_max)}"


def _check_inputs(q, k_cache, v_cache, seqlens, kv_idx, out) -> None:
    C.check_ndim("q", q, 3, "(batch, query_heads, head_dim)")
    C.check_ndim("k_cache", k_cache, 4, "(batch, kv_heads, max_len, head_dim)")
    C.check_dtype("q", q, C.LOW_PRECISION)
    device = q.device
    C.check_kernel_device(device)
    B, Hq, D = q.shape
    C.check_shape("v_cache", v_cache, k_cache.shape, "(same as k_cache)")
    if k_cache.shape[0] != B or k_cache.shape[3] != D:
        raise ValueError(
            f"k_cache has shape {tuple(k_cache.shape)}; expected (batch={B}, kv_heads, "
            f"max_len, head_dim={D}) to match q {tuple(q.shape)}"
        )
    if D % 8 or not 16 <= D <= 256:
        raise ValueError(
            f"head_dim {D} is unsupported; use a multiple of 8 in 16..256 "
            f"(model head dims {C.SUPPORTED_HEAD_DIMS} are all fine)"
        )
    Hkv = k_cache.shape[1]
    if Hq % Hkv:
        raise ValueError(f"query heads {Hq} must be a multiple of kv heads {Hkv}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        C.check_same_dtype(name, t, q.dtype)
        C.check_device(name, t, device)
        C.check_last_dim_contiguous(name, t)
    C.check_last_dim_contiguous("q", q)
    C.check_shape("seqlens", seqlens, (B,), "(batch,)")
    C.check_index_tensor("seqlens", seqlens, device)
    C.check_contiguous_vector("seqlens", seqlens)
    if kv_idx is not None:
        C.check_ndim("head/group indices", kv_idx, 2, "(batch, k)")
        C.check_index_tensor("head/group indices", kv_idx, device, C.INDEX_DTYPES)
        if kv_idx.shape[0] != B or not 1 <= kv_idx.shape[1] <= Hkv:
            raise ValueError(
                f"head/group indices have shape {tuple(kv_idx.shape)}; expected (batch={B}, k) "
                f"with 1 <= k <= {Hkv}"
            )
        if kv_idx.stride(1) != 1:
            raise ValueError("head/group indices must be contiguous along k; call .contiguous()")
    if out is not None:
        C.check_shape("out", out, q.shape, "(batch, query_heads, head_dim)")
        C.check_same_dtype("out", out, q.dtype)
        C.check_device("out", out, device)
        C.check_last_dim_contiguous("out", out)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seqlens: torch.Tensor,
    kv_idx: torch.Tensor | None = None,
    *,
    sm_scale: float | None = None,
    out: torch.Tensor | None = None,
    zero_unselected: bool = True,
    validate: bool = True,
) -> torch.Tensor:
    """Decode attention over the KV heads in ``kv_idx`` (all KV heads when None).

    q: (B, H_q, D); k_cache, v_cache: (B, H_kv, N_max, D); seqlens: (B,) int32 (valid prefix of the
    cache per sequence); kv_idx: (B, k) int32 or int64 KV-head indices, duplicate-free. Returns (B, H_q, D) in
    q's dtype; the query heads of unselected KV heads are zero, or left untouched in ``out`` when
    ``zero_unselected=False``. ``validate`` range-checks indices and lengths on the host (one sync;
    skipped during CUDA-graph capture); out-of-range indices are skipped in-kernel either way.
    """
    _check_inputs(q, k_cache, v_cache, seqlens, kv_idx, out)
    B, Hq, D = q.shape
    Hkv, n_max = k_cache.shape[1], k_cache.shape[2]
    if validate and not C.is_capturing():
        C.check_index_range("seqlens", seqlens, n_max + 1, True)
        if kv_idx is not None:
            C.check_index_range("head/group indices", kv_idx, Hkv, True)
    if out is None:
        out = torch.empty_like(q)  # unselected heads are zeroed by the kernel (ZERO_FILL programs)
    n_sel = Hkv if kv_idx is None else kv_idx.shape[1]
    scale = (1.0 / math.sqrt(D) if sm_scale is None else sm_scale) * LOG2E
    group = Hq // Hkv
    programs = B * n_sel
    sms, smem = C.num_sms(q.device), C.max_shared_memory(q.device)
    key = config_key(D, group, programs, n_max)

    zero_fill = kv_idx is not None and zero_unselected

    def launch(cfg: _tuning.Config) -> None:
        _launch(q, k_cache, v_cache, seqlens, kv_idx, out, scale, n_sel, group, cfg, zero_fill)

    cfg = _tuning.pick(
        key,
        q.device,
        lambda: _heuristic(group, programs, n_max, sms, D, smem),
        lambda: _candidates(group, programs, n_max, sms, D, smem),
        launch,
        out,
    )
    launch(cfg)
    return out


def _partial_states(out, seqlens, n_pairs: int, slots: int, group: int, merge_here: bool):
    """fp32 partial softmax states (P @ V; running max and sum) of ``slots`` chunks per pair, and the
    pairs' arrival counters for an in-kernel merge; unused tensors stand in where nothing is split."""
    if slots == 1:
        return out, out, seqlens
    D = out.shape[-1]
    po = torch.empty((n_pairs * slots, group, D), device=out.device, dtype=torch.float32)
    pml = torch.empty((n_pairs * slots, group, 2), device=out.device, dtype=torch.float32)
    return po, pml, C.split_counters(out.device, n_pairs) if merge_here else seqlens


def _launch(q, k_cache, v_cache, seqlens, kv_idx, out, scale, n_sel, group, cfg, zero_fill=False) -> None:
    B, Hq, D = q.shape
    has_idx = kv_idx is not None
    idx = kv_idx if has_idx else seqlens  # a stand-in, never read, when HAS_IDX is False
    strides = dict(stride_qb=q.stride(0), stride_qh=q.stride(1))
    for name, t in (("k", k_cache), ("v", v_cache)):
        strides |= {f"stride_{name}{dim}": t.stride(i) for i, dim in enumerate("bhn")}
    strides |= dict(
        stride_ob=out.stride(0), stride_oh=out.stride(1), stride_ib=kv_idx.stride(0) if has_idx else 0
    )
    attend, merge = _plan(
        B,
        Hq,
        D,
        *k_cache.shape[1:3],
        n_sel,
        group,
        strides,
        cfg,
        sms=C.num_sms(q.device),
        has_idx=has_idx,
        zero_fill=zero_fill,
        upcast=upcast_dot(q.dtype),
    )
    po, pml, cnt = _partial_states(out, seqlens, B * n_sel, attend.partial_slots, group, attend.counters > 0)
    attend.launch(
        Q=q, K=k_cache, V=v_cache, SEQLENS=seqlens, IDX=idx, OUT=out, PO=po, PML=pml, CNT=cnt, qk_scale=scale
    )
    if merge is not None:
        merge.launch(PO=po, PML=pml, IDX=idx, OUT=out)


def _plan(
    B: int,
    Hq: int,
    D: int,
    n_kv: int,
    n_max: int,
    n_sel: int,
    group: int,
    strides: dict[str, int],
    cfg: _tuning.Config,
    *,
    sms: int,
    has_idx: bool,
    zero_fill: bool,
    upcast: bool,
) -> tuple[C.LaunchPlan, C.LaunchPlan | None]:
    """The launches of ``cfg`` at these sizes: the attention kernel (split-K grid of (pair, chunk)
    programs or stream-K), and the merge of the chunks' partial states where the grid splits the
    context and does not merge in-kernel (else None). ``strides`` holds the kernels' stride arguments
    by name; ``counters`` of the attention plan is the pairs' arrival counters of an in-kernel merge
    (0 without one)."""
    bn = cfg["BLOCK_N"]
    use_dot = bool(cfg["use_dot"]) or group > 1
    block_d = C.next_pow2(D)
    n_pairs = B * n_sel
    blocks = C.cdiv(n_max, bn)
    scalars = strides | dict(n_sel=n_sel, n_kv=n_kv, n_q=Hq, n_max=n_max)
    constexprs = dict(
        GROUP=group,
        BLOCK_G=max(16, C.next_pow2(group)) if use_dot else 1,
        HEAD_DIM=D,
        BLOCK_D=block_d,
        BLOCK_N=bn,
        HAS_IDX=has_idx,
        ZERO_FILL=zero_fill,
        BLOCK_H=C.next_pow2(Hq) if zero_fill else 1,
        BLOCK_K=C.next_pow2(n_sel) if zero_fill else 1,
        USE_DOT=use_dot,
        UPCAST=upcast,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    if cfg.get("stream_k", 0):
        share, programs, slots = C.stream_k_plan(
            n_pairs * blocks, blocks, sms * cfg["stream_k"], C.cdiv(MIN_CHUNK, bn)
        )
        scalars |= dict(blocks=blocks, share=share, total=n_pairs * blocks, slots=slots)
        attend = C.LaunchPlan(
            _attn_stream_k_kernel,
            (programs,),
            scalars,
            constexprs | dict(SPLIT=slots > 1),
            slots,
            n_pairs if slots > 1 else 0,
        )
        return attend, None
    chunk, splits = C.split_chunks(n_max, bn, cfg["splits"])
    merge_here = splits > 1 and bool(cfg.get("merge_here", 0))
    attend = C.LaunchPlan(
        _attn_chunk_kernel,
        (n_pairs, splits),
        scalars | dict(chunk=chunk, n_splits=splits),
        constexprs | dict(SPLIT=splits > 1, MERGE_HERE=merge_here),
        splits,
        n_pairs if merge_here else 0,
    )
    if splits == 1 or merge_here:
        return attend, None
    merge = C.LaunchPlan(
        _attn_merge_kernel,
        (n_pairs, group),
        {name: strides[name] for name in ("stride_ob", "stride_oh", "stride_ib")}
        | dict(n_sel=n_sel, n_kv=n_kv, n_splits=splits),
        dict(
            GROUP=group,
            HEAD_DIM=D,
            BLOCK_D=block_d,
            BLOCK_S=C.next_pow2(splits),
            HAS_IDX=has_idx,
            num_warps=4,
        ),
    )
    return attend, merge


def decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seqlens: torch.Tensor,
    kv_idx: torch.Tensor | None = None,
    *,
    sm_scale: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Plain torch decode attention in ``dtype``; unselected KV groups' query heads are zero."""
    B, Hq, D = q.shape
    Hkv, n_max = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    qf = q.to(dtype).view(B, Hkv, G, D)
    s = torch.einsum("bhgd,bhnd->bhgn", qf, k_cache.to(dtype)) * scale
    pos = torch.arange(n_max, device=q.device)
    valid = pos[None, :] < seqlens.to(q.device).long()[:, None]  # (B, N)
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # empty sequences give all -inf rows -> zeros
    o = torch.einsum("bhgn,bhnd->bhgd", p, v_cache.to(dtype))
    if kv_idx is not None:
        sel = torch.zeros(B, Hkv, dtype=torch.bool, device=q.device)
        sel.scatter_(1, kv_idx.long(), True)
        o = o * sel[:, :, None, None]
    return o.reshape(B, Hq, D)
