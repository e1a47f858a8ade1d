"""The router bundle: one safetensors file per trained router, and the loader evaluation uses.

Layout of a bundle (``paths.routers``, default ``artifacts/routers/<model>/<data>``)::

    mha/topk=<k>/layer_<LLL>.safetensors   head routers (per KV group for GQA models), k like 0.5
    mlp/layer_<LLL>.safetensors            MLP-neuron routers (ReLU models)
    mlp/calibration.{json,csv,png}         their top-k per layer and batch size (sparsity/calibration.py)

Tensors are the net's ``state_dict``; the safetensors metadata key ``polar_sparsity`` holds a JSON
document (kind, layer, topk, model, geometry, net class + kwargs, group_reduce, unit, num_outputs,
metrics, store provenance, package_version, created), enough to rebuild the net without Hydra.
No Hydra, OmegaConf or Lightning imports: the GPU decode path imports this module.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from polar_sparsity.reporting import atomic_path
from polar_sparsity.routers.nets import build_net
from polar_sparsity.schema import RouterKind

META_KEY = "polar_sparsity"
KINDS = tuple(kind.value for kind in RouterKind)
_LAYER_FILE = re.compile(r"^layer_(\d+)\.safetensors$")


class BundleError(RuntimeError):
    """A bundle that is missing, lacks the requested routers, or belongs to another model."""


def format_topk(topk: float) -> str:
    """The directory spelling of a top-k fraction: 0.5 -> '0.5', 1 -> '1.0' (same for writer and reader)."""
    return repr(round(float(topk), 6))


def _kind(kind: str | RouterKind) -> RouterKind:
    try:
        return RouterKind(kind)
    except ValueError:
        raise BundleError(f"router kind {kind!r} is not one of {KINDS}") from None


def kind_dir(bundle_dir: str | Path, kind: str | RouterKind, topk: float | None = None) -> Path:
    """Directory holding one kind's routers (per top-k for head routers)."""
    kind = _kind(kind)
    root = Path(bundle_dir) / kind.value
    if kind == RouterKind.mha:
        if topk is None:
            raise BundleError("head (mha) routers are stored per top-k: pass topk")
        return root / f"topk={format_topk(topk)}"
    return root


def router_path(
    bundle_dir: str | Path, kind: str | RouterKind, layer: int, topk: float | None = None
) -> Path:
    return kind_dir(bundle_dir, kind, topk) / f"layer_{layer:03d}.safetensors"


def save_router(path: str | Path, net: nn.Module, meta: dict[str, Any]) -> Path:
    """Write the net's weights and metadata atomically (temporary name + rename)."""
    tensors = {name: t.detach().cpu().contiguous() for name, t in net.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta, sort_keys=True)})
    return Path(path)


def read_meta(path: str | Path) -> dict[str, Any]:
    """A router file's metadata, without loading its tensors."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(META_KEY)
    except Exception as error:  # safetensors raises its own error type for damaged files
        raise BundleError(
            f"{path} cannot be read as safetensors ({error}); re-export it with train.py"
        ) from None
    if raw is None:
        raise BundleError(f"{path} is not a polar-sparsity router (no {META_KEY!r} metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as error:
        raise BundleError(f"{path}: its {META_KEY!r} metadata is not valid JSON ({error})") from None
    if not isinstance(meta, dict):
        raise BundleError(f"{path}: its {META_KEY!r} metadata is not a JSON object")
    return meta


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A router file's tensors; damaged files and non-finite values (NaN, Inf) are refused by name."""
    try:
        tensors = load_file(str(path))
    except Exception as error:  # safetensors raises its own error type for damaged files
        raise BundleError(
            f"{path} cannot be read as safetensors ({error}); re-export it with train.py"
        ) from None
    bad = [
        name for name, tensor in tensors.items() if tensor.is_floating_point() and not tensor.isfinite().all()
    ]
    if bad:
        raise BundleError(
            f"{path} holds non-finite values (NaN or Inf) in {', '.join(sorted(bad))}: the file is "
            f"damaged or the router diverged; retrain this router"
        )
    return tensors


