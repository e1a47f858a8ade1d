"""Load a model and tokenizer from a model config: hub id, local checkpoint, or random weights.

``weights=random`` builds the real architecture from ``model.architecture`` with no network, for
speed work and tests at real shape. When that model's own tokenizer is not available offline, the
tokenizer trained on the offline corpus is used (its ids are inside every supported vocabulary) and
``LoadedModel.tokenizer_source`` says so.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from polar_sparsity.data.tokenizer import tokenizer_path
from polar_sparsity.models.checkpoint import checkpoint_adapter
from polar_sparsity.models.families import (
    FAMILIES,
    FamilyAdapter,
    ModelGeometry,
    build_hf_config,
    family_for_config,
)
from polar_sparsity.schema import DType, ModelConfig, Weights

log = logging.getLogger(__name__)

_DTYPES = {DType.float32: torch.float32, DType.float16: torch.float16, DType.bfloat16: torch.bfloat16}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: Tokenizer
    adapter: FamilyAdapter
    geometry: ModelGeometry
    weights_source: str  # what the weights are: a path, a hub id, or "random (seed N)"
    tokenizer_source: str  # which tokenizer, and why when it is not the model's own

    @property
    def input_device(self) -> torch.device:
        """Where input ids go (the embedding's device; differs from others when sharded)."""
        return self.model.get_input_embeddings().weight.device


def cache_argument(model: PreTrainedModel) -> str:
    """The name under which ``model.forward`` takes a KV cache: ``cache`` from transformers 5.24 on
    (where ``past_key_values`` still works but warns, until 5.40), ``past_key_values`` before; the
    project supports every transformers 5 release."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def torch_dtype(dtype: DType | str) -> torch.dtype:
    return _DTYPES[DType(dtype)]


def resolve_device(name: str) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available here; use device=cpu or device=auto")
    return device


def _weights_location(cfg: ModelConfig) -> str:
    return cfg.path or cfg.hf_id  # type: ignore[return-value]


def load_hf_config(cfg: ModelConfig) -> PretrainedConfig:
    """The Hugging Face config without loading weights (for geometry and size estimates).

    ``model.num_layers=N`` keeps the first N layers (real layer shapes, fewer of them). From
    ``model.architecture`` for random weights when it is given, else from the checkpoint's
    config.json, whose family and geometry are checked against the model config first.
    """
    if cfg.weights == Weights.random and cfg.architecture is not None:
        return _keep_layers(build_hf_config(cfg.family.value, _architecture_dict(cfg)), cfg.num_layers)
    location = _weights_location(cfg)
    try:
        hf_config = AutoConfig.from_pretrained(location)
    except OSError as error:
        raise RuntimeError(
            f"could not load the config of {location!r} ({error}). Without network, use "
            f"model.weights=random for the real architecture with random weights, or model.path=DIR "
            f"for a local checkpoint."
        ) from error
    except ValueError:  # a model_type this transformers version does not know
        model_type = PretrainedConfig.get_config_dict(location)[0].get("model_type")
        raise ValueError(
            f"checkpoint {location!r} is a {model_type!r} model, which is not supported; "
            f"supported families: {sorted(family.value for family in FAMILIES)}"
        ) from None
    checkpoint_adapter(cfg, hf_config, location)
    return _keep_layers(hf_config, cfg.num_layers)


def _keep_layers(config: PretrainedConfig, num_layers: int | None) -> PretrainedConfig:
    if num_layers is None:
        return config
    total = config.num_hidden_layers
    if not 1 <= num_layers <= total:
        raise ValueError(f"model.num_layers={num_layers} is not in 1..{total} (this architecture's layers)")
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None) is not None:  # per-layer attention kinds (Qwen2, Mistral)
        config.layer_types = config.layer_types[:num_layers]
    return config


def load_model(cfg: ModelConfig, device: str = "auto", seed: int = 0) -> LoadedModel:
    """Load weights and tokenizer; check that the checkpoint belongs to the configured family.

    ``model.device_map`` (e.g. ``auto``) shards pretrained weights over the visible GPUs; when it is
    null the whole model goes to ``device``.
    """
    target = resolve_device(device)
    hf_config = load_hf_config(cfg)  # checks family and architecture before any weights load
    adapter = family_for_config(hf_config)
    dtype = torch_dtype(cfg.dtype)
    if cfg.weights == Weights.random:
        model = _random_model(hf_config, dtype, target, seed)
        weights_source = f"random weights (seed {seed})"
    else:
        model = _pretrained_model(cfg, hf_config, dtype, target)
        weights_source = _weights_location(cfg)
    model.eval()
    tokenizer, tokenizer_source = _load_tokenizer(cfg, hf_config.vocab_size)
    return LoadedModel(
        model, tokenizer, adapter, adapter.geometry(hf_config), weights_source, tokenizer_source
    )


def _architecture_dict(cfg: ModelConfig) -> dict[str, Any]:
    return asdict(cfg.architecture) if not isinstance(cfg.architecture, dict) else dict(cfg.architecture)


def _random_model(
    hf_config: PretrainedConfig, dtype: torch.dtype, device: torch.device, seed: int
) -> PreTrainedModel:
    torch.manual_seed(seed)
    # Allocate directly on the target device: a large model never passes through host memory.
    with torch.device(device):
        return AutoModelForCausalLM.from_config(hf_config, dtype=dtype)


def _pretrained_model(
    cfg: ModelConfig, config: PretrainedConfig, dtype: torch.dtype, device: torch.device
) -> PreTrainedModel:
    location = _weights_location(cfg)
    try:
        # The config carries model.num_layers: the checkpoint's later layers are not loaded.
        if cfg.device_map is not None:
            return AutoModelForCausalLM.from_pretrained(
                location, config=config, dtype=dtype, device_map=cfg.device_map
            )
        return AutoModelForCausalLM.from_pretrained(location, config=config, dtype=dtype).to(device)
    except OSError as error:
        raise RuntimeError(
            f"could not load weights from {location!r} ({error}). Without network, use "
            f"model.weights=random or model.path=DIR for a local checkpoint."
        ) from error


def _load_tokenizer(cfg: ModelConfig, vocab_size: int) -> tuple[Tokenizer, str]:
    if cfg.tokenizer:
        tokenizer, source = AutoTokenizer.from_pretrained(cfg.tokenizer), cfg.tokenizer
    elif cfg.weights == Weights.pretrained:
        tokenizer, source = AutoTokenizer.from_pretrained(_weights_location(cfg)), _weights_location(cfg)
    else:
        tokenizer, source = _offline_tokenizer(cfg)
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"tokenizer {source!r} has {len(tokenizer)} tokens but model {cfg.name!r} only {vocab_size}; "
            f"set model.tokenizer to one that fits"
        )
    if tokenizer.pad_token is None:
        # Batches are padded only at a stream's tail; any id works since padded positions are masked.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, source


def _offline_tokenizer(cfg: ModelConfig) -> tuple[Tokenizer, str]:
    """The model's own tokenizer if it is local (its directory, the HF cache), else the shipped one."""
    location = cfg.path or cfg.hf_id
    if location:
        try:
            return AutoTokenizer.from_pretrained(location, local_files_only=True), location
        except (OSError, ValueError):
            pass
    path = str(tokenizer_path())
    source = (
        f"shipped offline-corpus tokenizer ({path}); {cfg.hf_id or cfg.name}'s own tokenizer is not "
        f"available offline, and its ids are a subset of the model's vocabulary"
    )
    log.warning("model %s: using the %s", cfg.name, source)
    return AutoTokenizer.from_pretrained(path), source


def load_tokenizer(cfg: ModelConfig) -> tuple[Tokenizer, str]:
    """The tokenizer ``load_model`` would use, without loading any weights (for checks before a run)."""
    return _load_tokenizer(cfg, load_hf_config(cfg).vocab_size)
