"""Selective head attention for decode, MHA: per sequence, only the selected heads are computed.

Reads K/V of the selected (sequence, head) pairs only; see ``kernels._decode_attention`` for the
KV-cache layout ``(B, H, N_max, D)``, device-resident lengths and split-K.
"""

from __future__ import annotations

import torch

from ._decode_attention import decode_attention, decode_attention_reference


def _check_mha(q: torch.Tensor, k_cache: torch.Tensor) -> None:
    if q.dim() == 3 and k_cache.dim() == 4 and q.shape[1] != k_cache.shape[1]:
        raise ValueError(
            f"MHA needs as many query heads as KV heads; got q heads {q.shape[1]} and "
            f"k_cache heads {k_cache.shape[1]} (use selective_group_attention for GQA)"
        )


def selective_head_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seqlens: torch.Tensor,
    head_idx: torch.Tensor,
    *,
    sm_scale: float | None = None,
    out: torch.Tensor | None = None,
    zero_unselected: bool = True,
    validate: bool = True,
) -> torch.Tensor:
    """Decode attention for the heads ``head_idx`` ((B, k) int32 or int64, duplicate-free) of each sequence.

    q: (B, H, D); k_cache, v_cache: (B, H, N_max, D); seqlens: (B,) int32 on the device.
    Returns (B, H, D); unselected heads are zero (or untouched in ``out`` if ``zero_unselected=False``).
    """
    _check_mha(q, k_cache)
    return decode_attention(
        q,
        k_cache,
        v_cache,
        seqlens,
        head_idx,
        sm_scale=sm_scale,
        out=out,
        zero_unselected=zero_unselected,
        validate=validate,
    )


def selective_head_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seqlens: torch.Tensor,
    head_idx: torch.Tensor,
    *,
    sm_scale: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Torch reference of :func:`selective_head_attention` in ``dtype``."""
    _check_mha(q, k_cache)
    return decode_attention_reference(q, k_cache, v_cache, seqlens, head_idx, sm_scale=sm_scale, dtype=dtype)
