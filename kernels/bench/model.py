"""`mlp` and `block` benchmarks: a whole sparse MLP / decode transformer block, routers included.

Like the paper's single-block simulation: synthetic weights at real shapes, one decode step for a
batch of B sequences, dense vs sparse, each timed as one CUDA graph. Routers are plain torch matmuls:
the MLP router is low-rank (d -> 1024 -> n_neurons), its scores summed over the batch and the top-k
neurons shared by the batch; the head router is one linear d -> n_heads (n_kv_groups for GQA) with a
per-sequence top-k. RoPE is left out (the same cost dense or sparse).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import (
    dense_decode_attention,
    selective_down,
    selective_gated_up,
    selective_group_attention,
    selective_up,
)
from ._harness import time_graph
from .attention import BACKENDS, _sdpa

MLPS = {
    "opt-66b d=9216 n=36864 relu": dict(d=9216, n=36864, gated=False),
    "llama-3-8b d=4096 n=14336 gated": dict(d=4096, n=14336, gated=True),
}
MLP_BATCHES = (16, 64)
DENSITIES = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
BLOCKS = {
    # OPT: ReLU MLP, so heads and MLP neurons are both sparse (same density on the x axis).
    "opt-66b B=64 N=1920": dict(d=9216, H=72, Hkv=72, D=128, n=36864, gated=False, B=64, N=1920),
    # Llama-3-70B: SwiGLU MLP stays dense (paper: attention sparsity only); KV groups are sparse.
    "llama-3-70b B=64 N=8192": dict(d=8192, H=64, Hkv=8, D=128, n=28672, gated=True, B=64, N=8192),
}
ROUTER_RANK = 1024


def _randn(*shape, scale=1.0, dtype=torch.float16):
    return torch.randn(*shape, device="cuda", dtype=dtype) * scale


class _Mlp:
    """Dense and sparse forward of one MLP with shared synthetic weights."""

    def __init__(self, d: int, n: int, gated: bool):
        self.n, self.gated = n, gated
        self.w_gu = _randn(2 * n if gated else n, d, scale=d**-0.5)
        self.b_up = None if gated else _randn(n, scale=0.1)
        self.w_down_t = _randn(n, d, scale=n**-0.5)  # kernel layout, converted once "at load"
        self.b_down = None if gated else _randn(d, scale=0.1)
        self.r1 = _randn(ROUTER_RANK, d, scale=d**-0.5)
        self.r2 = _randn(n, ROUTER_RANK, scale=ROUTER_RANK**-0.5)

    def dense(self, x):
        h = F.linear(x, self.w_gu, self.b_up)
        h = F.silu(h[:, : self.n]) * h[:, self.n :] if self.gated else torch.relu(h)
        out = torch.mm(h, self.w_down_t)
        return out + self.b_down if self.b_down is not None else out

    def route(self, x, k: int):
        scores = F.linear(F.linear(x, self.r1), self.r2).float().sum(0)
        return torch.topk(scores, k, sorted=False).indices.int()

    def sparse(self, x, k: int, idx=None):
        idx = self.route(x, k) if idx is None else idx
        if self.gated:
            h = selective_gated_up(x, self.w_gu[: self.n], self.w_gu[self.n :], idx, validate=False)
        else:
            h = selective_up(x, self.w_gu, idx, self.b_up, validate=False)
        return selective_down(h, self.w_down_t, idx, self.b_down, validate=False)


def run_mlp() -> list[dict]:
    rows = []
    for name, c in MLPS.items():
        mlp = _Mlp(c["d"], c["n"], c["gated"])
        for M in MLP_BATCHES:
            x = _randn(M, c["d"])
            dense = time_graph([lambda mlp=mlp, x=x: mlp.dense(x)])
            rows.append(
                dict(shape=f"{name} M={M}", method="dense MLP (cuBLAS)", density=1.0, latency_us=dense)
            )
            for dens in DENSITIES:
                k = max(1, round(dens * c["n"]))
                idx = torch.randperm(c["n"], device="cuda")[:k].int()
                t = time_graph([lambda mlp=mlp, x=x, k=k: mlp.sparse(x, k)])
                t_kern = time_graph([lambda mlp=mlp, x=x, k=k, idx=idx: mlp.sparse(x, k, idx)])
                t_router = time_graph([lambda mlp=mlp, x=x, k=k: mlp.route(x, k)])
                for method, us in (
                    ("sparse MLP incl. router", t),
                    ("sparse MLP kernels only", t_kern),
                    ("router only", t_router),
                ):
                    rows.append(
                        dict(
                            shape=f"{name} M={M}",
                            method=method,
                            density=k / c["n"],
                            k=k,
                            latency_us=us,
                            speedup_vs_dense=dense / us,
                        )
                    )
        del mlp
        torch.cuda.empty_cache()
    for r in rows:
        r["bench"] = "mlp"
    return rows


class _Block:
    """One pre-norm decode block: norm, QKV, cache write, attention, out proj, norm, MLP."""

    def __init__(self, c: dict):
        self.c = c
        d, H, Hkv, D, B, N = c["d"], c["H"], c["Hkv"], c["D"], c["B"], c["N"]
        self.w_qkv = _randn((H + 2 * Hkv) * D, d, scale=d**-0.5)
        self.w_o = _randn(d, H * D, scale=(H * D) ** -0.5)
        self.w_router = _randn(Hkv, d, scale=d**-0.5)
        self.k_cache = _randn(B, Hkv, N, D)
        self.v_cache = _randn(B, Hkv, N, D)
        self.seqlens = torch.full((B,), N, device="cuda", dtype=torch.int32)
        self.mlp = _Mlp(d, c["n"], c["gated"])

    def _norm(self, x):
        return F.layer_norm(x, x.shape[-1:]) if not self.c["gated"] else F.rms_norm(x, x.shape[-1:])

    def _qkv(self, h):
        c = self.c
        B, H, Hkv, D = c["B"], c["H"], c["Hkv"], c["D"]
        qkv = F.linear(h, self.w_qkv)
        q = qkv[:, : H * D].view(B, H, D)
        k_new = qkv[:, H * D : (H + Hkv) * D].view(B, Hkv, D)
        v_new = qkv[:, (H + Hkv) * D :].view(B, Hkv, D)
        self.k_cache[:, :, c["N"] - 1].copy_(k_new)  # the KV cache is written for every head
        self.v_cache[:, :, c["N"] - 1].copy_(v_new)
        return q

    def forward(self, x, density: float | None, attn: str = "ours"):
        c = self.c
        h = self._norm(x)
        q = self._qkv(h)
        if density is None and attn == "sdpa":
            # GQA through the packed-query form (a group's query heads as a short query sequence).
            qs = q.view(c["B"], c["Hkv"], c["H"] // c["Hkv"], c["D"])
            o = _sdpa(BACKENDS["cudnn"], qs, self.k_cache, self.v_cache, False)[0]()
        elif density is None:
            o = dense_decode_attention(q, self.k_cache, self.v_cache, self.seqlens, validate=False)
        else:
            kk = max(1, round(density * c["Hkv"]))
            idx = torch.topk(F.linear(h, self.w_router), kk, dim=1, sorted=False).indices.int()
            o = selective_group_attention(q, self.k_cache, self.v_cache, self.seqlens, idx, validate=False)
        x = x + F.linear(o.reshape(c["B"], -1), self.w_o)
        h2 = self._norm(x)
        if density is None or c["gated"]:
            return x + self.mlp.dense(h2)
        return x + self.mlp.sparse(h2, max(1, round(density * c["n"])))


def run_block() -> list[dict]:
    rows = []
    for name, c in BLOCKS.items():
        blk = _Block(c)
        x = _randn(c["B"], c["d"])
        dense = {m: time_graph([lambda m=m, blk=blk, x=x: blk.forward(x, None, m)]) for m in ("sdpa", "ours")}
        for m, label in (("sdpa", "dense block (SDPA cuDNN attn)"), ("ours", "dense block (our dense attn)")):
            rows.append(dict(shape=name, method=label, density=1.0, latency_us=dense[m]))
        dens_list = [g / c["Hkv"] for g in range(1, c["Hkv"] + 1)] if c["gated"] else DENSITIES
        for dens in dens_list:
            us = time_graph([lambda dens=dens, blk=blk, x=x: blk.forward(x, dens)])
            rows.append(
                dict(
                    shape=name,
                    method="sparse block incl. routers",
                    density=dens,
                    latency_us=us,
                    speedup_vs_dense_sdpa=dense["sdpa"] / us,
                    speedup_vs_dense_ours=dense["ours"] / us,
                )
            )
        del blk
        torch.cuda.empty_cache()
    for r in rows:
        r["bench"] = "block"
        r.setdefault("k", math.nan)
    return rows
