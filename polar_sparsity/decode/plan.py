"""What the engine makes sparse, and how routers become the index tensors the kernels read.

The selection rules are the evaluation's (``polar_sparsity.sparsity.selection``): ``num_kept`` for
how many units a fraction keeps, ``topk_indices`` for which. Heads are ranked per sequence (per KV
group for GQA models: the head routers score KV groups, exactly as the evaluation masks use them);
MLP neurons are ranked once for the whole batch on the router logits summed over the batch (the
selective up/down GEMMs share one neuron subset across the batch).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from polar_sparsity.models.families import MlpKind, ModelGeometry
from polar_sparsity.routers.bundle import load_routers
from polar_sparsity.schema import SparsityConfig
from polar_sparsity.sparsity.budget import attn_fraction
from polar_sparsity.sparsity.calibration import load_calibration
from polar_sparsity.sparsity.masking import Scorer, check_routers
from polar_sparsity.sparsity.selection import batch_neuron_scores, num_kept, topk_indices

MODES = ("dense", "sparse")


@dataclass(frozen=True)
class DecodePlan:
    """What the decode steps make sparse (prefill is always dense).

    ``mode='sparse'``: every layer outside ``dense_attn_layers`` ranks its heads (KV groups) with
    ``head_routers[layer]`` and keeps ``num_kept(attn_topk, units)`` of them per sequence. With
    ``mlp_routers`` (ReLU models), each layer keeps ``mlp_keep(layer, batch_size)`` neurons shared by
    the batch, or ``num_kept(mlp_topk, ffn_dim)`` when ``mlp_keep`` is None.
    """

    mode: str = "dense"
    attn_topk: float = 1.0
    dense_attn_layers: frozenset[int] = frozenset({0})
    head_routers: Mapping[int, Scorer] = field(default_factory=dict)
    mlp_routers: Mapping[int, Scorer] = field(default_factory=dict)
    mlp_keep: Callable[[int, int], int] | None = None
    mlp_topk: float | None = None

    def sparse_attn_layers(self, geometry: ModelGeometry) -> list[int]:
        if self.mode != "sparse":
            return []
        return [layer for layer in range(geometry.num_layers) if layer not in self.dense_attn_layers]

    def sparse_mlp_layers(self, geometry: ModelGeometry) -> list[int]:
        if self.mode != "sparse" or (self.mlp_keep is None and self.mlp_topk is None):
            return []
        return list(range(geometry.num_layers))

    def attn_keep(self, geometry: ModelGeometry) -> int:
        """Heads (MHA) or KV groups (GQA) each sequence keeps in a sparse layer."""
        return num_kept(self.attn_topk, geometry.num_kv_heads)

    def neurons_kept(self, layer: int, batch_size: int, geometry: ModelGeometry) -> int:
        """Neurons the batch shares in a sparse MLP layer: the calibration table's k, else mlp_topk's."""
        if self.mlp_keep is not None:
            keep = int(self.mlp_keep(layer, batch_size))
            if not 1 <= keep <= geometry.ffn_dim:
                raise ValueError(
                    f"mlp_keep({layer}, {batch_size}) = {keep}; must be in 1..{geometry.ffn_dim} neurons"
                )
            return keep
        return num_kept(self.mlp_topk, geometry.ffn_dim)  # type: ignore[arg-type]

    def attn_density(self, geometry: ModelGeometry) -> dict[int, float]:
        """Fraction of heads (KV groups) each layer's decode attention reads."""
        sparse = set(self.sparse_attn_layers(geometry))
        kept = self.attn_keep(geometry) / geometry.num_kv_heads
        return {layer: kept if layer in sparse else 1.0 for layer in range(geometry.num_layers)}

    def mlp_density(self, geometry: ModelGeometry, batch_size: int) -> dict[int, float]:
        """Fraction of MLP neurons each layer computes at this batch size."""
        sparse = set(self.sparse_mlp_layers(geometry))
        return {
            layer: self.neurons_kept(layer, batch_size, geometry) / geometry.ffn_dim
            if layer in sparse
            else 1.0
            for layer in range(geometry.num_layers)
        }

    def check(self, geometry: ModelGeometry, routers: bool = True) -> None:
        """Refuse a plan that cannot run on this geometry (before any weights are touched).

        ``routers=False`` checks only what needs no routers (layers, fractions, MLP kind).
        """
        if self.mode not in MODES:
            raise ValueError(f"decode mode {self.mode!r} is not one of {MODES}")
        outside = sorted(layer for layer in self.dense_attn_layers if not 0 <= layer < geometry.num_layers)
        if outside:
            raise ValueError(
                f"dense_attn_layers has layers {outside} outside this model's 0..{geometry.num_layers - 1}"
            )
        num_kept(self.attn_topk, geometry.num_kv_heads)  # checks the fraction
        if self.mlp_topk is not None:
            num_kept(self.mlp_topk, geometry.ffn_dim)
        if self.mode != "sparse":
            return
        mlp_layers = self.sparse_mlp_layers(geometry)
        if mlp_layers and geometry.mlp_kind != MlpKind.relu:
            raise ValueError(
                f"a sparse MLP needs a ReLU model; this model's MLP is {geometry.mlp_kind.value} "
                f"(no exact zeros to predict): set sparsity.mlp_topk=null"
            )
        if not routers:
            return
        check_routers("head", self.head_routers, self.sparse_attn_layers(geometry), geometry.num_kv_heads)
        check_routers("MLP", self.mlp_routers, mlp_layers, geometry.ffn_dim)


