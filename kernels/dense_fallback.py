"""Never slower than dense: should this call run the sparse kernels or the dense path?

The dense paths are cuBLAS (``F.linear`` / ``torch.mm``) for the MLP and SDPA for attention. For a
(shape, batch) the decision is a crossover density: sparse when ``n_sel / n <= crossover``.

- **Measured** (per GPU, in the tuning cache beside the launch configs): :func:`measure_mlp_crossover`
  and :func:`measure_attention_crossover` time the dense path and the sparse kernels at a grid of
  densities, timed like the benchmarks, and store the largest density at which sparse was still
  faster (interpolated linearly towards the first density where it was not). ``python -m
  polar_sparsity.kernels.tune`` measures them for a model's shapes.
- **Cost model** (nothing measured): sparse latency ~= density x penalty x dense latency, with the
  penalty per op and batch calibrated on the H100 / H200 benchmark runs (untuned configs, the worst
  case; docs/kernels.md) and a 1.2x safety margin: sparse when ``density * penalty * 1.2 <= 1``.

Keys are bucketed like the launch configs (powers of two of batch, width and context), so one
measurement covers nearby shapes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import _common as C
from . import _tuning

DENSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
MARGIN = 1.2
# Sparse latency at density 1.0 over the dense path's with untuned (heuristic) configs, the worst model
# per batch bucket, rounded up (H200 2026-11-29 and H100 2026-11-23 runs: up + down vs cuBLAS up +
# down; selective attention vs SDPA cuDNN); with the margin, no case of the H200 heuristic run is
# slower than 1.03x dense. Above 64 rows the selective GEMMs re-read weight rows per batch tile while
# cuBLAS is compute-bound, hence the steep rise.
MLP_PENALTY = ((16, 1.7), (64, 2.0), (128, 3.0), (math.inf, 5.0))
ATTENTION_PENALTY = {"mha": 1.65, "gqa": 1.2}


def mlp_key(M: int, n: int, d: int, gated: bool) -> str:
    return f"mlp|g{int(gated)}|M{C.bucket(M)}|N{C.bucket(n)}|D{C.bucket(d)}"


def attention_key(batch: int, n_kv: int, group: int, head_dim: int, n_max: int) -> str:
    return (
        f"attention|D{C.next_pow2(head_dim)}|G{group}|B{C.bucket(batch)}|H{C.bucket(n_kv)}|N{C.bucket(n_max)}"
    )


def model_crossover_mlp(M: int) -> float:
    """The cost-model crossover density of the MLP at batch M (used when nothing is measured)."""
    penalty = next(p for limit, p in MLP_PENALTY if limit >= M)
    return 1.0 / (penalty * MARGIN)


def model_crossover_attention(group: int) -> float:
    """The cost-model crossover density of selective attention (MHA: group 1; GQA: group > 1)."""
    return 1.0 / (ATTENTION_PENALTY["mha" if group == 1 else "gqa"] * MARGIN)


# Crossovers read from the cache, by (cache file, key): the decoder asks per layer and step, the file
# is read once per key and process.
_SEEN: dict[tuple[str, str], float | None] = {}


def _measured(key: str, device: torch.device) -> float | None:
    if _tuning.mode() == "heuristic":
        return None
    cache = _tuning.user_cache(device)
    memo = (str(cache.path), key)
    if memo not in _SEEN:
        value = cache.get(key, section="crossovers")
        _SEEN[memo] = None if value is None else float(value)
    return _SEEN[memo]


def _store(key: str, crossover: float, device: torch.device) -> None:
    cache = _tuning.user_cache(device)
    cache.put({key: crossover}, section="crossovers")
    _SEEN[(str(cache.path), key)] = crossover


def mlp_crossover(M: int, n: int, d: int, gated: bool, device: torch.device) -> tuple[float, str]:
    """(crossover density, 'measured' or 'model') for an MLP of ``n`` neurons, width ``d``, batch M."""
    measured = _measured(mlp_key(M, n, d, gated), device)
    return (measured, "measured") if measured is not None else (model_crossover_mlp(M), "model")


def attention_crossover(
    batch: int, n_kv: int, group: int, head_dim: int, n_max: int, device: torch.device
) -> tuple[float, str]:
    """(crossover density, 'measured' or 'model') for selective vs dense (SDPA) decode attention."""
    measured = _measured(attention_key(batch, n_kv, group, head_dim, n_max), device)
    return (measured, "measured") if measured is not None else (model_crossover_attention(group), "model")


def use_sparse_mlp(M: int, n_sel: int, n: int, d: int, gated: bool, device: torch.device) -> bool:
    """True when the selective up + down kernels beat the dense MLP for ``n_sel`` of ``n`` neurons."""
    _check_counts("n_sel", n_sel, n)
    return n_sel / n <= mlp_crossover(M, n, d, gated, device)[0]


def use_sparse_attention(
    batch: int, n_sel: int, n_kv: int, group: int, head_dim: int, n_max: int, device: torch.device
) -> bool:
    """True when selective decode attention over ``n_sel`` of ``n_kv`` KV heads beats dense SDPA."""
    _check_counts("n_sel", n_sel, n_kv)
    return n_sel / n_kv <= attention_crossover(batch, n_kv, group, head_dim, n_max, device)[0]


def _check_counts(name: str, n_sel: int, n: int) -> None:
    if not 1 <= n_sel <= n:
        raise ValueError(f"{name}={n_sel} is out of range; expected 1..{n}")


def crossover_from_timings(densities: Sequence[float], sparse_us: Sequence[float], dense_us: float) -> float:
    """Largest density where sparse is still no slower than dense, interpolated towards the next one.

    Scans from the lowest density; the first density where sparse is slower ends the scan (sparse is
    never used beyond a measured loss). 0.0 when sparse loses already at the lowest density.
    """
    last_d, last_t = 0.0, None
    for dens, t in zip(densities, sparse_us, strict=True):
        if t > dense_us:
            if last_t is None:
                return 0.0
            # Linear between the last win and this loss: where the sparse line meets the dense one.
            return last_d + (dens - last_d) * (dense_us - last_t) / (t - last_t)
        last_d, last_t = dens, t
    return last_d


# ----------------------------------------------------------------------------------------------
# Measurement (GPU only)
# ----------------------------------------------------------------------------------------------


def measure_mlp_crossover(
    M: int, n: int, d: int, gated: bool, device: torch.device, densities: Sequence[float] = DENSITIES
) -> dict:
    """Time the dense MLP and the sparse kernels at ``densities`` on synthetic weights of this shape,
    store the crossover in the tuning cache and return the timings. Tunes every key met on the way."""
    from .selective_mlp_down import selective_down
    from .selective_mlp_up import selective_gated_up, selective_up

    _need_cuda(device)
    dt = torch.float16
    w_gu = torch.randn(2 * n if gated else n, d, device=device, dtype=dt) / math.sqrt(d)
    b_up = None if gated else torch.randn(n, device=device, dtype=dt)
    w_down_t = torch.randn(n, d, device=device, dtype=dt) / math.sqrt(n)
    x = torch.randn(M, d, device=device, dtype=dt)

    def dense():
        h = F.linear(x, w_gu, b_up)
        h = F.silu(h[:, :n]) * h[:, n:] if gated else torch.relu(h)
        return torch.mm(h, w_down_t)

    def sparse(idx):
        if gated:
            h = selective_gated_up(x, w_gu[:n], w_gu[n:], idx, validate=False)
        else:
            h = selective_up(x, w_gu, idx, b_up, validate=False)
        return selective_down(h, w_down_t, idx, validate=False)

    timer = _tuning.GraphTimer(device)
    dense_us = timer(dense)
    sparse_us = []
    for dens in densities:
        idx = torch.randperm(n, device=device)[: max(1, round(dens * n))].int()
        sparse(idx)  # eager: tunes (or looks up) the keys of this k before timing
        sparse_us.append(timer(lambda i=idx: sparse(i)))
    crossover = crossover_from_timings(densities, sparse_us, dense_us)
    _store(mlp_key(M, n, d, gated), crossover, device)
    return {
        "key": mlp_key(M, n, d, gated),
        "dense_us": dense_us,
        "sparse_us": sparse_us,
        "crossover": crossover,
    }


def measure_attention_crossover(
    batch: int,
    n_kv: int,
    group: int,
    head_dim: int,
    n_max: int,
    device: torch.device,
    densities: Sequence[float] = DENSITIES,
) -> dict:
    """Time SDPA dense decode and selective attention at ``densities`` (full-length sequences), store
    the crossover in the tuning cache and return the timings. Tunes every key met on the way."""
    from ._decode_attention import decode_attention

    _need_cuda(device)
    dt = torch.float16
    q = torch.randn(batch, n_kv * group, head_dim, device=device, dtype=dt)
    k = torch.randn(batch, n_kv, n_max, head_dim, device=device, dtype=dt)
    v = torch.randn_like(k)
    seqlens = torch.full((batch,), n_max, device=device, dtype=torch.int32)
    # Dense path: SDPA, the group's query heads as a short query sequence (each KV head read once).
    q4 = q.view(batch, n_kv, group, head_dim)
    timer = _tuning.GraphTimer(device)
    dense_us = timer(lambda: F.scaled_dot_product_attention(q4, k, v))
    counts = sorted({max(1, round(dens * n_kv)) for dens in densities})
    sparse_us = []
    for kk in counts:
        idx = torch.rand(batch, n_kv, device=device).argsort(-1)[:, :kk].int().contiguous()
        decode_attention(q, k, v, seqlens, idx, validate=False)  # eager: tunes this key first
        sparse_us.append(timer(lambda i=idx: decode_attention(q, k, v, seqlens, i, validate=False)))
    fractions = [kk / n_kv for kk in counts]
    crossover = crossover_from_timings(fractions, sparse_us, dense_us)
    key = attention_key(batch, n_kv, group, head_dim, n_max)
    _store(key, crossover, device)
    return {"key": key, "dense_us": dense_us, "sparse_us": sparse_us, "crossover": crossover}


def _need_cuda(device: torch.device) -> None:
    if device.type != "cuda":
        raise ValueError(f"measuring a crossover needs a CUDA device; got {device}")
