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


def log_rows(logger: Logger | None, key: str, rows: list[dict[str, Any]], step_key: str) -> None:
    """Log a summary table: a W&B table, plus one metrics row per entry (step = ``row[step_key]``)."""
    if logger is None or not rows:
        return
    if isinstance(logger, WandbLogger):
        columns = list(rows[0])
        logger.log_table(key=key, columns=columns, data=[[row[c] for c in columns] for row in rows])
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
