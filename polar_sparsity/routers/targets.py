"""What a router is trained to predict: per-token labels from the store's head norms and MLP bits.

Shared by training, the metrics and (through the bundle's metadata) evaluation, so that "top-k" and
"KV group" mean the same everywhere: the counts and group scores come from
``polar_sparsity.sparsity.selection``. No Hydra or Lightning imports.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from polar_sparsity.schema import GroupReduce, RouterKind
from polar_sparsity.sparsity.selection import group_scores, num_kept


@dataclass(frozen=True)
class RouterTarget:
    """What one router predicts: its kind, layer, output units and (head routers) top-k count."""

    kind: RouterKind
    layer: int
    units: int  # outputs: heads, KV groups, or neurons
    k: int | None  # head routers: units labelled active per token
    num_heads: int
    num_kv_heads: int
    group_reduce: GroupReduce

    def __post_init__(self) -> None:
        # Records and tests spell kinds as plain strings; the enums reject a bad one here.
        object.__setattr__(self, "kind", RouterKind(self.kind))
        object.__setattr__(self, "group_reduce", GroupReduce(self.group_reduce))

    @classmethod
    def for_heads(
        cls, layer: int, topk: float, num_heads: int, num_kv_heads: int, group_reduce: GroupReduce
    ) -> RouterTarget:
        """A head router: one unit per KV group (per head for MHA models), the top-k labelled active."""
        k = num_kept(topk, num_kv_heads)
        return cls(RouterKind.mha, layer, num_kv_heads, k, num_heads, num_kv_heads, group_reduce)

    @classmethod
    def for_neurons(cls, layer: int, ffn_dim: int, num_heads: int, num_kv_heads: int) -> RouterTarget:
        """An MLP router: one unit per neuron, labelled by whether it fired."""
        return cls(RouterKind.mlp, layer, ffn_dim, None, num_heads, num_kv_heads, GroupReduce.max)

    @property
    def unit_name(self) -> str:
        if self.kind == RouterKind.mlp:
            return "neuron"
        return "kv_group" if self.num_kv_heads < self.num_heads else "head"

    def unit_scores(self, head_norms: torch.Tensor) -> torch.Tensor:
        """(..., heads) query-head norms -> (..., units) norms the head router's labels rank."""
        return group_scores(head_norms, self.num_heads // self.num_kv_heads, self.group_reduce.value)


def topk_labels(norms: torch.Tensor, k: int) -> torch.Tensor:
    """1.0 for each row's ``k`` largest units, else 0.0 (same dtype as ``norms``)."""
    labels = torch.zeros_like(norms)
    return labels.scatter_(-1, norms.topk(k, dim=-1).indices, 1.0)
