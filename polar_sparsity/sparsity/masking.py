"""Masking hooks on the unmodified Hugging Face model: evaluate a sparsity policy without kernels.

Per decoder layer (hook points from the family adapter):

* a forward pre-hook on the attention module keeps its ``hidden_states`` input: the router input, the
  same tensor the activation store holds;
* a forward pre-hook on the attention output projection views its input as (..., heads, head_dim) and
  zeroes the heads (or, for GQA, the KV groups) a token does not keep. Zeroing a head's output before
  the output projection is exactly what computing only the kept heads gives;
* for ReLU models with MLP routers, a forward pre-hook on the MLP down projection zeroes the neurons a
  token does not keep.

Nothing is masked where every unit is kept (top-k 1.0, dense layers, positions outside ``last:N``
multiply by exactly one), so a plan that keeps everything reproduces the dense logits bit for bit.
This module imports torch only: it runs on the GPU paths.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from polar_sparsity.models.families import FamilyAdapter, MlpKind, ModelGeometry
from polar_sparsity.schema import Mode
from polar_sparsity.sparsity.selection import (
    group_scores,
    head_norms,
    num_kept,
    random_scores,
    sparse_positions,
    topk_mask,
)


class Scorer(Protocol):
    """A router (``LoadedRouter`` from the bundle loader): what the masking hooks use of it."""

    @property
    def num_outputs(self) -> int:
        """Units it scores: heads, KV groups or neurons."""
        ...

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d) router inputs of any device and dtype -> (..., num_outputs) logits."""
        ...


@dataclass
class SparsityPlan:
    """What to mask: the mode, the kept fractions, where, and (mode=sparse) the routers per layer."""

    mode: Mode
    attn_topk: float = 1.0
    mlp_topk: float | None = None
    # Calibrated k per layer for one decode batch size (sparsity.mlp_batch_size); replaces mlp_topk.
    mlp_batch_size: int | None = None
    mlp_keep: Mapping[int, int] | None = None
    dense_attn_layers: frozenset[int] = frozenset({0})
    last_n: int | None = None  # positions=last:N; None = every position
    seed: int = 0  # random_attn
    head_routers: Mapping[int, Scorer] = field(default_factory=dict)
    mlp_routers: Mapping[int, Scorer] = field(default_factory=dict)

    def attn_units(self, geometry: ModelGeometry) -> int:
        """Heads for MHA, KV groups for GQA: selection is per KV group, as in the paper."""
        return geometry.num_kv_heads

    def attn_keep(self, geometry: ModelGeometry) -> int:
        """Heads (KV groups) each token keeps in a masked layer."""
        return num_kept(self.attn_topk, self.attn_units(geometry))

    def attn_layers(self, geometry: ModelGeometry) -> list[int]:
        """Layers whose attention is masked (none when every unit is kept)."""
        if self.mode == Mode.dense or self.attn_keep(geometry) == self.attn_units(geometry):
            return []
        return [layer for layer in range(geometry.num_layers) if layer not in self.dense_attn_layers]

    def mlp_layers(self, geometry: ModelGeometry) -> list[int]:
        """Layers whose MLP is masked (mode=sparse on a ReLU model): those keeping fewer than all neurons.

        With a calibrated table, layers whose k is the full width stay dense.
        """
        if self.mode != Mode.sparse or (self.mlp_topk is None and self.mlp_keep is None):
            return []
        ffn_dim = geometry.ffn_dim
        return [layer for layer in range(geometry.num_layers) if self.mlp_kept(layer, ffn_dim) < ffn_dim]

    def mlp_kept(self, layer: int, ffn_dim: int) -> int:
        """Neurons a token keeps in ``layer``: the calibrated k, else the fixed fraction's count.

        A layer missing from the calibrated k counts as dense here; ``check_plan`` refuses such a plan.
        """
        if self.mlp_keep is not None:
            return self.mlp_keep.get(layer, ffn_dim)
        return num_kept(self.mlp_topk, ffn_dim)  # type: ignore[arg-type]