def check_placement(
    path: Path, meta: dict[str, Any], kind: str, layer: int, topk_dir: str | None, model: str | None,
    weights: str | None,
) -> None:  # fmt: skip
    """A router file's metadata agrees with where it sits in the bundle and with what is asked for."""
    expected: dict[str, Any] = {"kind": kind, "layer": layer}
    if model is not None:
        expected["model"] = model
    if weights is not None:
        expected["weights"] = weights
    wrong = {key: meta.get(key) for key, value in expected.items() if meta.get(key) != value}
    if kind == "mha" and topk_dir is not None:
        topk = meta.get("topk")
        if not isinstance(topk, (int, float)) or f"topk={format_topk(topk)}" != topk_dir:
            wrong["topk"] = topk
            expected["topk"] = topk_dir.removeprefix("topk=")
    if "model" in wrong:
        raise BundleError(
            f"{path} was trained for model {meta.get('model')!r}, not {model!r}; "
            f"point paths.routers at {model}'s bundle"
        )
    if "weights" in wrong:
        raise BundleError(
            f"{path} was trained on a store of {meta.get('weights')!r} weights, but this run uses "
            f"model.weights={weights}; train routers for these weights (their bundle path differs)"
        )
    if wrong:
        details = ", ".join(
            f"{key}: file says {value!r}, place says {expected[key]!r}" for key, value in wrong.items()
        )
        raise BundleError(f"{path} does not belong where it is in the bundle ({details}); re-export it")


def check_geometry(path: Path, meta: dict[str, Any], geometry: dict[str, Any]) -> None:
    """A router file was trained for a model of this shape (its recorded geometry and input size)."""
    recorded = meta.get("geometry") or {}
    # The layer count is not a router's business: model.num_layers=N keeps real layers, fewer of them.
    shape = {k: v for k, v in geometry.items() if k != "num_layers"}
    differing = {k: (recorded[k], v) for k, v in shape.items() if k in recorded and recorded[k] != v}
    in_features = (meta.get("net") or {}).get("kwargs", {}).get("in_features")
    if in_features is not None and in_features != geometry.get("hidden_size", in_features):
        differing["in_features"] = (in_features, geometry["hidden_size"])
    if differing:
        details = ", ".join(f"{k}: file {old!r}, model {new!r}" for k, (old, new) in differing.items())
        raise BundleError(f"{path} was trained for a model of another shape ({details})")


@dataclass
class LoadedRouter:
    """A rebuilt router: ``scores(x)`` gives logits (higher = more likely active), one per unit."""

    layer: int
    net: nn.Module
    meta: dict[str, Any]

    @property
    def num_outputs(self) -> int:
        return int(self.meta["num_outputs"])

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d) router inputs -> (..., num_outputs) logits, in the router's dtype and device."""
        param = next(self.net.parameters())
        with torch.no_grad():
            return self.net(x.to(device=param.device, dtype=param.dtype))


def available(bundle_dir: str | Path) -> dict[str, list[str]]:
    """What a bundle holds: {'mha': ['topk=0.3', 'topk=0.5'], 'mlp': ['layers 0..3']}-style listing."""
    root = Path(bundle_dir)
    found: dict[str, list[str]] = {}
    mha = root / "mha"
    if mha.is_dir():
        found["mha"] = sorted(p.name for p in mha.iterdir() if p.is_dir() and _layers_in(p))
    if (root / "mlp").is_dir() and _layers_in(root / "mlp"):
        found["mlp"] = [f"layers {_describe(_layers_in(root / 'mlp'))}"]
    return {kind: entries for kind, entries in found.items() if entries}


def _layers_in(directory: Path) -> dict[int, Path]:
    layers = {}
    for path in directory.glob("layer_*.safetensors"):
        match = _LAYER_FILE.match(path.name)
        if match:
            layers[int(match.group(1))] = path
    return dict(sorted(layers.items()))


def _describe(layers: Iterable[int]) -> str:
    return ", ".join(str(layer) for layer in layers) or "none"


