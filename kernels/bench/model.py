"""`mlp` and `block` benchmarks: a whole sparse MLP / decode transformer block, routers included.

Like the paper's single-block simulation: synthetic weights at real shapes, one decode step for a
batch of B sequences, dense vs sparse, each timed as one CUDA graph. Routers are plain torch matmuls:
the MLP router is low-rank (d -> 1024 -> n_neurons), its firing probabilities summed over the batch
(:func:`batch_firing_scores`, as the decoding engine does) and the top-k neurons shared by the
batch (:func:`topk_select`); the head router is one linear d -> n_heads (n_kv_groups for GQA) with
a per-sequence top-k. RoPE is left out (the same cost dense or sparse).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .. import (
    batch_firing_scores,
    dense_decode_attention,
    selective_down,
    selective_gated_up,
    selective_group_attention,
    selective_up,
    topk_select,
)
from ._harness import time_graph
from .attention import BACKENDS, _sdpa
from .shapes import ELEMENT_BYTES, Case, ModelShape, Point

ROUTER_RANK = 1024
# Activations of one decode step are small next to the weights; this many (batch x widest layer)
# buffers bounds them (inputs, norms, QKV, attention output, up/gate activations, outputs).
ACTIVATION_BUFFERS = 16


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

    def scores(self, x):
        return batch_firing_scores(F.linear(F.linear(x, self.r1), self.r2))  # the decoding engine's rule

    def route(self, x, k: int):
        return topk_select(self.scores(x), k)

    def sparse(self, x, k: int, idx=None):
        idx = self.route(x, k) if idx is None else idx
        if self.gated:
            h = selective_gated_up(x, self.w_gu[: self.n], self.w_gu[self.n :], idx, validate=False)
        else:
            h = selective_up(x, self.w_gu, idx, self.b_up, validate=False)
        return selective_down(h, self.w_down_t, idx, self.b_down, validate=False)


def mlp_weight_bytes(model: ModelShape) -> int:
    """The MLP's weights and biases plus its low-rank router."""
    d, n, gated = model.hidden, model.ffn, model.mlp == "gated"
    weights = (3 if gated else 2) * n * d + (0 if gated else n + d)
    return (weights + ROUTER_RANK * (d + n)) * ELEMENT_BYTES


def mlp_bytes_needed(case: Case) -> int:
    """Device bytes an ``mlp`` case allocates: the weights and the batch's activations."""
    m = case.model
    return mlp_weight_bytes(m) + ACTIVATION_BUFFERS * case.batch * 2 * m.ffn * ELEMENT_BYTES


def block_bytes_needed(case: Case) -> int:
    """Device bytes a ``block`` case allocates: the layer's weights, the KV cache, the activations."""
    m, B, N = case.model, case.batch, case.context
    attention = ((m.heads + 2 * m.kv_heads) * m.head_dim + m.heads * m.head_dim + m.kv_heads) * m.hidden
    kv_cache = 2 * B * m.kv_heads * N * m.head_dim
    widest = max(2 * m.ffn, (m.heads + 2 * m.kv_heads) * m.head_dim, m.hidden)
    return mlp_weight_bytes(m) + (attention + kv_cache + ACTIVATION_BUFFERS * B * widest) * ELEMENT_BYTES


