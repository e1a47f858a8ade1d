"""Dense decode attention (all heads) from the same kernel: the in-engine dense baseline.

Works for MHA and GQA (query heads packed per KV group), with the same cache layout, device-resident
lengths and split-K as the selective ops, so dense-vs-sparse comparisons measure only the sparsity.
"""

from __future__ import annotations

import torch

from ._decode_attention import decode_attention, decode_attention_reference


def dense_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seqlens: torch.Tensor,
    *,
    sm_scale: float | None = None,
    out: torch.Tensor | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Decode attention over every head. q: (B, H_q, D); caches (B, H_kv, N_max, D); seqlens (B,) int32."""
    return decode_attention(q, k_cache, v_cache, seqlens, None, sm_scale=sm_scale, out=out, validate=validate)


def dense_decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seqlens: torch.Tensor,
    *,
    sm_scale: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Torch reference of :func:`dense_decode_attention` in ``dtype``."""
    return decode_attention_reference(q, k_cache, v_cache, seqlens, None, sm_scale=sm_scale, dtype=dtype)
