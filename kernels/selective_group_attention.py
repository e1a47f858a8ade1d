"""Selective KV-group attention for decode, GQA: per sequence, only the selected KV groups.

All ``G = H_q / H_kv`` query heads of a selected group are packed into the rows of one tile, so the
group's K/V is streamed from memory exactly once (never once per query head). Query head ``h``
belongs to group ``h // G`` (the Hugging Face ``repeat_kv`` convention).
"""

from __future__ import annotations

import torch

from ._decode_attention import decode_attention, decode_attention_reference


def selective_group_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seqlens: torch.Tensor,
    group_idx: torch.Tensor,
    *,
    sm_scale: float | None = None,
    out: torch.Tensor | None = None,
    zero_unselected: bool = True,
    validate: bool = True,
) -> torch.Tensor:
    """Decode attention for the KV groups ``group_idx`` ((B, k) int32 or int64, duplicate-free) per sequence.

    q: (B, H_q, D); k_cache, v_cache: (B, H_kv, N_max, D) with H_q a multiple of H_kv; seqlens: (B,)
    int32 on the device. Returns (B, H_q, D); the query heads of unselected groups are zero (or
    untouched in ``out`` if ``zero_unselected=False``).
    """
    return decode_attention(
        q,
        k_cache,
        v_cache,
        seqlens,
        group_idx,
        sm_scale=sm_scale,
        out=out,
        zero_unselected=zero_unselected,
        validate=validate,
    )


def selective_group_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seqlens: torch.Tensor,
    group_idx: torch.Tensor,
    *,
    sm_scale: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Torch reference of :func:`selective_group_attention` in ``dtype``."""
    return decode_attention_reference(q, k_cache, v_cache, seqlens, group_idx, sm_scale=sm_scale, dtype=dtype)
