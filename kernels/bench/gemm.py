"""`gemm` benchmark: selective up / gated up / down projections vs cuBLAS on the full weight.

Beside each selective point, cuBLAS runs the same GEMM on a contiguous block of as many weight rows
(method ``cublas, kept rows only``): the bytes and FLOPs of the selective op with the gather for
free, i.e. what the vendor library reaches at that size. Where a selective op misses its bandwidth
limit, this row says how much of the miss any kernel of that size pays (launch, ramp-up, tail); the
``streaming read, same bytes`` row is the floor of that: a plain read of as many bytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .. import _common as C
from .. import _tuning, selective_down, selective_gated_up, selective_up
from .. import selective_mlp_down as _down_mod
from .. import selective_mlp_up as _up_mod
from ._harness import l2_bytes, rotations, same_bytes_read_us, time_graph
from .shapes import ELEMENT_BYTES, SELECTIVE, STREAM_READ, Case

TUNE_MAX_M = 256  # with --tune, every benchmark batch size is swept (graph-timed)
MAX_ROTATIONS = 16  # ``rotations()``'s cap
KEPT_ROWS = "cublas, kept rows only"  # the same-size dense GEMM (see the module docstring)


def _weights(d: int, n: int, gated: bool, copies: int, dtype) -> list[dict]:
    out = []
    for _ in range(copies):
        w_gu = torch.randn(2 * n if gated else n, d, device="cuda", dtype=dtype) / math.sqrt(d)
        out.append(
            dict(
                w_gu=w_gu,  # gated: [gate; up] stacked, as one cuBLAS GEMM for the dense baseline
                w_gate=w_gu[:n] if gated else None,
                w_up=w_gu[n:] if gated else w_gu,
                b_up=None if gated else torch.randn(n, device="cuda", dtype=dtype),
                w_down_t=torch.randn(n, d, device="cuda", dtype=dtype) / math.sqrt(n),
                b_down=None if gated else torch.randn(d, device="cuda", dtype=dtype),
            )
        )
    return out


def weight_copies(d: int, n: int, l2: int) -> int:
    """Weight sets one timed cycle rotates through so that >= 4x L2 is read per cycle."""
    return max(1, math.ceil(4 * l2 / (n * d * ELEMENT_BYTES)))


def bytes_needed(case: Case, l2: int) -> int:
    """Device bytes the case allocates: the rotated weight copies (up or gate+up, down, biases) and, at
    the densest point, the activations, index sets and one output per rotated call (graph pool)."""
    d, n, gated = case.model.hidden, case.model.ffn, case.model.mlp == "gated"
    copies = weight_copies(d, n, l2)
    weights = copies * ((3 if gated else 2) * n * d + n + d) * ELEMENT_BYTES
    M, k = case.batch, max(p.neurons for p in case.points)
    calls = max(copies, MAX_ROTATIONS)
    inputs = (M * d + M * n + M * k) * ELEMENT_BYTES
    outputs = calls * M * ((2 if gated else 1) * n + d + k + d) * ELEMENT_BYTES
    index_sets = calls * (n * 8 + k * 4)  # randperm's int64, then the int32 prefix
    return weights + inputs + outputs + index_sets


def _row_block(w: torch.Tensor, rows: int, i: int) -> torch.Tensor:
    """The ``i``-th of consecutive blocks of ``rows`` contiguous weight rows (wrapping): rotated
    calls read different rows, as the selective op's rotated index sets do."""
    blocks = max(1, w.shape[0] // rows)
    start = (i % blocks) * rows
    return w[start : start + rows]


def _up(w: dict, x, idx):
    if w["w_gate"] is not None:
        return selective_gated_up(x, w["w_gate"], w["w_up"], idx, validate=False)
    return selective_up(x, w["w_up"], idx, w["b_up"], validate=False)


def _sweep(key: str, heuristic: dict, candidates: list[dict], make_fns, out: torch.Tensor) -> None:
    """Graph-timed tuning: time every candidate exactly as the benchmark times the op (CUDA-graph
    replay over rotated inputs) and record the fastest whose result (in ``out``) agrees with the
    heuristic config's. Cold single-launch timing (the generic tuner) mis-ranks configs of these
    10-300 us kernels."""
    if key in _tuning.tuned_keys():
        return
    device = torch.device("cuda")
    configs = _tuning.with_first([heuristic, _tuning.known_config(key, device)], candidates)
    best = _tuning.tune(key, configs, lambda cfg: time_graph(make_fns(cfg), reps=10), device, out)
    _tuning.record(key, best, device)


def _tune_case(M, d, n_rows, k, gated, ws, copies, x, a, idx) -> None:
    gpu = C.gpu_facts(x.device)
    sms, smem = gpu.sms, gpu.smem
    R = len(idx)
    up_out = torch.empty(M, k, device="cuda", dtype=x.dtype)
    down_out = torch.empty(M, d, device="cuda", dtype=x.dtype)

    def up_fns(cfg):
        return [
            lambda w=ws[i % copies], j=idx[i]: _up_mod._launch(
                x, w["w_gate"], w["w_up"], w["b_up"], j, up_out, not gated, cfg
            )
            for i in range(R)
        ]

    def down_fns(cfg):
        return [
            lambda w=ws[i % copies], j=idx[i]: _down_mod._launch(
                a, w["w_down_t"], j, w["b_down"], down_out, cfg
            )
            for i in range(R)
        ]

    _sweep(
        _up_mod.config_key(M, k, d, gated),
        _up_mod._heuristic(M, k, d, sms, gated, smem, gpu.operands_in_registers),
        _up_mod._candidates(M, k, d, sms, gated, smem),
        up_fns,
        up_out,
    )
    _sweep(
        _down_mod.config_key(M, k, d),
        _down_mod._heuristic(M, k, d, sms, smem, gpu.operands_in_registers, gpu.tma),
        _down_mod._candidates(M, k, d, sms, smem, gpu.tma),
        down_fns,
        down_out,
    )


def _row(model, op, M, method, dens, k, us, nbytes, bw, dense_us=math.nan) -> dict:
    limit = nbytes / bw * 1e6
    return dict(
        shape=f"{model} {op} M={M}",
        model=model,
        op=op,
        M=M,
        method=method,
        density=dens,
        k=k,
        latency_us=us,
        bytes=nbytes,
        limit_us=limit,
        frac_of_limit=limit / us,
        speedup_vs_cublas_dense=dense_us / us,
    )


def bench_model(
    cases: list[Case], bw: float, dtype=torch.float16, tune: bool = False
) -> Iterator[list[dict]]:
    """The cases of one model (one batch size each), sharing its weights: each case's rows once timed."""
    shape = cases[0].model
    model, d, n, gated = shape.mlp_label(), shape.hidden, shape.ffn, shape.mlp == "gated"
    esz = torch.finfo(dtype).bits // 8
    up_full = (2 if gated else 1) * n * d * esz
    copies = weight_copies(d, n, l2_bytes())
    ws = _weights(d, n, gated, copies, dtype)
    up_name = "gated up" if gated else "up"
    for case in cases:
        rows = []
        M = case.batch
        print(f"[gemm] {case.label}", flush=True)
        x = torch.randn(M, d, device="cuda", dtype=dtype)
        a_full = torch.randn(M, n, device="cuda", dtype=dtype)
        dense_up = time_graph([lambda w=w, x=x: F.linear(x, w["w_gu"], w["b_up"]) for w in ws])
        dense_down = time_graph([lambda w=w, a=a_full: torch.mm(a, w["w_down_t"]) for w in ws])
        rows.append(_row(model, up_name, M, "cublas dense", 1.0, n, dense_up, up_full, bw, dense_up))
        rows.append(_row(model, "down", M, "cublas dense", 1.0, n, dense_down, n * d * esz, bw, dense_down))
        for point in case.points:
            k = point.neurons
            up_bytes = up_full * k // n + (M * d + M * k) * esz
            down_bytes = n * d * esz * k // n + (M * d + M * k) * esz
            R = max(copies, rotations(min(up_bytes, down_bytes)))
            idx = [torch.randperm(n, device="cuda")[:k].int() for _ in range(R)]
            a = torch.randn(M, k, device="cuda", dtype=dtype)
            if tune and M <= TUNE_MAX_M:
                _tune_case(M, d, n, k, gated, ws, copies, x, a, idx)
            t_up = time_graph([lambda w=ws[i % copies], x=x, j=idx[i]: _up(w, x, j) for i in range(R)])
            t_down = time_graph(
                [
                    lambda w=ws[i % copies], a=a, j=idx[i]: selective_down(
                        a, w["w_down_t"], j, w["b_down"], validate=False
                    )
                    for i in range(R)
                ]
            )
            up_rows = [_row_block(ws[i % copies]["w_gu"], (2 if gated else 1) * k, i) for i in range(R)]
            down_rows = [_row_block(ws[i % copies]["w_down_t"], k, i) for i in range(R)]
            t_up_rows = time_graph([lambda w=w, x=x: F.linear(x, w) for w in up_rows])
            t_down_rows = time_graph([lambda w=w, a=a: torch.mm(a, w) for w in down_rows])
            reads = (same_bytes_read_us(up_bytes), same_bytes_read_us(down_bytes))
            for method, tu, td in (
                (SELECTIVE, t_up, t_down),
                (KEPT_ROWS, t_up_rows, t_down_rows),
                (STREAM_READ, *reads),
            ):
                rows.append(_row(model, up_name, M, method, k / n, k, tu, up_bytes, bw, dense_up))
                rows.append(_row(model, "down", M, method, k / n, k, td, down_bytes, bw, dense_down))
        yield rows
    del ws
    torch.cuda.empty_cache()


def run(bw: float, cases: list[Case], tune: bool = False) -> Iterator[list[dict]]:
    """``tune``: graph-timed sweep of every config key met at M <= TUNE_MAX_M (fills the table);
    larger M then uses the shipped table (the generic cold-launch tuner is switched off here)."""
    forced = tune
    if tune:
        _tuning.set_force_tune(False)
    try:
        for model in dict.fromkeys(c.model for c in cases):
            yield from bench_model([c for c in cases if c.model == model], bw, tune=tune)
    finally:
        _tuning.set_force_tune(forced)
