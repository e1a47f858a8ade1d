"""How many attention units a sparsity setting keeps, said as "k of n".

``sparsity.attn_topk`` is a fraction and ``sparsity.attn_keep`` a whole count; with few units (3 KV
groups) a fraction hides what it keeps (0.34 keeps 2 of 3, 0.67 all 3), so results say "k of n" and
a setting that keeps everything is called out. Fractions go through ``selection.num_kept``.
"""

from __future__ import annotations

from polar_sparsity.models.families import ModelGeometry
from polar_sparsity.schema import SparsityConfig
from polar_sparsity.sparsity.selection import num_kept


def attn_unit_name(geometry: ModelGeometry) -> str:
    """What attention selection picks: heads (MHA) or KV groups (GQA)."""
    return "KV groups" if geometry.group_size > 1 else "heads"


def attn_kept(sparsity: SparsityConfig, geometry: ModelGeometry) -> int:
    """Heads (KV groups) kept per token and layer: ``attn_keep``, else ``attn_topk`` of them."""
    units = geometry.num_kv_heads
    if sparsity.attn_keep is None:
        return num_kept(sparsity.attn_topk, units)
    if sparsity.attn_keep > units:
        raise ValueError(
            f"sparsity.attn_keep={sparsity.attn_keep} but this model has {units} "
            f"{attn_unit_name(geometry)} per layer; use 1..{units}"
        )
    return sparsity.attn_keep


def attn_fraction(sparsity: SparsityConfig, geometry: ModelGeometry) -> float:
    """The top-k fraction that keeps exactly ``attn_kept`` units (``num_kept`` gives it back)."""
    if sparsity.attn_keep is None:
        return sparsity.attn_topk
    return attn_kept(sparsity, geometry) / geometry.num_kv_heads


def k_of_n(sparsity: SparsityConfig, geometry: ModelGeometry) -> str:
    """E.g. "2 of 3 KV groups": what one sparse layer keeps per token."""
    return f"{attn_kept(sparsity, geometry)} of {geometry.num_kv_heads} {attn_unit_name(geometry)}"