def _resolve_kind_dir(bundle_dir: Path, kind: RouterKind, topk: float | None) -> Path:
    if not bundle_dir.is_dir():
        raise BundleError(f"no router bundle at {bundle_dir}; train routers first (`python train.py ...`)")
    found = available(bundle_dir)
    listing = "; ".join(f"{k}: {', '.join(v)}" for k, v in found.items()) or "nothing"
    if kind.value not in found:
        raise BundleError(f"the bundle at {bundle_dir} has no {kind.value} routers (it holds {listing})")
    if kind == RouterKind.mha and topk is None:
        if len(found["mha"]) != 1:
            raise BundleError(
                f"the bundle at {bundle_dir} holds several head-router top-k: pass topk ({listing})"
            )
        return bundle_dir / "mha" / found["mha"][0]
    directory = kind_dir(bundle_dir, kind, topk)
    if not _layers_in(directory):
        raise BundleError(
            f"the bundle at {bundle_dir} has no mha routers for topk={format_topk(topk)} "  # type: ignore[arg-type]
            f"(available: {', '.join(found['mha'])})"
        )
    return directory


def load_routers(
    bundle_dir: str | Path,
    kind: str | RouterKind,
    topk: float | None = None,
    layers: Iterable[int] | None = None,
    device: str | torch.device = "cpu",
    model: str | None = None,
    dtype: torch.dtype | None = None,
    weights: str | None = None,
    geometry: dict[str, Any] | None = None,
) -> dict[int, LoadedRouter]:
    """Load a bundle's routers of one kind (and top-k for head routers) as {layer: LoadedRouter}.

    ``topk`` may be omitted when the bundle holds head routers for a single top-k. ``layers``: None
    loads every layer present; requested layers that are missing are named in the error. ``model``:
    the expected model name (a bundle trained for another model is refused); ``weights``: the expected
    weights kind (pretrained | random); ``geometry``: the model's ``ModelGeometry.as_dict()``, which
    the file's recorded geometry and input size must match. ``dtype`` casts the nets. Every file is
    checked against its place in the bundle (kind, layer, top-k), must hold finite values, and may
    only name one of the project's router classes.
    """
    directory = _resolve_kind_dir(Path(bundle_dir), _kind(kind), topk)
    on_disk = _layers_in(directory)
    wanted = list(on_disk) if layers is None else sorted(set(layers))
    missing = [layer for layer in wanted if layer not in on_disk]
    if missing:
        raise BundleError(
            f"{directory} has no router for layer(s) {_describe(missing)} (present: {_describe(on_disk)})"
        )
    routers = {}
    topk_dir = directory.name if kind == "mha" else None
    for layer in wanted:
        path = on_disk[layer]
        meta = read_meta(path)
        check_placement(path, meta, kind, layer, topk_dir, model, weights)
        if geometry is not None:
            check_geometry(path, meta, geometry)
        routers[layer] = LoadedRouter(layer=layer, net=_rebuild(path, meta, device, dtype), meta=meta)
    return routers


def _rebuild(
    path: Path, meta: dict[str, Any], device: str | torch.device, dtype: torch.dtype | None
) -> nn.Module:
    """The router net a file describes, with its weights; every failure names the file."""
    spec = meta.get("net")
    if not isinstance(spec, dict) or not isinstance(spec.get("kwargs"), dict):
        raise BundleError(f"{path}: its metadata has no net class and kwargs; re-export it with train.py")
    try:
        net = build_net(str(spec.get("class")), spec["kwargs"], allowed_only=True)
    except ValueError as error:
        raise BundleError(f"{path}: {error}") from None
    tensors = _read_tensors(path)
    try:
        net.load_state_dict(tensors)
    except RuntimeError as error:
        raise BundleError(f"{path}: its tensors do not fit its own net description ({error})") from None
    outputs, built = meta.get("num_outputs"), spec["kwargs"].get("out_features")
    if outputs != built:
        raise BundleError(f"{path}: the net scores {built} units but its metadata says num_outputs={outputs}")
    return net.to(device=device, dtype=dtype).eval()