def run_mlp(cases: list[Case]) -> Iterator[list[dict]]:
    """Each case's rows as soon as the case is timed (the cases of one MLP share its weights)."""
    for shape in dict.fromkeys(c.model for c in cases):
        name = shape.mlp_label()
        mlp = _Mlp(shape.hidden, shape.ffn, shape.mlp == "gated")
        for case in (c for c in cases if c.model == shape):
            rows = []
            M = case.batch
            print(f"[mlp] {case.label}", flush=True)
            x = _randn(M, shape.hidden)
            dense = time_graph([lambda mlp=mlp, x=x: mlp.dense(x)])
            rows.append(
                dict(shape=f"{name} M={M}", method="dense MLP (cuBLAS)", density=1.0, latency_us=dense)
            )
            for point in case.points:
                k = point.neurons
                idx = torch.randperm(shape.ffn, device="cuda")[:k].int()
                t = time_graph([lambda mlp=mlp, x=x, k=k: mlp.sparse(x, k)])
                t_kern = time_graph([lambda mlp=mlp, x=x, k=k, idx=idx: mlp.sparse(x, k, idx)])
                t_router = time_graph([lambda mlp=mlp, x=x, k=k: mlp.route(x, k)])
                scores = mlp.scores(x)
                t_select = time_graph([lambda scores=scores, k=k: topk_select(scores, k)])
                t_torch = time_graph([lambda scores=scores, k=k: torch.topk(scores, k, sorted=False)])
                for method, us in (
                    ("sparse MLP incl. router", t),
                    ("sparse MLP kernels only", t_kern),
                    ("router only", t_router),
                    ("router top-k only (topk_select)", t_select),
                    ("router top-k only (torch.topk)", t_torch),
                ):
                    rows.append(
                        dict(
                            shape=f"{name} M={M}",
                            method=method,
                            density=k / shape.ffn,
                            k=k,
                            latency_us=us,
                            speedup_vs_dense=dense / us,
                        )
                    )
            yield rows
        del mlp
        torch.cuda.empty_cache()


class _Block:
    """One pre-norm decode block: norm, QKV, cache write, attention, out proj, norm, MLP."""

    def __init__(self, case: Case):
        m = case.model
        self.c = c = {
            "d": m.hidden,
            "H": m.heads,
            "Hkv": m.kv_heads,
            "D": m.head_dim,
            "n": m.ffn,
            "gated": m.mlp == "gated",
            "B": case.batch,
            "N": case.context,
        }
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

    def forward(self, x, point: Point | None, attn: str = "ours"):
        """One decode step; ``point`` None is the dense block (attention by ``attn``)."""
        c = self.c
        h = self._norm(x)
        q = self._qkv(h)
        if point is None and attn == "sdpa":
            # GQA through the packed-query form (a group's query heads as a short query sequence).
            qs = q.view(c["B"], c["Hkv"], c["H"] // c["Hkv"], c["D"])
            o = _sdpa(BACKENDS["cudnn"], qs, self.k_cache, self.v_cache, False)[0]()
        elif point is None:
            o = dense_decode_attention(q, self.k_cache, self.v_cache, self.seqlens, validate=False)
        else:
            idx = torch.topk(F.linear(h, self.w_router), point.heads, dim=1, sorted=False).indices
            o = selective_group_attention(q, self.k_cache, self.v_cache, self.seqlens, idx, validate=False)
        x = x + F.linear(o.reshape(c["B"], -1), self.w_o)
        h2 = self._norm(x)
        if point is None or point.neurons is None:  # dense, or a SwiGLU MLP (kept dense)
            return x + self.mlp.dense(h2)
        return x + self.mlp.sparse(h2, point.neurons)


def run_block(cases: list[Case]) -> Iterator[list[dict]]:
    """Each case's rows as soon as the case is timed."""
    for i, case in enumerate(cases, 1):
        rows = []
        name = case.label
        print(f"[block] case {i}/{len(cases)}: {name}", flush=True)
        blk = _Block(case)
        x = _randn(case.batch, case.model.hidden)
        dense = {m: time_graph([lambda m=m, blk=blk, x=x: blk.forward(x, None, m)]) for m in ("sdpa", "ours")}
        for m, label in (("sdpa", "dense block (SDPA cuDNN attn)"), ("ours", "dense block (our dense attn)")):
            rows.append(dict(shape=name, method=label, density=1.0, latency_us=dense[m]))
        for point in case.points:
            us = time_graph([lambda point=point, blk=blk, x=x: blk.forward(x, point)])
            rows.append(
                dict(
                    shape=name,
                    method="sparse block incl. routers",
                    density=point.density,
                    k=point.heads,
                    active_neurons=point.neurons if point.neurons is not None else math.nan,
                    latency_us=us,
                    speedup_vs_dense_sdpa=dense["sdpa"] / us,
                    speedup_vs_dense_ours=dense["ours"] / us,
                )
            )
        del blk
        torch.cuda.empty_cache()
        for r in rows:
            r.setdefault("k", math.nan)
        yield rows
