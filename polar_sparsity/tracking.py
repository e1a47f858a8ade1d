"""Experiment loggers (W&B, CSV, none) shared by the entry points.

Loggers are Lightning loggers built from ``conf/logger/*.yaml`` (``_target_``), so training, collection
and evaluation log the same way. W&B runs are always closed, also when a job fails.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, WandbLogger


def make_logger(logger_cfg: Any) -> Logger | None:
    """Instantiate the configured logger; ``None`` for ``logger=none``."""
    if not logger_cfg:
        return None
    from hydra.utils import instantiate

    logger = instantiate(logger_cfg)
    if isinstance(logger, WandbLogger) and logger._wandb_init.get("anonymous") is None:
        # Lightning always passes anonymous=None to wandb.init, and W&B warns on every run that the
        # (deprecated) setting has no effect; unset, W&B's own default applies and nothing is printed.
        logger._wandb_init.pop("anonymous")
    return logger


def sweep_logger(config: Any, sweep_dir: Path, name: str) -> Logger | None:
    """The job's configured logger, re-aimed at a multirun's end: one more run in the sweep's group.

    ``name`` names the run and its W&B job type; its files land in the sweep dir. None for logger=none.
    """
    from omegaconf import OmegaConf, open_dict

    logger_cfg = config.get("logger")
    if not logger_cfg:
        return None
    logger_cfg = OmegaConf.create(OmegaConf.to_container(logger_cfg, resolve=False))
    from polar_sparsity.config import job_model_name

    overrides = {"save_dir": str(sweep_dir), "name": f"{name}-{job_model_name(config)}", "job_type": name,
                 "group": sweep_dir.name}  # fmt: skip
    with open_dict(logger_cfg):
        for key, value in overrides.items():
            # A CSVLogger's name is its folder under save_dir: keep the configured one.
            if key in logger_cfg and not (key == "name" and "CSVLogger" in str(logger_cfg.get("_target_"))):
                logger_cfg[key] = value
    # The logger's interpolations (${model.name}, ${task_name}, ...) resolve against this root.
    root = OmegaConf.create({"logger": logger_cfg, **{k: config[k] for k in ("model", "data", "task_name")}})
    return make_logger(root.logger)


def log_table(logger: Logger | None, key: str, rows: list[dict[str, Any]]) -> None:
    """Rows of equal keys as a W&B table (other loggers keep tables as files in the run dir)."""
    if isinstance(logger, WandbLogger):
        columns = list(rows[0]) if rows else []
        logger.log_table(key=key, columns=columns, data=[[row.get(c) for c in columns] for row in rows])


def name_wandb_run(logger: Logger | None, name: str, tags: tuple[str, ...] = ()) -> None:
    """Name a W&B run and add tags to it (other loggers name their runs from the config)."""
    if isinstance(logger, WandbLogger):
        logger.experiment.name = name
        logger.experiment.tags = (*(logger.experiment.tags or ()), *tags)


def log_rows(logger: Logger | None, key: str, rows: list[dict[str, Any]], step_key: str) -> None:
    """Log a summary table: a W&B table, plus one metrics row per entry (step = ``row[step_key]``)."""
    if logger is None or not rows:
        return
    log_table(logger, key, rows)
    for row in rows:
        metrics = {f"{key}/{k}": v for k, v in row.items() if k != step_key and isinstance(v, (int, float))}
        logger.log_metrics(metrics, step=int(row[step_key]))
    logger.save()


def log_image(logger: Logger | None, key: str, path: Path) -> None:
    """Attach a PNG to the run (W&B only; CSV runs keep the file in the run dir)."""
    if isinstance(logger, WandbLogger):
        logger.log_image(key=key, images=[str(path)])


def close_logger(logger: Logger | None, failed: bool) -> None:
    """Finish the logger; a W&B run is marked failed when the job raised."""
    if logger is None:
        return
    logger.finalize("failed" if failed else "success")
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=1 if failed else 0)
