"""Router training on the shipped tiny models: routers beat the baselines by a margin, bad inputs
fail before training, and the exported router reproduces its reported metrics."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf.errors import ValidationError

from polar_sparsity.data.store import StoreError
from polar_sparsity.routers.bundle import load_routers
from polar_sparsity.routers.checks import make_target, open_store
from polar_sparsity.routers.data import RouterDataModule
from polar_sparsity.routers.metrics import HeadSelectionMetrics
from polar_sparsity.routers.task import run_train
from polar_sparsity.schema import TrainRunConfig

from .conftest import ROOT, train_settings

# Margins the routers must clear on every layer (observed gaps are about twice these).
TOPK_OVER_STATIC = 0.04
TOPK_OVER_RANDOM = 0.15
NORM_OVER_STATIC = 0.015


@pytest.mark.parametrize("layer", [0, 1, 2, 3])
def test_head_router_beats_baselines_on_tiny_opt(tmp_path: Path, opt_store: Path, layer: int) -> None:
    settings, resolved = train_settings(tmp_path, opt_store, "router=mha", f"layer={layer}")
    result = run_train(settings, resolved)
    _assert_head_margins(result)
    assert result["unit"] == "head" and result["units"] == 8 and result["k"] == 4


@pytest.mark.parametrize("layer", [0, 1, 2, 3])
def test_gqa_router_scores_kv_groups_and_beats_baselines_on_tiny_llama(
    tmp_path: Path, llama_store: Path, layer: int
) -> None:
    settings, resolved = train_settings(tmp_path, llama_store, "router=mha", f"layer={layer}")
    result = run_train(settings, resolved)
    _assert_head_margins(result)
    router = load_routers(settings.paths.routers, "mha", topk=0.5, model="tiny-llama")[layer]
    assert (
        router.meta["unit"] == "kv_group" and router.num_outputs == 2 and router.meta["group_reduce"] == "max"
    )
    assert router.scores(torch.zeros(3, 256)).shape == (3, 2)


def _assert_head_margins(result: dict) -> None:
    metrics, static, rand = result["metrics"], result["baselines"]["static"], result["baselines"]["random"]
    assert metrics["topk_recall"] >= static["topk_recall"] + TOPK_OVER_STATIC, result
    assert metrics["topk_recall"] >= rand["topk_recall"] + TOPK_OVER_RANDOM, result
    assert metrics["norm_recall"] >= static["norm_recall"] + NORM_OVER_STATIC, result


def test_mlp_router_needs_far_fewer_neurons_than_static(tmp_path: Path, opt_store: Path) -> None:
    settings, resolved = train_settings(
        tmp_path, opt_store, "router=mlp", "layer=2", "router.batch_size=256", "router.max_epochs=2"
    )
    result = run_train(settings, resolved)
    metrics, static = result["metrics"], result["baselines"]["static"]
    # k99: neurons kept per token for 99% recall. Static needs most of the layer; the router a few x density.
    assert metrics["k99"] <= static["k99"] - 0.4, result
    assert metrics["k99"] <= 4 * metrics["density"] and metrics["recall"] >= 0.9, result
    # At equal selected count (the layer's mean active count), the router beats the most active neurons.
    assert metrics["topk_recall"] >= static["topk_recall"] + 0.2, result
    meta = load_routers(settings.paths.routers, "mlp", model="tiny-opt")[2].meta
    assert meta["unit"] == "neuron" and meta["num_outputs"] == 1024 and meta["topk"] is None
    assert meta["net"]["kwargs"] == {"hidden": 1024, "activation": "none", "norm": False,
                                     "in_features": 256, "out_features": 1024}  # fmt: skip


def test_exported_router_reproduces_its_reported_metric(tmp_path: Path, opt_store: Path) -> None:
    settings, resolved = train_settings(tmp_path, opt_store, "router=mha", "layer=1", "router.topk=0.25")
    result = run_train(settings, resolved)
    router = load_routers(settings.paths.routers, "mha", topk=0.25, layers=[1])[1]
    meta = router.meta
    assert meta["k"] == 2 and meta["metrics"]["best"] == result["metrics"]
    assert meta["store"]["rows"] == 24000 and meta["geometry"]["num_heads"] == 8
    assert meta["train"]["split"] == "held out by sequence" and meta["created"]
    target = make_target(settings, open_store(settings))
    data = RouterDataModule(opt_store, target, batch_size=512, val_fraction=settings.train.val_fraction)
    metric = HeadSelectionMetrics(k=2)
    for batch in data.val_dataloader(partition=False):
        metric.update(router.scores(batch["x"]), batch["target"])
    assert metric.compute()["topk_recall"].item() == pytest.approx(result["metrics"]["topk_recall"], abs=1e-5)


# -- bad inputs fail before any training -----------------------------------------------------------


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("training started despite bad input")

    monkeypatch.setattr(L.Trainer, "fit", refuse)


@pytest.mark.parametrize(
    ("store", "overrides", "error", "message"),
    [
        ("opt", ["layer=4"], ValueError, r"layer=4 is outside tiny-opt, which has layers 0..3"),
        ("opt", ["layer=-1"], ValueError, r"layer=-1 is outside tiny-opt"),
        (
            "llama",
            ["router=mlp", "layer=1"],
            ValueError,
            "router=mlp needs a ReLU MLP, but tiny-llama has a gated",
        ),
        (
            "opt",
            ["layer=1", "train.samples=999999"],
            ValueError,
            "train.samples=999999 but the store .* holds 24000",
        ),
        ("opt", ["layer=1", "router.monitor=val/f2"], ValueError, r"router.monitor='val/f2' is not one of"),
        ("opt", ["layer=1", "+router.net.heads=3"], ValueError, r"cannot build .*HeadRouter"),
        ("opt", ["layer=1", "router.net._target_=torch.nn.Nothing"], ValueError, "cannot be imported"),
    ],
)
def test_bad_inputs_fail_before_training(
    tmp_path: Path, opt_store: Path, llama_store: Path, no_training: None, store: str, overrides: list[str],
    error: type, message: str,
) -> None:  # fmt: skip
    settings, resolved = train_settings(tmp_path, opt_store if store == "opt" else llama_store, *overrides)
    with pytest.raises(error, match=message):
        run_train(settings, resolved)


def test_store_of_another_model_is_refused(tmp_path: Path, llama_store: Path, no_training: None) -> None:
    settings, resolved = train_settings(tmp_path, llama_store, "model=tiny-opt", "layer=1")
    with pytest.raises(StoreError, match="holds model 'tiny-llama', but this run is for model='tiny-opt'"):
        run_train(settings, resolved)


def test_missing_store_says_how_to_make_it(tmp_path: Path, no_training: None) -> None:
    settings, resolved = train_settings(tmp_path, tmp_path / "stores" / "tiny-opt" / "none", "layer=1")
    with pytest.raises(StoreError, match="run `python collect.py`"):
        run_train(settings, resolved)


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=["logger=none", *overrides])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["router.topk=0"], r"router.topk=0.0 must be a fraction in \(0, 1\]"),
        (["router.topk=1.5"], r"router.topk=1.5 must be a fraction"),
        (["router=mlp", "router.topk=0.5"], "applies to head routers only"),
        (["router.batch_size=0"], "router.batch_size=0 must be a positive integer"),
        (["train.val_fraction=1.0"], r"train.val_fraction=1.0 must be in \(0, 1\)"),
        ([], "missing mandatory value: layer"),
    ],
)
def test_bad_config_values_fail_at_validation(overrides: list[str], message: str) -> None:
    from polar_sparsity.config import to_settings

    cfg = _compose(*(["layer=1"] if overrides else []), *overrides)
    with pytest.raises(ValueError, match=message):
        to_settings(cfg, TrainRunConfig)


def test_unknown_router_and_enum_values_list_valid_ones() -> None:
    with pytest.raises(MissingConfigException, match=r"(?s)router/attn.*mha.*mlp"):
        _compose("router=attn", "layer=1")
    with pytest.raises(ConfigCompositionException, match="router.group_reduce=median") as info:
        _compose("router.group_reduce=median", "layer=1")
    assert isinstance(info.value.__cause__, ValidationError)
    assert "Invalid value 'median', expected one of [max, mean, sum]" in str(info.value.__cause__)
    with pytest.raises(MissingConfigException, match=r"(?s)trainer/tpu.*cpu.*ddp.*gpu"):
        _compose("trainer=tpu", "layer=1")


@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp"])
def test_trainer_configs_compose(trainer: str) -> None:
    from polar_sparsity.config import to_settings

    settings = to_settings(_compose(f"trainer={trainer}", "layer=0"), TrainRunConfig)
    assert settings.trainer.accelerator == {"cpu": "cpu", "gpu": "gpu", "ddp": "gpu"}[trainer]
    assert (settings.trainer.strategy == "ddp") == (trainer == "ddp")
    assert np.isscalar(settings.trainer.devices)
