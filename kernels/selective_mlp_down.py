"""Selective MLP down projection from compact activations.

    out[m] = sum_j a[m, j] * W_down[:, idx[j]] + b_down

Weight layout: the *transposed* down weight ``w_down_t = W_down.T.contiguous()`` of shape
``(n_neurons, d)``, converted once at load time (:func:`prepare_down_weight`). The ``nn.Linear``
layout ``(d, n)`` would make a selected neuron a strided column (one 2-byte element per 2*n-byte
row); transposed, it is one contiguous row, so the kernel reads only the selected rows, in full
128-byte lines.

Parallelism: programs tile (batch rows x ``BLOCK_D`` output columns); because ``d / BLOCK_D`` alone
is too few programs for an H100, the sum over the k selected neurons is split; each split stores its
fp32 partial sum (plain stores, no atomics: deterministic) and a small second kernel adds the splits,
adds the bias and casts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import _common as C
from kernels import _tuning
from kernels._tl import dot, upcast_dot


@triton.jit
def _down_kernel(
    A, W, BIAS, IDX, OUT, WS,
    M, n_sel, d, n_rows, k_chunk, num_m,
    stride_am, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m = pid % num_m
    pid_d = pid // num_m
    sid = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rm < M
    rm_load = tl.where(mask_m, rm, 0).to(tl.int64)
    rd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = rd < d
    j_start = sid * k_chunk
    j_end = tl.minimum(j_start + k_chunk, n_sel)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # The weight addresses depend on the indices: load the next step's indices one iteration ahead
    # so the weight loads of a step never wait on an index load.
    rj_next = j_start + tl.arange(0, BLOCK_K)
    rows_next = tl.load(IDX + rj_next, mask=rj_next < j_end, other=0)
    for j0 in range(j_start, j_end, BLOCK_K):
        rj = j0 + tl.arange(0, BLOCK_K)
        mj = rj < j_end
        rows = rows_next
        rows_next = tl.load(IDX + rj + BLOCK_K, mask=rj + BLOCK_K < j_end, other=0)
        ok = mj & (rows >= 0) & (rows < n_rows)
        rows = tl.where(ok, rows, 0).to(tl.int64)
        # Padding / invalid neurons get zero activations, so their (valid, clamped) weight rows add 0.
        a = tl.load(A + rm_load[:, None] * stride_am + rj[None, :], mask=ok[None, :], other=0.0)
        w_ptrs = W + rows[:, None] * stride_wn + rd[None, :]
        w = tl.load(w_ptrs) if EVEN_D else tl.load(w_ptrs, mask=mask_d[None, :], other=0.0)
        acc = dot(a, w, acc, UPCAST)

    mask = mask_m[:, None] & mask_d[None, :]
    if SPLIT:
        # Plain stores of this split's partial sum (no atomics: deterministic, no memset needed).
        ws = WS + (sid * M + rm[:, None]).to(tl.int64) * d + rd[None, :]
        tl.store(ws, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(BIAS + rd, mask=mask_d, other=0.0).to(tl.float32)[None, :]
        o_ptrs = OUT + rm[:, None].to(tl.int64) * stride_om + rd[None, :]
        tl.store(o_ptrs, acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _down_finalize_kernel(
    WS, BIAS, OUT, M, d, n_splits, stride_om, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * d
    m = offs // d
    c = offs % d
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(0, n_splits):
        acc += tl.load(WS + s * M * d + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(BIAS + c, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + m.to(tl.int64) * stride_om + c, acc.to(OUT.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------


def _block_m(M: int) -> int:
    return min(64, max(16, C.next_pow2(M)))


def _splits_for(programs: int, n_sel: int, block_k: int, sms: int) -> int:
    """Split the k neurons until there are >= 2 waves of programs, keeping >= 2 steps per split."""
    split = 1
    while programs * split < 2 * sms and n_sel // (split * 2) >= 2 * block_k:
        split *= 2
    return split


def _heuristic(M: int, n_sel: int, d: int, sms: int) -> _tuning.Config:
    bm, bd, bk = _block_m(M), 128, 64
    programs = C.cdiv(M, bm) * C.cdiv(d, bd)
    return {"BLOCK_M": bm, "BLOCK_D": bd, "BLOCK_K": bk, "num_warps": 4, "num_stages": 4,
            "splits": _splits_for(programs, n_sel, bk, sms)}


def _candidates(M: int, n_sel: int, d: int, sms: int) -> list[_tuning.Config]:
    out = []
    bm = _block_m(M)
    for bd in (64, 128, 256):
        for bk in (32, 64):
            for ns in (3, 4):
                programs = C.cdiv(M, bm) * C.cdiv(d, bd)
                s = _splits_for(programs, n_sel, bk, sms)
                for split in sorted({s, s * 2}):
                    out.append({"BLOCK_M": bm, "BLOCK_D": bd, "BLOCK_K": bk, "num_warps": 4, "num_stages": ns,
                                "splits": split})
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
    C.check_index_tensor("idx", idx, a.device)
    if idx.shape[0] != a.shape[1]:
        raise ValueError(f"idx has {idx.shape[0]} entries but a has k={a.shape[1]} columns; they must match")
    if not 1 <= idx.shape[0] <= n:
        raise ValueError(f"idx has {idx.shape[0]} entries; expected 1..{n} (one per selected neuron)")
    if idx.stride(0) != 1:
        raise ValueError("idx must be contiguous; call .contiguous()")
    if bias is not None:
        C.check_shape("bias", bias, (d,), "(d,)")
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
    sms = C.num_sms(a.device)
    key = f"down|M{_block_m(M) if M <= 64 else C.bucket(M)}|K{C.bucket(n_sel)}|D{C.bucket(d)}"

    def launch(cfg: _tuning.Config) -> None:
        _launch(a, w_down_t, idx, bias, out, cfg)

    cfg = _tuning.pick(key, a.device, lambda: _heuristic(M, n_sel, d, sms),
                       lambda: _candidates(M, n_sel, d, sms), launch)
    launch(cfg)
    return out


def _launch(a, w_down_t, idx, bias, out, cfg) -> None:
    M, n_sel = a.shape
    d = w_down_t.shape[1]
    bm, bd, bk = cfg["BLOCK_M"], cfg["BLOCK_D"], cfg["BLOCK_K"]
    splits = max(1, min(cfg["splits"], C.cdiv(n_sel, bk)))
    k_chunk = C.cdiv(C.cdiv(n_sel, splits), bk) * bk
    splits = C.cdiv(n_sel, k_chunk)
    num_m = C.cdiv(M, bm)
    ws = torch.empty((splits, M, d), device=a.device, dtype=torch.float32) if splits > 1 else out
    b = bias if bias is not None else a  # dummy pointer when HAS_BIAS is False
    _down_kernel[(num_m * C.cdiv(d, bd), splits)](
        a, w_down_t, b, idx, out, ws, M, n_sel, d, w_down_t.shape[0], k_chunk, num_m,
        a.stride(0), w_down_t.stride(0), out.stride(0),
        BLOCK_M=bm, BLOCK_D=bd, BLOCK_K=bk, HAS_BIAS=bias is not None, SPLIT=splits > 1,
        EVEN_D=d % bd == 0, UPCAST=upcast_dot(a.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if splits > 1:
        block = 1024
        _down_finalize_kernel[(C.cdiv(M * d, block),)](
            ws, b, out, M, d, splits, out.stride(0), HAS_BIAS=bias is not None, BLOCK=block, num_warps=4)


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
