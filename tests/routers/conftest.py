"""Small activation stores of the shipped (pretrained) tiny models, collected once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from polar_sparsity.collect.runner import run_collect
from polar_sparsity.config import resolved_config, to_settings
from polar_sparsity.schema import CollectRunConfig, TrainRunConfig

ROOT = Path(__file__).resolve().parents[2]
STORE_SAMPLES = 24000  # ~190 sequences of 128 tokens: enough for routers to beat the baselines


def _collect(root: Path, model: str) -> Path:
    overrides = [f"paths.artifacts={root}", f"model={model}", f"collect.samples={STORE_SAMPLES}",
                 "collect.seq_len=128", "collect.batch_size=8", "logger=none"]  # fmt: skip
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("collect", overrides=overrides)
    settings = to_settings(cfg, CollectRunConfig)
    run_collect(settings, resolved_config(cfg))
    return Path(settings.paths.store)


@pytest.fixture(scope="session")
def opt_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _collect(tmp_path_factory.mktemp("opt"), "tiny-opt")


@pytest.fixture(scope="session")
def llama_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _collect(tmp_path_factory.mktemp("llama"), "tiny-llama")


# Fast recipe for tests: the paper's optimiser, a larger step size and few epochs.
FAST = ["logger=none", "router.lr=3e-3", "router.max_epochs=3", "trainer.enable_progress_bar=false"]


def train_settings(tmp_path: Path, store: Path, *overrides: str) -> tuple[TrainRunConfig, dict]:
    model = "tiny-llama" if "llama" in store.parts[-2] else "tiny-opt"
    base = [
        f"model={model}",
        f"paths.artifacts={tmp_path}",
        f"paths.store={store}",
        f"output_dir={tmp_path / 'run'}",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*base, *FAST, *overrides])
    return to_settings(cfg, TrainRunConfig), resolved_config(cfg)
