"""Hydra glue: schema registration, resolvers, and turning a composed config into typed settings.

Importing this module registers the structured schemas (``<entry>_schema`` in Hydra's ConfigStore)
and the OmegaConf resolvers used by ``conf/``. Entry points import it before ``@hydra.main`` runs.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from polar_sparsity.resources import asset_path
from polar_sparsity.schema import CollectRunConfig, EvaluateRunConfig, GenerateRunConfig, TrainRunConfig

T = TypeVar("T")


def wandb_offline() -> bool:
    """W&B runs offline unless the user has an API key (env, or a netrc entry from `wandb login`)."""
    if os.environ.get("WANDB_MODE") in ("online", "offline"):
        return os.environ["WANDB_MODE"] == "offline"
    if os.environ.get("WANDB_API_KEY"):
        return False
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is None
    except (FileNotFoundError, netrc.NetrcParseError):
        return True


def run_group() -> str:
    """One name per launch: the sweep dir's name in a multirun (groups its jobs), else the run dir's."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return Path(hydra_cfg.sweep.dir).name
    return Path(hydra_cfg.run.dir).name


def _register() -> None:
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", asset_path)
    if not OmegaConf.has_resolver("run_group"):
        OmegaConf.register_new_resolver("run_group", run_group)
    if not OmegaConf.has_resolver("wandb_offline"):
        OmegaConf.register_new_resolver("wandb_offline", wandb_offline)
    store = ConfigStore.instance()
    store.store(name="collect_schema", node=CollectRunConfig)
    store.store(name="evaluate_schema", node=EvaluateRunConfig)
    store.store(name="generate_schema", node=GenerateRunConfig)
    store.store(name="train_schema", node=TrainRunConfig)


_register()


def to_settings(cfg: DictConfig, schema: type[T]) -> T:
    """Validate a composed config against its schema and return the typed object.

    Runs the schemas' range checks (``__post_init__``); errors name the bad value and what is valid.
    """
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as error:
        raise ValueError(f"invalid configuration: {error}") from error


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    """The fully resolved config as plain containers (for manifests and loggers)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
