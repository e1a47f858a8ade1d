"""The router bundle: round trip, metadata, and the loader's errors (what evaluation relies on)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from polar_sparsity.routers.bundle import (
    BundleError,
    format_topk,
    load_routers,
    read_meta,
    router_path,
    save_router,
)
from polar_sparsity.routers.nets import HeadRouter, MlpRouter


def _meta(
    kind: str,
    layer: int,
    net: torch.nn.Module,
    kwargs: dict,
    model: str = "tiny-opt",
    topk: float | None = None,
) -> dict:
    cls = type(net)
    return {"kind": kind, "layer": layer, "topk": topk, "model": model, "num_outputs": kwargs["out_features"],
            "net": {"class": f"{cls.__module__}.{cls.__qualname__}", "kwargs": kwargs}}  # fmt: skip


def _write(bundle: Path, kind: str, layers: list[int], topk: float | None = None, model: str = "tiny-opt"):
    nets = {}
    for layer in layers:
        kwargs = {"in_features": 16, "out_features": 4} if kind == "mha" else {
            "in_features": 16, "out_features": 32, "hidden": 8}  # fmt: skip
        torch.manual_seed(layer)
        net = HeadRouter(**kwargs) if kind == "mha" else MlpRouter(**kwargs)
        save_router(router_path(bundle, kind, layer, topk), net, _meta(kind, layer, net, kwargs, model, topk))
        nets[layer] = net
    return nets


def test_round_trip_rebuilds_the_net_and_its_scores(tmp_path: Path) -> None:
    nets = _write(tmp_path, "mha", [1, 2], topk=0.5)
    assert (tmp_path / "mha" / "topk=0.5" / "layer_001.safetensors").exists()
    assert not list(tmp_path.rglob("*.tmp"))  # written atomically, nothing left behind
    routers = load_routers(tmp_path, "mha", topk=0.5, model="tiny-opt")
    x = torch.randn(3, 5, 16)
    for layer, router in routers.items():
        assert router.layer == layer and not router.net.training
        torch.testing.assert_close(router.scores(x), nets[layer](x))
        assert router.scores(x).shape == (3, 5, 4) and router.meta["kind"] == "mha"
    assert read_meta(router_path(tmp_path, "mha", 2, 0.5))["layer"] == 2


def test_mlp_routers_and_layer_selection(tmp_path: Path) -> None:
    _write(tmp_path, "mlp", [0, 1, 3])
    routers = load_routers(tmp_path, "mlp", layers=[3, 0], dtype=torch.float64)
    assert sorted(routers) == [0, 3] and routers[3].scores(torch.randn(2, 16)).dtype == torch.float64


def test_single_topk_is_found_without_asking(tmp_path: Path) -> None:
    _write(tmp_path, "mha", [0], topk=0.25)
    assert list(load_routers(tmp_path, "mha")) == [0]


@pytest.mark.parametrize("topk", [0.5, 1, 0.3, 0.125])
def test_topk_spelling_is_stable(topk: float) -> None:
    assert format_topk(topk) == {0.5: "0.5", 1: "1.0", 0.3: "0.3", 0.125: "0.125"}[topk]


def test_errors_name_what_is_there(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no router bundle at"):
        load_routers(tmp_path / "nowhere", "mha", topk=0.5)
    _write(tmp_path, "mha", [0, 1], topk=0.5)
    _write(tmp_path, "mha", [0], topk=0.3)
    with pytest.raises(BundleError, match=r"no mlp routers \(it holds mha: topk=0.3, topk=0.5\)"):
        load_routers(tmp_path, "mlp")
    with pytest.raises(BundleError, match=r"no mha routers for topk=0.7 \(available: topk=0.3, topk=0.5\)"):
        load_routers(tmp_path, "mha", topk=0.7)
    with pytest.raises(BundleError, match="several head-router top-k: pass topk"):
        load_routers(tmp_path, "mha")
    with pytest.raises(BundleError, match=r"no router for layer\(s\) 2, 5 \(present: 0, 1\)"):
        load_routers(tmp_path, "mha", topk=0.5, layers=[0, 2, 5])
    with pytest.raises(BundleError, match="trained for model 'tiny-opt', not 'tiny-llama'"):
        load_routers(tmp_path, "mha", topk=0.5, model="tiny-llama")
    with pytest.raises(BundleError, match="router kind 'attn' is not one of"):
        load_routers(tmp_path, "attn")


def test_bundle_and_nets_import_no_hydra_or_lightning() -> None:
    code = ("import sys, polar_sparsity.routers.bundle, polar_sparsity.routers.targets; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('hydra', 'omegaconf', 'lightning', "
            "'pytorch_lightning', 'torchmetrics')]; assert not bad, bad")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True)
