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
    with safe_open(str(path), framework="pt") as handle:
        raw = (handle.metadata() or {}).get(META_KEY)
    if raw is None:
        raise BundleError(f"{path} is not a polar-sparsity router (no {META_KEY!r} metadata)")
    return json.loads(raw)


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
) -> dict[int, LoadedRouter]:
    """Load a bundle's routers of one kind (and top-k for head routers) as {layer: LoadedRouter}.

    ``topk`` may be omitted when the bundle holds head routers for a single top-k. ``layers``: None
    loads every layer present; requested layers that are missing are named in the error. ``model``:
    the expected model name (a bundle trained for another model is refused). ``dtype`` casts the nets.
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
    for layer in wanted:
        meta = read_meta(on_disk[layer])
        if model is not None and meta.get("model") != model:
            raise BundleError(
                f"{on_disk[layer]} was trained for model {meta.get('model')!r}, not {model!r}; "
                f"point paths.routers at {model}'s bundle"
            )
        net = build_net(meta["net"]["class"], meta["net"]["kwargs"])
        net.load_state_dict(load_file(str(on_disk[layer])))
        net = net.to(device=device, dtype=dtype).eval()
        routers[layer] = LoadedRouter(layer=layer, net=net, meta=meta)
    return routers
