"""What a router is trained to predict: per-token labels from the store's head norms and MLP bits.

Shared by training, the metrics and (through the bundle's metadata) evaluation, so that "top-k" and
"KV group" mean the same everywhere. No Hydra or Lightning imports.
"""

from __future__ import annotations

import math

import torch

REDUCTIONS = ("max", "mean", "sum")


def topk_count(fraction: float, units: int) -> int:
    """Units kept for a top-k fraction: ceil(fraction * units), at least 1, at most ``units``."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"top-k fraction {fraction} must be in (0, 1]")
    # The tolerance keeps e.g. 0.7 * 10 = 7.000000000000001 at 7, not 8.
    return min(units, max(1, math.ceil(fraction * units - 1e-9)))


def unit_norms(head_norms: torch.Tensor, num_kv_heads: int, reduce: str = "max") -> torch.Tensor:
    """(..., heads) query-head norms -> (..., units): heads for MHA, KV groups for GQA.

    Query heads ``g * group_size .. (g + 1) * group_size - 1`` share KV head ``g`` (Hugging Face's
    ``repeat_kv`` layout), so a group is a contiguous block of heads.
    """
    num_heads = head_norms.shape[-1]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} heads do not split into {num_kv_heads} KV groups")
    if num_kv_heads == num_heads:
        return head_norms
    grouped = head_norms.reshape(*head_norms.shape[:-1], num_kv_heads, num_heads // num_kv_heads)
    if reduce == "max":
        return grouped.amax(-1)
    if reduce == "mean":
        return grouped.mean(-1)
    if reduce == "sum":
        return grouped.sum(-1)
    raise ValueError(f"group_reduce={reduce!r} is not one of {REDUCTIONS}")


def topk_labels(norms: torch.Tensor, k: int) -> torch.Tensor:
    """1.0 for each row's ``k`` largest units, else 0.0 (same dtype as ``norms``)."""
    labels = torch.zeros_like(norms)
    return labels.scatter_(-1, norms.topk(k, dim=-1).indices, 1.0)
