"""Shared helpers for the generate tests: composing generate's config."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

from polar_sparsity.config import resolved_config, to_settings
from polar_sparsity.schema import GenerateRunConfig

ROOT = Path(__file__).resolve().parents[2]


def generate_settings(tmp_path: Path, *overrides: str) -> tuple[GenerateRunConfig, dict]:
    """generate's composed config, writing everything under ``tmp_path``."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "generate",
            overrides=[
                f"paths.artifacts={tmp_path}",
                f"output_dir={tmp_path / 'run'}",
                "logger=none",
                "device=cpu",
                *overrides,
            ],
        )
    return to_settings(cfg, GenerateRunConfig), resolved_config(cfg)
