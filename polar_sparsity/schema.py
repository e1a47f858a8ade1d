"""Typed configuration schemas shared by every entry point.

Plain dataclasses, importable without Hydra or OmegaConf (the GPU code paths use them too).
``polar_sparsity.config`` registers them with Hydra's ConfigStore, so a composed config is checked
against these types and enums, and ``__post_init__`` range checks run when the entry point turns the
composed config into objects (before any model or data loads).
"""

# OmegaConf 2.3 reads ``Optional[X]`` but not ``X | None`` on Python 3.10, hence the older spelling.
# ruff: noqa: UP007, UP045

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

# OmegaConf's marker for a value that must be given.
MISSING = "???"


def _given(*values: Any) -> bool:
    """False while a schema is built from its defaults (values still MISSING): checks wait for real values."""
    return all(v != MISSING for v in values)


class Weights(str, Enum):
    pretrained = "pretrained"  # hub id, or model.path when set
    random = "random"  # the real architecture with random weights, no download


class DType(str, Enum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class Family(str, Enum):
    opt = "opt"
    llama = "llama"
    mistral = "mistral"
    qwen2 = "qwen2"


class DataKind(str, Enum):
    offline = "offline"  # the corpus shipped inside the package
    hub = "hub"  # a Hugging Face dataset, needs network (or a warm cache)


@dataclass
class ArchitectureConfig:
    """Family-neutral architecture; the family adapter maps it onto the Hugging Face config."""

    vocab_size: int = MISSING  # type: ignore[assignment]
    hidden_size: int = MISSING  # type: ignore[assignment]
    num_layers: int = MISSING  # type: ignore[assignment]
    num_heads: int = MISSING  # type: ignore[assignment]
    num_kv_heads: int = MISSING  # type: ignore[assignment]
    ffn_dim: int = MISSING  # type: ignore[assignment]
    activation: str = MISSING
    norm: str = MISSING
    max_position_embeddings: int = MISSING  # type: ignore[assignment]
    head_dim: Optional[int] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict[str, Any]] = None
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None
    # Family-specific Hugging Face config keys (e.g. OPT-350m's word_embed_proj_dim).
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if _given(self.num_heads, self.num_kv_heads) and self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )


@dataclass
class ModelConfig:
    name: str = MISSING
    family: Family = MISSING  # type: ignore[assignment]
    hf_id: Optional[str] = None
    path: Optional[str] = None  # local checkpoint directory; wins over hf_id
    weights: Weights = Weights.pretrained
    dtype: DType = DType.float32
    tokenizer: Optional[str] = None  # tokenizer id or directory when it differs from the model's
    device_map: Optional[str] = None  # e.g. auto: shard pretrained weights over GPUs (needs accelerate)
    architecture: ArchitectureConfig = field(default_factory=ArchitectureConfig)

    def __post_init__(self) -> None:
        if _given(self.name) and self.weights == Weights.pretrained and not (self.path or self.hf_id):
            raise ValueError(f"model {self.name!r}: weights=pretrained needs model.hf_id or model.path")


@dataclass
class DataConfig:
    name: str = MISSING
    kind: DataKind = DataKind.offline
    hf_path: Optional[str] = None  # e.g. Salesforce/wikitext
    hf_name: Optional[str] = None  # e.g. wikitext-2-raw-v1
    hf_data_files: Optional[dict[str, str]] = None  # split -> file pattern (c4 shards)
    text_field: str = "text"
    streaming: bool = False
    split: str = "train"  # the split collect reads

    def __post_init__(self) -> None:
        if _given(self.name) and self.kind == DataKind.hub and not self.hf_path:
            raise ValueError(f"data {self.name!r}: kind=hub needs data.hf_path")


@dataclass
class PathsConfig:
    # Where stores, routers and runs land; relative paths are taken from the working directory.
    artifacts: str = "artifacts"
    store: str = MISSING


@dataclass
class CollectConfig:
    samples: int = 400_000  # tokens captured (paper: 400000)
    seq_len: int = 512  # tokens per sequence (paper: 512)
    batch_size: int = 8  # sequences per forward pass
    store_dtype: DType = DType.float16  # router inputs on disk
    resume: bool = False  # continue an interrupted store
    overwrite: bool = False  # delete an existing store at the path first

    def __post_init__(self) -> None:
        for name in ("samples", "seq_len", "batch_size"):
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"collect.{name}={value} must be a positive integer")
        if self.resume and self.overwrite:
            raise ValueError("collect.resume=true and collect.overwrite=true contradict each other; pick one")


@dataclass
class CollectRunConfig:
    """Primary config of ``collect.py``."""

    task_name: str = "collect"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    logger: Any = None  # a Lightning logger config (_target_), or null
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
