"""`attn` (MHA heads) and `gqa` (KV groups) decode-attention benchmarks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import dense_decode_attention, selective_group_attention, selective_head_attention
from ._harness import rotations, time_graph, try_time

MHA_SHAPES = {
    "opt-66b B=64 N=1920 72x128": dict(B=64, N=1920, H=72, Hkv=72, D=128),
    "llama-2-7b B=256 N=4096 32x128": dict(B=256, N=4096, H=32, Hkv=32, D=128),
}
GQA_SHAPES = {"llama-3-70b B=64 N=8192 64q/8kv x128": dict(B=64, N=8192, H=64, Hkv=8, D=128)}
MHA_DENSITIES = (0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
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


def bench_shape(name: str, s: dict, densities, bw: float, gqa: bool, dtype=torch.float16) -> list[dict]:
    B, H, Hkv, N, D = s["B"], s["H"], s["Hkv"], s["N"], s["D"]
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, H, D, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(B, Hkv, N, D, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(B, Hkv, N, D, device="cuda", dtype=dtype, generator=g)
    seqlens = torch.full((B,), N, device="cuda", dtype=torch.int32)
    rows = _dense_baselines(name, s, q, k, v, seqlens, gqa)
    op = selective_group_attention if gqa else selective_head_attention
    for dens in densities:
        kk = max(1, round(dens * Hkv))
        nbytes = B * kk * N * D * 2 * q.element_size()
        R = rotations(nbytes)
        idx = torch.rand(R, B, Hkv, device="cuda").argsort(-1)[..., :kk].int().contiguous()
        fns = [lambda q=q, k=k, v=v, i=idx[i]: op(q, k, v, seqlens, i, validate=False) for i in range(R)]
        us = time_graph(fns)
        rows.append(
            dict(
                shape=name,
                method="selective (ours)",
                density=kk / Hkv,
                k=kk,
                latency_us=us,
                bytes=nbytes,
                rotations=R,
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


def run(kind: str, bw: float) -> list[dict]:
    rows = []
    if kind == "attn":
        for name, s in MHA_SHAPES.items():
            rows += bench_shape(name, s, MHA_DENSITIES, bw, gqa=False)
    else:
        for name, s in GQA_SHAPES.items():
            dens = [g / s["Hkv"] for g in range(1, s["Hkv"] + 1)]
            rows += bench_shape(name, s, dens, bw, gqa=True)
    for r in rows:
        r["bench"] = kind
    return rows
