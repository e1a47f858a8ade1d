"""Misspelt configuration is refused and what a mode does not apply is said; weights kinds get their
own paths; every launch gets its own run and sweep folder."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from polar_sparsity.config import to_settings
from polar_sparsity.schema import CollectRunConfig, EvaluateRunConfig, TrainRunConfig

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = {"collect": CollectRunConfig, "train": TrainRunConfig, "evaluate": EvaluateRunConfig}


def _compose(entry: str, *overrides: str, hydra: bool = False):
    extra = ["layer=0"] if entry == "train" else []
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(entry, overrides=["logger=none", *extra, *overrides], return_hydra_config=hydra)


@pytest.mark.parametrize(
    ("entry", "override", "message"),
    [
        (
            "collect",
            "+collect.sampels=100",
            r"unknown key collect.sampels \(did you mean collect.samples\?\)",
        ),
        ("collect", "+seeds=3", r"unknown key seeds \(did you mean seed\?\)"),
        ("train", "+train.sample=5", r"unknown key train.sample \(did you mean train.samples\?\)"),
        (
            "train",
            "+model.architecture.num_head=4",
            r"unknown key model.architecture.num_head \(did you mean",
        ),
        (
            "evaluate",
            "+sparsity.mlp_top_k=0.5",
            r"unknown key sparsity.mlp_top_k \(did you mean sparsity.mlp_topk",
        ),
        ("evaluate", "++eval.perplexity.max_token=10", r"unknown key eval.perplexity.max_token"),
    ],
)
def test_unknown_keys_are_refused_however_they_are_added(entry: str, override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        to_settings(_compose(entry, override), SCHEMAS[entry])


def test_free_form_sections_still_take_any_key() -> None:
    settings = to_settings(_compose("train", "+router.net.dropout=0.1", "router=mlp"), TrainRunConfig)
    assert settings.router.net["dropout"] == 0.1  # build_net names it if the class lacks it


def test_evaluation_says_what_applies(caplog) -> None:
    """A sweep over modes shares its settings: each run's title, row and log say what it applied."""
    from polar_sparsity.evaluation.runner import _sparsity_summary, _sweep_row, _title, build_plan
    from polar_sparsity.models.families import family_for_config
    from polar_sparsity.models.loading import load_hf_config
    from polar_sparsity.schema import Mode
    from polar_sparsity.sparsity.masking import SparsityPlan

    overrides = ("mode=sparse_attn", "sparsity.attn_topk=0.25", "sparsity.mlp_topk=0.5", "model=tiny-llama")
    settings = to_settings(_compose("evaluate", *overrides), EvaluateRunConfig)
    hf_config = load_hf_config(settings.model)
    geometry = family_for_config(hf_config).geometry(hf_config)
    with caplog.at_level(logging.WARNING):
        plan, _ = build_plan(settings, geometry)
    assert "mode=sparse_attn does not apply sparsity.mlp_topk=0.5 (the MLP stays dense)" in caplog.text
    title = _title(settings, plan, geometry)
    assert "(attn_topk=0.25: 1 of 2 KV groups, MLP dense," in title and "mlp_topk" not in title
    payload = {"sparsity": _sparsity_summary(settings, plan, geometry)}
    assert _sweep_row(settings, payload, {}, {}, Path("run"))["mlp_topk"] is None

    settings = to_settings(_compose("evaluate", "mode=sparse", "sparsity.mlp_topk=0.5"), EvaluateRunConfig)
    hf_config = load_hf_config(settings.model)  # tiny-opt: a ReLU MLP, where mode=sparse applies it
    geometry = family_for_config(hf_config).geometry(hf_config)
    plan = SparsityPlan(mode=Mode.sparse, attn_topk=0.5, mlp_topk=0.5)
    assert "mlp_topk=0.5" in _title(settings, plan, geometry)


def test_weights_kind_is_part_of_the_default_store_and_bundle_paths() -> None:
    pretrained, random = _compose("train"), _compose("train", "model.weights=random")
    assert pretrained.paths.store.endswith("stores/tiny-opt/python-docs")  # unchanged for pretrained
    assert pretrained.paths.routers.endswith("routers/tiny-opt/python-docs")
    assert random.paths.store.endswith("stores/tiny-opt-random-weights/python-docs")
    assert random.paths.routers.endswith("routers/tiny-opt-random-weights/python-docs")


def test_run_and_sweep_folders_are_unique_per_launch_and_shared_by_its_jobs() -> None:
    first, second = _compose("train", hydra=True), _compose("train", hydra=True)
    for key in ("hydra.run.dir", "hydra.sweep.dir"):
        assert OmegaConf.select(first, key) != OmegaConf.select(second, key)  # even within one second
    # Hydra gives each job of a multirun the launch's resolver cache (load_sweep_config): one sweep dir.
    job = _compose("train", "layer=1", hydra=True)
    OmegaConf.copy_cache(from_config=first, to_config=job)
    assert job.hydra.sweep.dir == first.hydra.sweep.dir
