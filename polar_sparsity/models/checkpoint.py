"""A model config against its checkpoint: the default name, the family, the architecture check.

A checkpoint (local directory or hub id) describes itself in its ``config.json``: that is where the
family (``model_type``) and the geometry come from. An architecture written in a model config is a
claim about the checkpoint; it is checked here, from the config alone, before any weights load.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from transformers import PretrainedConfig

from polar_sparsity.models.families import FAMILIES, FamilyAdapter, family_for_config
from polar_sparsity.schema import ModelConfig


def checkpoint_name(location: str) -> str:
    """A model name from where its weights are: the directory's name, or the hub id's last part."""
    path = Path(location).expanduser()
    if path.exists():
        return path.resolve().name
    return location.rstrip("/").rsplit("/", 1)[-1]


def checkpoint_adapter(cfg: ModelConfig, hf_config: PretrainedConfig, location: str) -> FamilyAdapter:
    """The family adapter of a checkpoint; refuses an unsupported family or a config that disagrees.

    Checks ``model.family`` and ``model.architecture`` (when given) against the checkpoint's config.
    """
    try:
        adapter = family_for_config(hf_config)
    except ValueError:
        served = sorted(t for family in FAMILIES.values() for t in family.model_types)
        raise ValueError(
            f"checkpoint {location!r} is a {hf_config.model_type!r} model, which no family adapter "
            f"serves; supported families: {sorted(family.value for family in FAMILIES)} "
            f"(config.json model_type one of {served})"
        ) from None
    if cfg.family is not None and cfg.family.value != adapter.name:
        raise ValueError(
            f"model {cfg.name!r} is configured as family {cfg.family.value!r} but its checkpoint "
            f"{location!r} is {hf_config.model_type!r}; set model.family={adapter.name} (or null)"
        )
    if cfg.architecture is not None:
        _check_architecture(cfg, adapter, hf_config, location)
    return adapter


def _check_architecture(
    cfg: ModelConfig, adapter: FamilyAdapter, hf_config: PretrainedConfig, location: str
) -> None:
    configured = adapter.geometry(adapter.build_config(asdict(cfg.architecture))).as_dict()
    actual = adapter.geometry(hf_config).as_dict()
    differences = [f"{key}: config {configured[key]}, checkpoint {actual[key]}" for key in actual
                   if configured[key] != actual[key]]  # fmt: skip
    if differences:
        raise ValueError(
            f"model {cfg.name!r}: model.architecture does not match the checkpoint {location!r} "
            f"({'; '.join(differences)}). Fix the model config, or drop model.architecture: "
            f"`model.path=DIR` without `model=...` takes the architecture from the checkpoint"
        )
