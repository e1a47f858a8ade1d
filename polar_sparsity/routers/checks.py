"""Everything that can be wrong with a training job's inputs, checked before the first step.

The store must match the configured model, weights kind, data and layer, and hold finite rows of
consistent provenance; the router kind must fit the model; the net is one of the project's router
classes, its sizes from the store; the monitored metric must be one the kind logs. Non-finite values
never reach a router: the training rows are scanned, and so is what is exported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from polar_sparsity.data.store import ActivationStore, StoreError
from polar_sparsity.routers.nets import import_class, router_class
from polar_sparsity.routers.targets import RouterTarget
from polar_sparsity.schema import RouterKind, TrainRunConfig

# The metrics each kind logs per stage (``val/<name>``, ``test/<name>``).
METRICS = {
    RouterKind.mha: ("loss", "topk_recall", "norm_recall"),
    RouterKind.mlp: ("loss", "k99", "density", "topk_recall", "recall", "precision", "f1"),
}


def open_store(settings: TrainRunConfig) -> ActivationStore:
    """The store at ``paths.store``, checked against the configured model, data and layer."""
    store = ActivationStore(settings.paths.store)
    manifest = store.manifest
    expected_identity = (
        ("model", settings.model.name),
        ("weights", settings.model.weights.value),
        ("data", settings.data.name),
    )
    for key, expected in expected_identity:
        if manifest[key] != expected:
            raise StoreError(
                f"the store at {store.root} holds {key} {manifest[key]!r}, but this run is for "
                f"{key}={expected!r}; point paths.store at the right store or change {key}="
            )
    layers = store.geometry.num_layers
    if not 0 <= settings.layer < layers:
        raise ValueError(
            f"layer={settings.layer} is outside {settings.model.name}, which has layers 0..{layers - 1} "
            f"(sweep them all with layer='range(0,{layers})' -m)"
        )
    if settings.router.kind == RouterKind.mlp and not store.has_mlp:
        raise ValueError(
            f"router=mlp needs a ReLU MLP, but {settings.model.name} has a {store.geometry.mlp_kind.value} "
            f"MLP (no exact zeros, so no neuron labels are stored); train router=mha for this model"
        )
    check_row_provenance(store, settings.train.samples)
    check_layer_finite(store, settings.layer, settings.router.kind.value, settings.train.samples)
    return store


def make_target(settings: TrainRunConfig, store: ActivationStore) -> RouterTarget:
    """What the configured router predicts on this store's model."""
    g, router = store.geometry, settings.router
    if router.kind == RouterKind.mha:
        # One score per KV group (== per head for MHA models).
        target = RouterTarget.for_heads(
            settings.layer, router.topk, g.num_heads, g.num_kv_heads, router.group_reduce
        )  # type: ignore[arg-type]
        if target.k == target.units:
            unit = "KV groups" if g.group_size > 1 else "heads"
            raise ValueError(
                f"router.topk={router.topk} keeps all {target.units} of {target.units} {unit} of this "
                f"model: every label is 'kept' and there is nothing to learn; use a router.topk that keeps "
                f"fewer (at most {target.units - 1}/{target.units} of them)"
            )
        return target
    return RouterTarget.for_neurons(settings.layer, g.ffn_dim, g.num_heads, g.num_kv_heads)


def net_spec(settings: TrainRunConfig, store: ActivationStore, target: RouterTarget) -> dict[str, Any]:
    """{'class', 'kwargs'} of the router net: the configured ones plus the store's sizes."""
    kwargs = {k: v for k, v in settings.router.net.items() if k != "_target_"}
    sizes = {"in_features": store.geometry.hidden_size, "out_features": target.units}
    import_class(settings.router.net["_target_"])  # an unknown class is named first
    router_class(settings.router.net["_target_"])  # evaluation loads only the project's routers
    clashes = {k: kwargs[k] for k in sizes if k in kwargs and kwargs[k] != sizes[k]}
    if clashes:
        raise ValueError(
            f"router.net sets {clashes}, but the store fixes {sizes}; remove them from router.net"
        )
    return {"class": settings.router.net["_target_"], "kwargs": {**kwargs, **sizes}}


def check_monitor(settings: TrainRunConfig) -> None:
    valid = [f"val/{name}" for name in METRICS[settings.router.kind]]
    if settings.router.monitor not in valid:
        raise ValueError(f"router.monitor={settings.router.monitor!r} is not one of {valid}")


_CHUNK_ROWS = 65536  # rows read at a time: a layer is never loaded whole into memory


def _non_finite_rows(values: np.ndarray, start: int) -> np.ndarray:
    return start + np.flatnonzero(~np.isfinite(values).all(axis=-1))


def check_layer_finite(store: ActivationStore, layer: int, kind: str, samples: int | None = None) -> None:
    """Refuse a layer whose router inputs (or head norms, for head routers) hold NaN or Inf rows."""
    rows = store.num_samples if samples is None else min(samples, store.num_samples)
    names = [("router_input.npy", store.router_inputs(layer))]
    if kind == "mha":
        names.append(("head_norms.npy", store.head_norms(layer)))
    for name, array in names:
        for start in range(0, rows, _CHUNK_ROWS):
            chunk = np.asarray(array[start : min(rows, start + _CHUNK_ROWS)])
            if name == "router_input.npy" and store.manifest["dtype"] == "bfloat16":
                chunk = store.as_tensor(chunk).float().numpy()
            bad = _non_finite_rows(chunk, start)
            if len(bad):
                path = store.root / "layers" / f"{layer:03d}" / name
                raise StoreError(
                    f"{path} holds NaN or Inf in {len(bad)} row(s) (first: row {int(bad[0])}): the store is "
                    f"damaged, or the model overflowed in {store.manifest['dtype']}; collect it again "
                    f"(collect.store_dtype=float32 or model.dtype=float32 if it overflowed)"
                )


def check_row_provenance(store: ActivationStore, samples: int | None = None) -> None:
    """Sequence ids never decrease and positions lie inside a sequence (the validation split and
    its held-out sequences rely on both)."""
    rows = store.num_samples if samples is None else min(samples, store.num_samples)
    sequence_ids = np.asarray(store.sequence_ids()[:rows])
    positions = np.asarray(store.positions()[:rows])
    seq_len = int(store.manifest["seq_len"])
    backwards = np.flatnonzero(np.diff(sequence_ids) < 0)
    if len(backwards):
        raise StoreError(
            f"{store.root / 'sequence_ids.npy'} goes backwards at row {int(backwards[0]) + 1}: "
            f"the store is damaged; collect it again"
        )
    outside = np.flatnonzero((positions < 0) | (positions >= seq_len))
    if len(outside):
        raise StoreError(
            f"{store.root / 'positions.npy'} holds position {int(positions[outside[0]])} at row "
            f"{int(outside[0])}, outside 0..{seq_len - 1}: the store is damaged; collect it again"
        )


def check_finite_net(net: nn.Module, path: str | Path) -> None:
    """Refuse to export a router whose weights are not finite (it would score every unit NaN)."""
    bad = [name for name, tensor in net.state_dict().items() if not tensor.isfinite().all()]
    if bad:
        raise FloatingPointError(
            f"the trained router has non-finite weights ({', '.join(bad)}); {path} was not written. "
            f"Training diverged: lower router.lr"
        )
