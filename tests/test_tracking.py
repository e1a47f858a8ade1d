"""Loggers built from conf/logger: W&B gets no deprecated settings it would warn about on every run."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from lightning.pytorch.loggers import WandbLogger
from omegaconf import OmegaConf

import polar_sparsity.config  # noqa: F401  (registers the schemas)
from polar_sparsity.tracking import make_logger

ROOT = Path(__file__).resolve().parents[1]


def test_wandb_logger_leaves_the_anonymous_setting_unset(tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("collect", overrides=["logger=wandb"])
    logger_cfg = OmegaConf.to_container(cfg.logger, resolve=False)
    # The values Hydra's runtime would resolve (run dir, sweep group), given directly.
    logger_cfg |= {
        "save_dir": str(tmp_path),
        "group": "g",
        "name": "x",
        "job_type": "collect",
        "offline": True,
    }
    logger = make_logger(logger_cfg)
    assert isinstance(logger, WandbLogger)
    # Lightning passes anonymous=None, which W&B reports as "The anonymous setting has no effect".
    assert "anonymous" not in logger._wandb_init
    assert logger._wandb_init["project"] == "polar-sparsity"
