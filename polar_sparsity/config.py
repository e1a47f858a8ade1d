"""Hydra glue: schema registration, resolvers, and turning a composed config into typed settings.

Importing this module registers the structured schemas (``<entry>_schema`` in Hydra's ConfigStore)
and the OmegaConf resolvers used by ``conf/``. Entry points import it before ``@hydra.main`` runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import netrc
import os
import secrets
import typing
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from polar_sparsity.resources import asset_path
from polar_sparsity.runs import run_group
from polar_sparsity.schema import (
    CalibrateRunConfig,
    CollectRunConfig,
    EvaluateRunConfig,
    GenerateRunConfig,
    TrainRunConfig,
)

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


def weights_tag(weights: Any) -> str:
    """Path suffix of a weights kind: none for pretrained (the usual paths), '-random-weights' else.

    Stores and bundles of random-weight models live apart from the pretrained model's, so routers
    trained on one are never picked up for the other by default.
    """
    kind = getattr(weights, "value", weights)
    return "" if kind == "pretrained" else f"-{kind}-weights"


def run_token() -> str:
    """A short random token, fixed for this launch (cached): run and sweep dirs never collide."""
    return secrets.token_hex(3)


def _register() -> None:
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", asset_path)
    if not OmegaConf.has_resolver("run_group"):
        OmegaConf.register_new_resolver("run_group", run_group)
    if not OmegaConf.has_resolver("weights_tag"):
        OmegaConf.register_new_resolver("weights_tag", weights_tag)
    if not OmegaConf.has_resolver("run_token"):
        # Cached: Hydra copies the resolver cache into every job's config, so all jobs of a sweep
        # agree on their sweep dir, as they do for ${now:...}.
        OmegaConf.register_new_resolver("run_token", run_token, use_cache=True)
    if not OmegaConf.has_resolver("wandb_offline"):
        OmegaConf.register_new_resolver("wandb_offline", wandb_offline)
    store = ConfigStore.instance()
    store.store(name="collect_schema", node=CollectRunConfig)
    store.store(name="evaluate_schema", node=EvaluateRunConfig)
    store.store(name="generate_schema", node=GenerateRunConfig)
    store.store(name="train_schema", node=TrainRunConfig)
    store.store(name="calibrate_schema", node=CalibrateRunConfig)


_register()


_CHECKPOINT_KEYS = ("model.path", "model.hf_id")
_MODEL_CHOICES = ("model", "experiment")  # experiments choose the model too


def checkpoint_model(cfg: DictConfig, overrides: list[str]) -> None:
    """Let a checkpoint describe itself: ``python collect.py model.path=DIR`` needs no model config.

    When the command line names a checkpoint (``model.path`` or ``model.hf_id``) but chooses no model
    config (``model=...`` or ``experiment=...``), the default model config's name, family and
    architecture describe another checkpoint: they are dropped, and the checkpoint's config.json
    gives family and architecture (read when the model loads). Whatever else the command line sets
    on ``model`` is kept. In every case a missing name becomes the checkpoint's directory name (or
    the hub id's last part). Edits ``cfg`` in place, before it is resolved.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from polar_sparsity.models.checkpoint import checkpoint_name

    parsed = OverridesParser.create().parse_overrides(overrides)
    given = {override.key_or_group.lstrip("+~") for override in parsed}
    if given & set(_CHECKPOINT_KEYS) and not given & set(_MODEL_CHOICES):
        with open_dict(cfg):
            for key in ("name", "family", "architecture"):
                if f"model.{key}" not in given:
                    cfg.model[key] = MISSING if key == "name" else None
            if "model.hf_id" in given and "model.path" not in given:
                cfg.model.path = None  # the default config's own directory would win over the hub id
    location = cfg.model.get("path") or cfg.model.get("hf_id")
    if OmegaConf.is_missing(cfg.model, "name") and location:
        cfg.model.name = checkpoint_name(location)


def job_model_name(config: DictConfig) -> str:
    """The model name the jobs of a (multirun) config ran under, as ``checkpoint_model`` makes it."""
    node = OmegaConf.create({"model": OmegaConf.to_container(config.model, resolve=False)})
    checkpoint_model(node, list(config.hydra.overrides.task))
    return str(node.model.name)


def hydra_overrides() -> list[str]:
    """The command line's overrides of the running Hydra job ([] outside Hydra, e.g. in tests)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def to_settings(cfg: DictConfig, schema: type[T]) -> T:
    """Validate a composed config against its schema and return the typed object.

    Runs the schemas' range checks (``__post_init__``); errors name the bad value and what is valid.
    Keys the schema does not know are refused, however they were added (``+collect.sampels=100``).
    """
    unknown = unknown_keys(cfg, schema)
    if unknown:
        raise ValueError(f"invalid configuration: {'; '.join(unknown)}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as error:
        raise ValueError(f"invalid configuration: {error}") from error


def unknown_keys(node: Any, schema: type, prefix: str = "") -> list[str]:
    """Keys of ``node`` that are not fields of the dataclass ``schema`` (recursively), each with a hint.

    Fields typed as free-form (``Any``, ``dict``: the logger config, ``router.net``) are not looked into.
    """
    if not isinstance(node, DictConfig) or not dataclasses.is_dataclass(schema):
        return []
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    problems = []
    for key in node:
        name = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (valid: {', '.join(fields)})"
            problems.append(f"unknown key {name}{hint}")
            continue
        field_type = _dataclass_of(hints.get(str(key)))
        if field_type is not None:
            problems += unknown_keys(node._get_node(key), field_type, f"{name}.")  # type: ignore[arg-type]
    return problems


def _dataclass_of(field_type: Any) -> type | None:
    """The dataclass a field holds, also through ``Optional[...]`` (e.g. ``model.architecture``)."""
    if dataclasses.is_dataclass(field_type):
        return field_type  # type: ignore[return-value]
    inner = [arg for arg in typing.get_args(field_type) if dataclasses.is_dataclass(arg)]
    return inner[0] if len(inner) == 1 else None


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    """The fully resolved config as plain containers (for manifests and loggers)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
