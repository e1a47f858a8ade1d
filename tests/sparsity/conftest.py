"""A small tiny-opt store with quick MLP routers (one epoch), built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from polar_sparsity.collect.runner import run_collect
from polar_sparsity.config import resolved_config, to_settings
from polar_sparsity.routers.task import run_train
from polar_sparsity.schema import CollectRunConfig, TrainRunConfig

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = 4096  # 128 sequences of 32 tokens
VAL_FRACTION = 0.4  # ~51 held-out sequences: enough for distinct-sequence batches of 16


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(name, overrides=overrides)


def collect_store(root: Path, model: str, samples: int = SAMPLES) -> Path:
    cfg = _compose(
        "collect",
        [f"paths.artifacts={root}", f"model={model}", f"collect.samples={samples}", "collect.seq_len=32",
         "collect.batch_size=16", "logger=none", "device=cpu"],
    )  # fmt: skip
    settings = to_settings(cfg, CollectRunConfig)
    run_collect(settings, resolved_config(cfg))
    return Path(settings.paths.store)


@pytest.fixture(scope="session")
def opt_mlp_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(store, bundle): tiny-opt rows and MLP routers for every layer, trained for one epoch."""
    root = tmp_path_factory.mktemp("calibration")
    store = collect_store(root, "tiny-opt")
    for layer in range(4):
        cfg = _compose(
            "train",
            [f"paths.artifacts={root}", f"paths.store={store}", f"output_dir={root / f'train{layer}'}",
             "router=mlp", f"layer={layer}", "router.max_epochs=1", "router.lr=3e-3", "router.batch_size=256",
             f"train.val_fraction={VAL_FRACTION}", "logger=none", "trainer.enable_progress_bar=false"],
        )  # fmt: skip
        run_train(to_settings(cfg, TrainRunConfig), resolved_config(cfg))
    return store, root / "routers" / "tiny-opt" / "python-docs"
