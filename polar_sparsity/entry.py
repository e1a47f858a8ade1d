"""What every Hydra entry point does around its task: validate, log, always close the logger."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from omegaconf import DictConfig

from polar_sparsity.config import checkpoint_model, hydra_overrides, resolved_config, to_settings
from polar_sparsity.tracking import close_logger, make_logger

S = TypeVar("S")


def run_entry(cfg: DictConfig, schema: type[S], task: Callable[[S, dict[str, Any], Any], Any]) -> Any:
    """Validate ``cfg`` against ``schema`` (before anything loads), then run ``task`` with a logger."""
    checkpoint_model(cfg, hydra_overrides())
    settings = to_settings(cfg, schema)
    resolved = resolved_config(cfg)
    logger = make_logger(cfg.get("logger"))
    failed = True
    try:
        if logger is not None:
            logger.log_hyperparams(resolved)
        result = task(settings, resolved, logger)
        failed = False
        return result
    finally:
        close_logger(logger, failed)
