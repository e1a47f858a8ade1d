"""A router file is used only if it is intact, finite, where it belongs, for these weights, and one of
the project's router classes (checked before anything is imported)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from polar_sparsity.routers.bundle import (
    META_KEY,
    BundleError,
    load_routers,
    read_meta,
    router_path,
    save_router,
)
from polar_sparsity.routers.checks import check_finite_net
from polar_sparsity.routers.nets import HeadRouter

from .test_bundle import _meta, _write


def _rewrite(path: Path, tensors: dict | None = None, **meta_changes) -> None:
    """Replace a router file's tensors and/or metadata (what a bit flip or a hand edit does)."""
    import json

    meta = {**read_meta(path), **meta_changes}
    save_file(tensors or load_file(str(path)), str(path), metadata={META_KEY: json.dumps(meta)})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_file(tmp_path: Path, bad: float) -> None:
    _write(tmp_path, "mha", [0, 1], topk=0.5)
    path = router_path(tmp_path, "mha", 1, 0.5)
    tensors = load_file(str(path))
    tensors["proj.weight"][2, 3] = bad
    _rewrite(path, tensors)
    with pytest.raises(BundleError, match=r"layer_001.safetensors holds non-finite values .* in proj.weight"):
        load_routers(tmp_path, "mha", 0.5)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"layer": 0}, r"layer: file says 0, place says 1"),
        ({"kind": "mlp"}, r"kind: file says 'mlp', place says 'mha'"),
        ({"topk": 0.3}, r"topk: file says 0.3, place says '0.5'"),
        ({"num_outputs": 8}, r"scores 4 units but its metadata says num_outputs=8"),
    ],
)
def test_a_file_that_disagrees_with_its_place_is_refused(tmp_path: Path, changes: dict, message: str) -> None:
    _write(tmp_path, "mha", [0, 1], topk=0.5)
    _rewrite(router_path(tmp_path, "mha", 1, 0.5), **changes)
    with pytest.raises(BundleError, match=rf"layer_001.safetensors.*{message}"):
        load_routers(tmp_path, "mha", 0.5)


def test_another_layers_file_in_place_is_refused(tmp_path: Path) -> None:
    _write(tmp_path, "mha", [0, 1], topk=0.5)
    router_path(tmp_path, "mha", 1, 0.5).write_bytes(router_path(tmp_path, "mha", 0, 0.5).read_bytes())
    with pytest.raises(BundleError, match=r"layer_001.safetensors does not belong .*\(layer: file says 0"):
        load_routers(tmp_path, "mha", 0.5)


def test_routers_of_other_weights_are_refused(tmp_path: Path) -> None:
    net = HeadRouter(16, 4)
    meta = {**_meta("mha", 0, net, {"in_features": 16, "out_features": 4}, topk=0.5), "weights": "random"}
    save_router(router_path(tmp_path, "mha", 0, 0.5), net, meta)
    assert list(load_routers(tmp_path, "mha", 0.5, weights="random")) == [0]
    with pytest.raises(
        BundleError, match=r"trained on a store of 'random' weights, .* model.weights=pretrained"
    ):
        load_routers(tmp_path, "mha", 0.5, weights="pretrained")


def test_unknown_router_classes_are_refused_before_any_import(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "planted_module.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('ran').touch()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    bundle = tmp_path / "bundle"
    _write(bundle, "mha", [0], topk=0.5)
    _rewrite(router_path(bundle, "mha", 0, 0.5), net={"class": "planted_module.Net", "kwargs": {}})
    with pytest.raises(BundleError, match=r"'planted_module.Net' is not one of the project's routers"):
        load_routers(bundle, "mha", 0.5)
    assert "planted_module" not in sys.modules and not (tmp_path / "ran").exists()


def test_truncated_router_files_name_the_file(tmp_path: Path) -> None:
    _write(tmp_path, "mha", [0], topk=0.5)
    path = router_path(tmp_path, "mha", 0, 0.5)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(BundleError, match=r"layer_000.safetensors cannot be read as safetensors"):
        load_routers(tmp_path, "mha", 0.5)
    path.write_bytes(b"\x00" * 4)
    with pytest.raises(BundleError, match=r"layer_000.safetensors cannot be read as safetensors"):
        read_meta(path)


def test_a_diverged_router_is_never_exported(tmp_path: Path) -> None:
    net = HeadRouter(16, 4)
    with torch.no_grad():
        net.proj.bias[0] = float("nan")
    with pytest.raises(
        FloatingPointError, match=r"non-finite weights \(proj.bias\); .*layer_000.safetensors was not"
    ):
        check_finite_net(net, tmp_path / "layer_000.safetensors")


def test_routers_for_a_model_of_another_shape_are_refused(tmp_path: Path) -> None:
    _write(tmp_path, "mha", [0], topk=0.5)  # in_features 16
    path = router_path(tmp_path, "mha", 0, 0.5)
    with pytest.raises(
        BundleError,
        match=r"layer_000.safetensors was trained for a model of another shape \(in_features: file 16",
    ):
        load_routers(tmp_path, "mha", 0.5, geometry={"hidden_size": 32})
    _rewrite(path, geometry={"hidden_size": 16, "num_heads": 4})
    with pytest.raises(BundleError, match=r"another shape \(num_heads: file 4, model 8\)"):
        load_routers(tmp_path, "mha", 0.5, geometry={"hidden_size": 16, "num_heads": 8})
    assert list(load_routers(tmp_path, "mha", 0.5, geometry={"hidden_size": 16, "num_heads": 4})) == [0]
