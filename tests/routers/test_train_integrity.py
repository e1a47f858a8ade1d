"""Training never turns bad inputs into a router silently: non-finite rows or losses fail naming the
file, a store of other weights is refused, and routers that lose to the static baseline are flagged."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from polar_sparsity.data.store import StoreError
from polar_sparsity.routers import summary
from polar_sparsity.routers.data import RouterTarget
from polar_sparsity.routers.module import RouterModule
from polar_sparsity.routers.nets import HeadRouter
from polar_sparsity.routers.task import run_train

from .conftest import train_settings


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("training started despite bad input")

    monkeypatch.setattr(L.Trainer, "fit", refuse)


@pytest.mark.parametrize(("name", "value"), [("router_input.npy", np.inf), ("head_norms.npy", np.nan)])
def test_non_finite_training_rows_fail_naming_the_file(
    tmp_path: Path, opt_store: Path, no_training: None, name: str, value: float
) -> None:
    store = tmp_path / "stores" / "tiny-opt" / "python-docs"
    shutil.copytree(opt_store, store)
    array = np.load(store / "layers" / "002" / name, mmap_mode="r+")
    array[123, 1] = value
    array.flush()
    settings, resolved = train_settings(tmp_path, store, "layer=2")
    with pytest.raises(
        StoreError, match=rf"layers/002/{name} holds NaN or Inf in 1 row\(s\) \(first: row 123\)"
    ):
        run_train(settings, resolved)


@pytest.mark.parametrize(
    ("name", "row", "value", "message"),
    [
        ("sequence_ids.npy", 500, 0, r"sequence_ids.npy goes backwards at row 500"),
        ("positions.npy", 77, 4096, r"positions.npy holds position 4096 at row 77, outside 0..127"),
    ],
)
def test_damaged_row_provenance_is_refused(
    tmp_path: Path, opt_store: Path, no_training: None, name: str, row: int, value: int, message: str
) -> None:
    store = tmp_path / "stores" / "tiny-opt" / "python-docs"
    shutil.copytree(opt_store, store)
    array = np.load(store / name, mmap_mode="r+")
    array[row] = value
    array.flush()
    settings, resolved = train_settings(tmp_path, store, "layer=0")
    with pytest.raises(StoreError, match=message):
        run_train(settings, resolved)


def test_a_store_of_other_weights_is_refused(tmp_path: Path, opt_store: Path, no_training: None) -> None:
    settings, resolved = train_settings(tmp_path, opt_store, "layer=1", "model.weights=random")
    with pytest.raises(StoreError, match=r"holds weights 'pretrained', but this run is for weights='random'"):
        run_train(settings, resolved)


def test_training_refuses_router_classes_evaluation_would_not_load(
    tmp_path: Path, opt_store: Path, no_training: None
) -> None:
    settings, resolved = train_settings(tmp_path, opt_store, "layer=1", "router.net._target_=torch.nn.Linear")
    with pytest.raises(ValueError, match=r"'torch.nn.Linear' is not one of the project's routers"):
        run_train(settings, resolved)


def test_a_non_finite_loss_fails_the_epoch() -> None:
    target = RouterTarget("mha", layer=3, units=4, k=2, num_heads=4, num_kv_heads=4, group_reduce="max")
    module = RouterModule(HeadRouter(8, 4), target)
    module.log = module.log_dict = lambda *args, **kwargs: None  # no Trainer attached
    batch = {"x": torch.randn(5, 8), "target": torch.rand(5, 4)}
    module.training_step(batch, 0)
    module._log_stage_metrics("train")  # finite: fine
    batch["x"][2, 0] = float("nan")
    module.training_step(batch, 1)
    with pytest.raises(
        FloatingPointError, match=r"1 train batch\(es\) .* NaN or Inf loss \(mha router, layer 3\)"
    ):
        module._log_stage_metrics("train")


def _result(kind: str, ours: float, static: float, status: str = "ok") -> dict:
    metric = "topk_recall" if kind == "mha" else "k99"
    return {"kind": kind, "layer": 0, "status": status, "metrics": {metric: ours},
            "baselines": {"static": {metric: static}, "random": {metric: 0.0}}}  # fmt: skip


def test_routers_worse_than_static_are_flagged() -> None:
    assert summary.result_row(_result("mha", 0.6, 0.7))["vs_static"] == "worse"
    assert summary.result_row(_result("mha", 0.8, 0.7))["vs_static"] == "better"
    assert summary.result_row(_result("mlp", 300.0, 200.0))["vs_static"] == "worse"  # k99: lower is better
    assert summary.result_row(_result("mlp", 100.0, 200.0))["vs_static"] == "better"
    assert summary.result_row(_result("mha", 0.6, 0.7, status="failed"))["vs_static"] is None


def test_sweep_summary_names_the_routers_that_lose_to_static(tmp_path: Path, capsys) -> None:
    rows = [summary.result_row(_result("mha", 0.6, 0.7)), summary.result_row(_result("mha", 0.9, 0.7))]
    rows[1]["layer"] = 1
    summary.print_summary(tmp_path, rows)
    out = capsys.readouterr().out
    assert "mha layer 0: the router does not beat the static baseline" in out and "layer 1:" not in out
