"""Forward hooks that capture router inputs, per-head output norms and MLP activity per layer.

Hooks sit on the unmodified Hugging Face modules named by the family adapter. Every captured tensor
is flattened over (batch, sequence) in row-major order, so one row is one token and a flattened
attention mask selects the non-padding rows of all of them alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from polar_sparsity.models.families import FamilyAdapter, MlpKind, ModelGeometry
from polar_sparsity.sparsity.selection import head_norms


@dataclass
class LayerCapture:
    router_input: torch.Tensor | None = None  # (tokens, d)
    head_norms: torch.Tensor | None = None  # (tokens, H) float32
    mlp_active: torch.Tensor | None = None  # (tokens, F) bool, ReLU models only


@dataclass
class Captured:
    layers: list[LayerCapture] = field(default_factory=list)

    def clear(self) -> None:
        for layer in self.layers:
            layer.router_input = layer.head_norms = layer.mlp_active = None


@contextmanager
def capture_activations(
    model: torch.nn.Module, adapter: FamilyAdapter, geometry: ModelGeometry, layers: list[int] | None = None
) -> Iterator[Captured]:
    """Register the capture hooks for ``layers`` (default: all) while the context is open."""
    layers = list(range(geometry.num_layers)) if layers is None else layers
    captured = Captured([LayerCapture() for _ in range(geometry.num_layers)])
    handles = []
    for layer in layers:
        slot = captured.layers[layer]
        handles.append(
            adapter.attention(model, layer).register_forward_pre_hook(
                _router_input_hook(slot), with_kwargs=True
            )
        )
        handles.append(
            adapter.attn_out_proj(model, layer).register_forward_pre_hook(_head_norm_hook(slot, geometry))
        )
        if geometry.mlp_kind == MlpKind.relu:
            handles.append(
                adapter.mlp_down_proj(model, layer).register_forward_pre_hook(_mlp_hook(slot, geometry))
            )
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _router_input_hook(slot: LayerCapture):
    def hook(module, args, kwargs):
        hidden = FamilyAdapter.attention_input(args, kwargs)
        slot.router_input = hidden.detach().reshape(-1, hidden.shape[-1])

    return hook


def _head_norm_hook(slot: LayerCapture, geometry: ModelGeometry):
    def hook(module, args):
        norms = head_norms(args[0].detach(), geometry.num_heads, geometry.head_dim)
        slot.head_norms = norms.reshape(-1, geometry.num_heads)

    return hook


def _mlp_hook(slot: LayerCapture, geometry: ModelGeometry):
    def hook(module, args):
        slot.mlp_active = args[0].detach().reshape(-1, geometry.ffn_dim) > 0

    return hook
