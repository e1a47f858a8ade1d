"""Model families (hook points, geometry) and loading (pretrained, local, or random weights)."""

from polar_sparsity.models.families import (
    FAMILIES,
    FamilyAdapter,
    MlpKind,
    ModelGeometry,
    build_hf_config,
    family_for_config,
    get_family,
)
from polar_sparsity.models.loading import LoadedModel, load_hf_config, load_model, resolve_device, torch_dtype

__all__ = [
    "FAMILIES",
    "FamilyAdapter",
    "LoadedModel",
    "MlpKind",
    "ModelGeometry",
    "build_hf_config",
    "family_for_config",
    "get_family",
    "load_hf_config",
    "load_model",
    "resolve_device",
    "torch_dtype",
]