def check_plan(plan: SparsityPlan, geometry: ModelGeometry, routers: bool = True) -> None:
    """Refuse a plan that cannot run as asked (before any evaluation starts).

    ``routers=False`` checks only what needs no routers (layers, MLP kind): before loading a bundle.
    """
    outside = sorted(layer for layer in plan.dense_attn_layers if not 0 <= layer < geometry.num_layers)
    if outside:
        raise ValueError(
            f"sparsity.dense_attn_layers has layers {outside} outside this model's "
            f"0..{geometry.num_layers - 1}"
        )
    mlp_setting = (
        f"sparsity.mlp_topk={plan.mlp_topk}"
        if plan.mlp_topk is not None
        else f"sparsity.mlp_batch_size={plan.mlp_batch_size}"
        if plan.mlp_batch_size is not None or plan.mlp_keep is not None
        else None
    )
    if mlp_setting and plan.mode == Mode.sparse and geometry.mlp_kind != MlpKind.relu:
        raise ValueError(
            f"{mlp_setting} needs a ReLU MLP; this model's MLP is {geometry.mlp_kind.value} (no exact "
            f"zeros to predict). Set it to null."
        )
    if plan.mlp_keep is not None:
        missing = [layer for layer in range(geometry.num_layers) if layer not in plan.mlp_keep]
        if missing:
            raise ValueError(f"the calibrated MLP k has no entry for layers {missing}")
    if plan.mode != Mode.sparse or not routers:
        return
    check_routers("head", plan.head_routers, plan.attn_layers(geometry), plan.attn_units(geometry))
    check_routers("MLP", plan.mlp_routers, plan.mlp_layers(geometry), geometry.ffn_dim)


def check_routers(kind: str, routers: Mapping[int, Scorer], layers: list[int], units: int) -> None:
    """Every layer that needs a router has one, scoring this model's units (masks and the engine alike)."""
    missing = [layer for layer in layers if layer not in routers]
    if missing:
        raise ValueError(
            f"mode=sparse needs a {kind} router for layers {missing}, but the bundle has none for them "
            f"(it has {sorted(routers)}); train them with train.py, or keep those layers dense"
        )
    for layer in layers:
        outputs = routers[layer].num_outputs
        if outputs != units:
            raise ValueError(
                f"the {kind} router of layer {layer} scores {outputs} units; this model has {units}"
            )


@dataclass
class SparsityStats:
    """Units kept / units seen over masked (layer, token) pairs, for reporting the real density."""

    attn_kept: int = 0
    attn_total: int = 0
    mlp_kept: int = 0
    mlp_total: int = 0

    def attn_density(self) -> float | None:
        return self.attn_kept / self.attn_total if self.attn_total else None

    def mlp_density(self) -> float | None:
        return self.mlp_kept / self.mlp_total if self.mlp_total else None


class SparsityController:
    """Live state of the hooks: the router inputs of the current forward and the row lengths."""

    def __init__(self, plan: SparsityPlan, geometry: ModelGeometry) -> None:
        self.plan = plan
        self.geometry = geometry
        self.router_inputs: dict[int, torch.Tensor] = {}
        self.lengths: torch.Tensor | None = None
        self.stats = SparsityStats()
        self._generators: dict[torch.device, torch.Generator] = {}

    def set_lengths(self, lengths: torch.Tensor | None) -> None:
        """Real lengths of right-padded rows (for last:N); None: rows end at the tensor's end."""
        self.lengths = lengths

    def generator(self, device: torch.device) -> torch.Generator:
        """One seeded generator per device: random_attn draws the same heads on every run."""
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.plan.seed)
        return self._generators[device]

    def position_mask(self, per_token: torch.Tensor) -> torch.Tensor | None:
        """(batch, seq) bool for a (batch, seq, ...) tensor: where last:N applies (None: everywhere)."""
        batch, length = per_token.shape[0], per_token.shape[1]
        return sparse_positions(batch, length, self.plan.last_n, self.lengths, per_token.device)


