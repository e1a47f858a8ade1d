"""`attn` (MHA heads) and `gqa` (KV groups) decode-attention benchmarks.

Beside each selective point, SDPA cuDNN runs dense attention over a cache that holds only as many
KV heads (method ``sdpa cudnn, kept heads only``): the selective op's bytes with the gather for
free, i.e. what the vendor kernel reaches at that size (GQA as packed queries, each KV head read
once); the ``streaming read, same bytes`` row is a plain read of as many bytes, the floor any kernel
of that size pays.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import dense_decode_attention, selective_group_attention, selective_head_attention
from ._harness import rotations, same_bytes_read_us, time_graph, try_time
from .shapes import ELEMENT_BYTES, SELECTIVE, STREAM_READ, Case

MAX_ROTATIONS = 16  # ``rotations()``'s cap: index sets (and graph-pool outputs) per timed call
KEPT_HEADS = "sdpa cudnn, kept heads only"  # the same-size dense attention (module docstring)
BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def _sdpa(backend: SDPBackend, q, k, v, gqa: bool):
    def fn():
        with sdpa_kernel(backend):
            return (
                F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
                if gqa
                else F.scaled_dot_product_attention(q, k, v)
            )

    return [fn]


def _dense_baselines(name: str, s: dict, q, k, v, seqlens, gqa: bool) -> list[dict]:
    B, H, Hkv, N, D = s["B"], s["H"], s["Hkv"], s["N"], s["D"]
    q4 = q.view(B, H, 1, D)
    runs = {f"sdpa {b} dense": (lambda be=be: _sdpa(be, q4, k, v, gqa)) for b, be in BACKENDS.items()}
    if gqa:  # the group's query heads as a short query sequence: each KV head read once
        qp = q.view(B, Hkv, H // Hkv, D)
        for b in ("cudnn", "flash"):
            runs[f"sdpa {b} dense packed-query"] = lambda be=BACKENDS[b]: _sdpa(be, qp, k, v, False)
    runs["dense (ours)"] = lambda: [lambda: dense_decode_attention(q, k, v, seqlens, validate=False)]
    rows = []
    for method, factory in runs.items():
        us, err = try_time(factory)
        rows.append(
            dict(
                shape=name,
                method=method,
                density=1.0,
                k=Hkv,
                latency_us=us,
                bytes=B * Hkv * N * D * 2 * q.element_size(),
                note=err,
            )
        )
    return rows


def _dims(case: Case) -> dict:
    m = case.model
    return dict(B=case.batch, N=case.context, H=m.heads, Hkv=m.kv_heads, D=m.head_dim)


def bytes_needed(case: Case, l2: int) -> int:
    """Device bytes the case allocates: the KV cache, the kept-heads-only caches of the densest point
    (rotated to >= 4x L2), queries, one output per baseline and per rotated call (CUDA-graph pool),
    and the rotated index sets (random keys, argsort's int64, int32 copy)."""
    s = _dims(case)
    B, H, Hkv, N, D = s["B"], s["H"], s["Hkv"], s["N"], s["D"]
    kv_cache = 2 * B * Hkv * N * D * ELEMENT_BYTES
    kept_caches = kv_cache + 4 * l2
    queries_and_outputs = (1 + len(BACKENDS) + 5 + 2 * MAX_ROTATIONS) * B * H * D * ELEMENT_BYTES
    index_sets = MAX_ROTATIONS * B * Hkv * (4 + 8 + 4)
    return kv_cache + kept_caches + queries_and_outputs + index_sets


def _kept_heads_only(q, kept: int, group: int, N: int, rot: int) -> list:
    """SDPA cuDNN over fresh caches of ``kept`` KV heads per sequence (``rot`` of them, rotated): the
    selective op's bytes, no gather. GQA: a group's query heads as a packed query of length G."""
    B, _, D = q.shape
    q_kept = q[:, : kept * group].reshape(B, kept, group, D)
    caches = [torch.randn(2, B, kept, N, D, device=q.device, dtype=q.dtype) for _ in range(rot)]
    return [fn for kv in caches for fn in _sdpa(BACKENDS["cudnn"], q_kept, kv[0], kv[1], False)]


def bench_shape(case: Case, bw: float, dtype=torch.float16) -> list[dict]:
    s, name, gqa = _dims(case), case.label, case.model.gqa
    B, H, Hkv, N, D = s["B"], s["H"], s["Hkv"], s["N"], s["D"]
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, H, D, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(B, Hkv, N, D, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(B, Hkv, N, D, device="cuda", dtype=dtype, generator=g)
    seqlens = torch.full((B,), N, device="cuda", dtype=torch.int32)
    rows = _dense_baselines(name, s, q, k, v, seqlens, gqa)
    op = selective_group_attention if gqa else selective_head_attention
    for point in case.points:
        kk = point.heads
        nbytes = B * kk * N * D * 2 * q.element_size()
        R = rotations(nbytes)
        idx = torch.rand(R, B, Hkv, device="cuda").argsort(-1)[..., :kk].int().contiguous()
        fns = [lambda q=q, k=k, v=v, i=idx[i]: op(q, k, v, seqlens, i, validate=False) for i in range(R)]
        us = time_graph(fns)
        kept_us, err = try_time(lambda q=q, kk=kk, R=R: _kept_heads_only(q, kk, H // Hkv, N, R))
        read_us = same_bytes_read_us(nbytes)
        for method, t, note in ((SELECTIVE, us, ""), (KEPT_HEADS, kept_us, err), (STREAM_READ, read_us, "")):
            rows.append(
                dict(
                    shape=name,
                    method=method,
                    density=kk / Hkv,
                    k=kk,
                    latency_us=t,
                    bytes=nbytes,
                    rotations=R,
                    note=note,
                )
            )
    for r in rows:
        r["limit_us"] = r["bytes"] / bw * 1e6
        ok = not math.isnan(r["latency_us"])
        r["frac_of_limit"] = r["limit_us"] / r["latency_us"] if ok else math.nan
    cudnn = next(r["latency_us"] for r in rows if r["method"] == "sdpa cudnn dense")
    for r in rows:
        r["speedup_vs_sdpa_cudnn_dense"] = cudnn / r["latency_us"]
    del q, k, v
    torch.cuda.empty_cache()
    return rows


def run(kind: str, bw: float, cases: list[Case]) -> Iterator[list[dict]]:
    """Each case's rows as soon as the case is timed."""
    for i, case in enumerate(cases, 1):
        print(f"[{kind}] case {i}/{len(cases)}: {case.label}", flush=True)
        yield bench_shape(case, bw)