def build_plan(
    mode: str,
    sparsity: SparsityConfig,
    geometry: ModelGeometry,
    bundle_dir: str | Path | None,
    model_name: str,
    device: torch.device | str,
    dtype: torch.dtype,
) -> DecodePlan:
    """The decode plan for a mode and the shared sparsity options, routers loaded from the bundle.

    Uses the evaluation's bundle loader (``load_routers``): a missing bundle, missing layers or a
    bundle trained for another model is an error here, before the engine is built. ``mode='dense'``
    needs no bundle.
    """
    mode = getattr(mode, "value", mode)
    if mode not in MODES:
        raise ValueError(f"decode mode {mode!r} is not one of {MODES} (the engine decodes dense or sparse)")
    dense_attn_layers = frozenset(sparsity.dense_layers(geometry.num_layers))
    if mode == "dense":
        plan = DecodePlan(mode="dense", dense_attn_layers=dense_attn_layers)
        plan.check(geometry)
        return plan
    mlp_keep = _calibrated_keep(sparsity, geometry, bundle_dir, model_name)
    asked = DecodePlan(
        mode="sparse",
        attn_topk=attn_fraction(sparsity, geometry),  # sparsity.attn_keep as the fraction keeping it
        dense_attn_layers=dense_attn_layers,
        mlp_keep=mlp_keep,
        mlp_topk=sparsity.mlp_topk,
    )
    asked.check(geometry, routers=False)  # layer ranges, fractions, MLP kind: before the bundle
    unrouted = _without_full_fractions(asked, geometry)
    head_layers, mlp_layers = unrouted.sparse_attn_layers(geometry), unrouted.sparse_mlp_layers(geometry)
    if (head_layers or mlp_layers) and bundle_dir is None:
        raise ValueError("mode=sparse needs a router bundle (paths.routers); train routers with train.py")
    load = dict(device=device, model=model_name, dtype=dtype, geometry=geometry.as_dict())
    router_topk = sparsity.router_topk or sparsity.attn_topk
    head_routers = load_routers(bundle_dir, "mha", router_topk, head_layers, **load) if head_layers else {}
    mlp_routers = load_routers(bundle_dir, "mlp", layers=mlp_layers, **load) if mlp_layers else {}
    plan = replace(unrouted, head_routers=head_routers, mlp_routers=mlp_routers)
    plan.check(geometry)
    return plan


def _calibrated_keep(
    sparsity: SparsityConfig, geometry: ModelGeometry, bundle_dir: str | Path | None, model_name: str
) -> Callable[[int, int], int] | None:
    """Neurons kept per (layer, batch size) from the bundle's calibration table, for ReLU models.

    An explicit ``sparsity.mlp_topk`` wins (the user asked for that fraction); without one, the
    table's k for the engine's own batch size applies (nearest calibrated batch size at or above it);
    layers the table does not cover stay dense. None: no table (the MLP is dense unless mlp_topk).
    """
    if sparsity.mlp_topk is not None or bundle_dir is None or geometry.mlp_kind != MlpKind.relu:
        return None
    table = load_calibration(bundle_dir, model=model_name)
    if table is None:
        return None
    layers = set(table.layers)

    def keep(layer: int, batch_size: int) -> int:
        return table.keep(layer, batch_size) if layer in layers else geometry.ffn_dim

    return keep


def _without_full_fractions(plan: DecodePlan, geometry: ModelGeometry) -> DecodePlan:
    """As in the evaluation masks, a fraction that keeps every unit is dense and needs no routers."""
    if plan.attn_keep(geometry) == geometry.num_kv_heads:
        plan = replace(plan, dense_attn_layers=frozenset(range(geometry.num_layers)))
    full_mlp = plan.mlp_topk is not None and num_kept(plan.mlp_topk, geometry.ffn_dim) == geometry.ffn_dim
    if plan.mlp_keep is None and full_mlp:
        plan = replace(plan, mlp_topk=None)
    return plan


def head_indices(router: Scorer, router_input: torch.Tensor, keep: int) -> torch.Tensor:
    """(B, keep) int64: the heads (KV groups) each sequence keeps, ranked by its router's logits."""
    scores = router.scores(router_input)
    return topk_indices(scores, keep).contiguous()  # the kernels take top-k's int64 as is


def neuron_indices(router: Scorer, router_input: torch.Tensor, keep: int) -> torch.Tensor:
    """(keep,) int64: the neurons the batch shares, ranked by the batch's score (the calibration's rule)."""
    scores = batch_neuron_scores(router.scores(router_input))
    return topk_indices(scores, keep).contiguous()