@contextmanager
def apply_sparsity(
    model: torch.nn.Module, adapter: FamilyAdapter, geometry: ModelGeometry, plan: SparsityPlan
) -> Iterator[SparsityController]:
    """Install the masking hooks for ``plan`` while the context is open (checked first)."""
    check_plan(plan, geometry)
    controller = SparsityController(plan, geometry)
    handles = []
    attn_layers, mlp_layers = plan.attn_layers(geometry), plan.mlp_layers(geometry)
    routed = sorted(set(attn_layers if plan.mode == Mode.sparse else []) | set(mlp_layers))
    for layer in routed:
        attention = adapter.attention(model, layer)
        handles.append(attention.register_forward_pre_hook(_keep_input(controller, layer), with_kwargs=True))
    for layer in attn_layers:
        out_proj = adapter.attn_out_proj(model, layer)
        handles.append(out_proj.register_forward_pre_hook(_mask_heads(controller, layer)))
    for layer in mlp_layers:
        down_proj = adapter.mlp_down_proj(model, layer)
        handles.append(down_proj.register_forward_pre_hook(_mask_neurons(controller, layer)))
    try:
        yield controller
    finally:
        for handle in handles:
            handle.remove()


def _keep_input(controller: SparsityController, layer: int):
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        controller.router_inputs[layer] = FamilyAdapter.attention_input(args, kwargs)

    return hook


def _head_unit_scores(controller: SparsityController, layer: int, attn_output: torch.Tensor) -> torch.Tensor:
    """(batch, seq, units) scores: router logits, true output norms (norm-ranked reference) or noise."""
    plan, geometry = controller.plan, controller.geometry
    units = plan.attn_units(geometry)
    if plan.mode == Mode.sparse:
        return plan.head_routers[layer].scores(controller.router_inputs[layer])
    if plan.mode == Mode.sparse_attn:
        norms = head_norms(attn_output, geometry.num_heads, geometry.head_dim)
        return group_scores(norms, geometry.group_size, "max")
    if plan.mode == Mode.random_attn:
        shape = (*attn_output.shape[:-1], units)
        return random_scores(shape, controller.generator(attn_output.device), attn_output.device)
    raise ValueError(f"mode {plan.mode} masks no heads")


def _apply_mask(
    controller: SparsityController, x: torch.Tensor, unit_mask: torch.Tensor, per_unit: int
) -> tuple[torch.Tensor, int, int]:
    """Zero the dropped units of ``x`` (unit i spans features [i * per_unit, (i + 1) * per_unit)).

    ``unit_mask`` is (batch, seq, units); ``x`` may be flattened over (batch, seq), as OPT's MLP is.
    Returns the masked tensor and (units kept, units seen) over the sparse positions.
    """
    unit_mask = unit_mask.to(x.device)
    positions = controller.position_mask(unit_mask)
    if positions is None:
        kept, total = int(unit_mask.sum()), unit_mask.numel()
    else:
        kept, total = int(unit_mask[positions].sum()), int(positions.sum()) * unit_mask.shape[-1]
        unit_mask = unit_mask | ~positions.unsqueeze(-1)  # outside last:N everything is kept
    multiplier = unit_mask.to(x.dtype)
    if per_unit > 1:
        multiplier = multiplier.repeat_interleave(per_unit, dim=-1)
    return x * multiplier.reshape(x.shape), kept, total


def _mask_heads(controller: SparsityController, layer: int):
    geometry = controller.geometry
    # A KV group's query heads are consecutive, so a group spans group_size * head_dim features.
    per_unit = geometry.group_size * geometry.head_dim

    def hook(module: torch.nn.Module, args: tuple) -> tuple:
        attn_output = args[0]
        scores = _head_unit_scores(controller, layer, attn_output)
        keep = controller.plan.attn_keep(geometry)
        masked, kept, total = _apply_mask(controller, attn_output, topk_mask(scores, keep), per_unit)
        controller.stats.attn_kept += kept
        controller.stats.attn_total += total
        return (masked, *args[1:])

    return hook


def _mask_neurons(controller: SparsityController, layer: int):
    geometry = controller.geometry

    def hook(module: torch.nn.Module, args: tuple) -> tuple:
        activations = args[0]
        router_input = controller.router_inputs[layer]
        scores = controller.plan.mlp_routers[layer].scores(router_input)
        keep = controller.plan.mlp_kept(layer, geometry.ffn_dim)
        masked, kept, total = _apply_mask(controller, activations, topk_mask(scores, keep), 1)
        controller.stats.mlp_kept += kept
        controller.stats.mlp_total += total
        return (masked, *args[1:])

    return hook
