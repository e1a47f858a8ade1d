"""Everything that can be wrong with a training job's inputs, checked before the first step.

The store must match the configured model, data and layer; the router kind must fit the model; the
net's sizes come from the store; the monitored metric must be one the kind logs.
"""

from __future__ import annotations

from typing import Any

from polar_sparsity.data.store import ActivationStore, StoreError
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
    for key, expected in (("model", settings.model.name), ("data", settings.data.name)):
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
