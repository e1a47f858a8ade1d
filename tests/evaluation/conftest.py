"""Shared helpers for the evaluation tests: composing evaluate's config, and fake router bundles."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from polar_sparsity.config import resolved_config, to_settings
from polar_sparsity.schema import EvaluateRunConfig

ROOT = Path(__file__).resolve().parents[2]


def evaluate_settings(tmp_path: Path, *overrides: str) -> tuple[EvaluateRunConfig, dict]:
    """evaluate's composed config, writing everything under ``tmp_path``."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "evaluate",
            overrides=[
                f"paths.artifacts={tmp_path}",
                f"output_dir={tmp_path / 'run'}",
                f"sweep_dir={tmp_path / 'sweep'}",
                "logger=none",
                "device=cpu",
                *overrides,
            ],
        )
    return to_settings(cfg, EvaluateRunConfig), resolved_config(cfg)


def write_head_bundle(
    bundle_dir: Path,
    model: str,
    layers: list[int],
    in_features: int,
    units: int,
    topk: float = 0.5,
    weights: str = "pretrained",
) -> None:
    """A router bundle of random head routers in the router engineer's format (save_router)."""
    from polar_sparsity.routers.bundle import router_path, save_router
    from polar_sparsity.routers.nets import HeadRouter

    for layer in layers:
        torch.manual_seed(layer)
        net = HeadRouter(in_features, units)
        meta = {
            "kind": "mha",
            "layer": layer,
            "topk": topk,
            "model": model,
            "weights": weights,
            "unit": "head",
            "num_outputs": units,
            "net": {
                "class": "polar_sparsity.routers.nets.HeadRouter",
                "kwargs": {"in_features": in_features, "out_features": units},
            },
        }
        save_router(router_path(bundle_dir, "mha", layer, topk), net, meta)


@pytest.fixture
def offline_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
