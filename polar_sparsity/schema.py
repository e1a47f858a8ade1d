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
    routers: str = MISSING  # the router bundle of this model and data source (train.py writes it)


@dataclass
class CollectConfig:
    samples: int = 400_000  # tokens captured (paper: 400000)
    seq_len: int = 512  # tokens per sequence (paper: 512)
    batch_size: int = 8  # sequences per forward pass
    store_dtype: DType = DType.float16  # router inputs on disk
    resume: bool = False  # continue an interrupted store
    overwrite: bool = False  # delete an existing store at the path first
    checkpoint_seconds: float = 30.0  # how often progress is made durable (what resume restarts from)

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


# --- evaluation (evaluate.py) ---------------------------------------------------------------------


class Mode(str, Enum):
    dense = "dense"  # the unmodified model
    sparse = "sparse"  # head (and ReLU-MLP) routers from the router bundle pick what is kept
    sparse_attn = "sparse_attn"  # oracle: heads ranked by their true output norms, no routers
    random_attn = "random_attn"  # baseline: uniformly random heads per token (seeded)


def parse_positions(spec: str) -> Optional[int]:
    """``all`` -> None (every position is sparse); ``last:N`` -> N (only the last N of each sequence)."""
    if spec == "all":
        return None
    head, _, count = str(spec).partition(":")
    if head == "last" and count.isdigit() and int(count) > 0:
        return int(count)
    raise ValueError(f"sparsity.positions={spec!r} is not valid; use 'all' or 'last:N' with N >= 1 (last:8)")


def _check_fraction(name: str, value: Optional[float]) -> None:
    if value is not None and not 0.0 < value <= 1.0:
        raise ValueError(f"{name}={value} must be a fraction in (0, 1] (1.0 keeps everything)")


@dataclass
class SparsityConfig:
    attn_topk: float = 0.5  # fraction of heads (KV groups for GQA) kept per token
    mlp_topk: Optional[float] = None  # fraction of MLP neurons kept per token (ReLU models); null = MLP dense
    dense_attn_layers: list[int] = field(default_factory=lambda: [0])  # attention stays dense here
    positions: str = "all"  # all | last:N (only the last N positions of each sequence are sparse)
    # mode=sparse: which trained head routers (bundle mha/topk=<k>) rank the heads; null: attn_topk's own.
    router_topk: Optional[float] = None

    def __post_init__(self) -> None:
        _check_fraction("sparsity.attn_topk", self.attn_topk)
        _check_fraction("sparsity.router_topk", self.router_topk)
        _check_fraction("sparsity.mlp_topk", self.mlp_topk)
        parse_positions(self.positions)
        negative = [layer for layer in self.dense_attn_layers if layer < 0]
        if negative:
            raise ValueError(f"sparsity.dense_attn_layers={self.dense_attn_layers}: layers must be >= 0")


@dataclass
class PerplexityConfig:
    enabled: bool = True
    split: str = "test"  # held-out split of the configured data source
    seq_len: int = 512
    batch_size: int = 8
    max_tokens: Optional[int] = None  # stop after this many tokens (null: the whole split)

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"eval.perplexity.{name}={getattr(self, name)} must be a positive integer")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise ValueError(f"eval.perplexity.max_tokens={self.max_tokens} must be positive (or null)")


@dataclass
class EvalConfig:
    name: str = MISSING  # offline | paper | custom
    tasks: list[str] = field(default_factory=list)  # lm-eval task, group or tag names
    num_fewshot: Optional[int] = None  # null: each task's default
    limit: Optional[float] = None  # lm-eval limit: examples per task (>= 1) or a fraction (< 1)
    batch_size: int = 16
    bootstrap_iters: int = 100000  # lm-eval's stderr bootstrap for metrics without a closed form
    dense_cache: bool = True  # reuse cached dense results for the comparison (mode=dense refreshes them)
    cache_dir: str = MISSING  # where dense results are cached
    perplexity: PerplexityConfig = field(default_factory=PerplexityConfig)

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ValueError(f"eval.batch_size={self.batch_size} must be a positive integer")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ValueError(f"eval.num_fewshot={self.num_fewshot} must be >= 0 (or null)")
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"eval.limit={self.limit} must be positive: a count (>= 1) or a fraction (< 1)")
        if self.limit is not None and self.limit > 1 and self.limit != int(self.limit):
            raise ValueError(f"eval.limit={self.limit}: a count must be a whole number")
        if _given(self.name) and not self.tasks and not self.perplexity.enabled:
            raise ValueError("nothing to evaluate: eval.tasks is empty and eval.perplexity.enabled=false")


@dataclass
class EvaluateRunConfig:
    """Primary config of ``evaluate.py``."""

    task_name: str = "evaluate"
    mode: Mode = Mode.sparse
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    logger: Any = None
    device: str = "auto"
    seed: int = 0  # random_attn's head choice and lm-eval's seeds
    output_dir: Optional[str] = None  # null: the Hydra run dir
    sweep_dir: Optional[str] = None  # where the sweep CSV is appended; null: Hydra's sweep dir (or run dir)

    def __post_init__(self) -> None:
        last_n = parse_positions(self.sparsity.positions)
        if self.mode != Mode.dense and last_n is not None and self.eval.tasks and self.eval.batch_size != 1:
            # HFLM right-pads batches without an attention mask: a row's true end is unknown at batch > 1.
            raise ValueError(
                f"sparsity.positions={self.sparsity.positions} needs eval.batch_size=1 for lm-eval tasks "
                f"(got {self.eval.batch_size}): lm-eval right-pads batches without a mask, so only a "
                f"batch of one has known sequence ends"
            )


# --- router training (train.py) -------------------------------------------------------------------


class RouterKind(str, Enum):
    mha = "mha"  # attention-head router: one score per query head (per KV group for GQA models)
    mlp = "mlp"  # MLP-neuron router (ReLU models): one score per neuron


class GroupReduce(str, Enum):
    """How a KV group's label norm is made from its query heads' output norms (GQA head routers)."""

    max = "max"
    mean = "mean"
    sum = "sum"


class MonitorMode(str, Enum):
    max = "max"
    min = "min"


@dataclass
class EarlyStoppingConfig:
    enabled: bool = True
    patience: int = 3  # validation epochs without improvement of router.monitor before stopping
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        if self.patience < 0:
            raise ValueError(f"router.early_stopping.patience={self.patience} must be >= 0")


@dataclass
class RouterConfig:
    """One router kind and its training recipe (``conf/router/*.yaml``; defaults follow the paper)."""

    kind: RouterKind = MISSING  # type: ignore[assignment]
    # Net class (``_target_``, a dotted path to an nn.Module) and its keyword arguments; the input and
    # output sizes (in_features, out_features) come from the store.
    net: dict[str, Any] = field(default_factory=dict)
    topk: Optional[float] = None  # mha: fraction of heads (KV groups) labelled active per token
    group_reduce: GroupReduce = GroupReduce.max  # GQA: query-head norms -> one norm per KV group
    batch_size: int = 512
    max_epochs: int = 5
    lr: float = 1e-4
    weight_decay: float = 0.01
    neg_weight: Optional[float] = None  # BCE weight of negatives; null: the batch's positive rate (paper)
    monitor: str = MISSING  # validation metric for early stopping and the exported (best) weights
    monitor_mode: MonitorMode = MonitorMode.max
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)

    def __post_init__(self) -> None:
        if not _given(self.kind):
            return
        if self.kind == RouterKind.mha:
            if self.topk is None or not 0.0 < self.topk <= 1.0:
                raise ValueError(f"router.topk={self.topk} must be a fraction in (0, 1] for head routers")
        elif self.topk is not None:
            raise ValueError(
                f"router.topk={self.topk} applies to head routers only: MLP labels are 'neuron fired' "
                f"(the MLP's k is calibrated later, per batch size)"
            )
        for name in ("batch_size", "max_epochs"):
            if getattr(self, name) <= 0:
                raise ValueError(f"router.{name}={getattr(self, name)} must be a positive integer")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(
                f"router.lr={self.lr} must be > 0 and router.weight_decay={self.weight_decay} >= 0"
            )
        if self.neg_weight is not None and not 0.0 < self.neg_weight <= 1.0:
            raise ValueError(
                f"router.neg_weight={self.neg_weight} must be in (0, 1] (or null: the positive rate)"
            )
        if "_target_" not in self.net:
            raise ValueError("router.net needs a _target_ (dotted path of the router's nn.Module class)")


@dataclass
class TrainerConfig:
    """Lightning ``Trainer`` hardware settings (``conf/trainer/*.yaml``); epochs come from the router."""

    accelerator: str = "cpu"  # cpu | gpu | auto
    devices: Any = 1  # count, list of ids, or "auto"
    strategy: str = "auto"  # auto | ddp | ...
    num_nodes: int = 1
    precision: str = "32-true"  # Lightning 2 precision: 32-true, bf16-mixed, 16-mixed, ...
    log_every_n_steps: int = 50
    enable_progress_bar: bool = True
    deterministic: bool = False
    # torch intra-op threads on CPUs. null: 1 for nets under 1M parameters (head routers: thread
    # synchronisation costs more than their matrix products), torch's default for bigger ones.
    cpu_threads: Optional[int] = None

    def __post_init__(self) -> None:
        if self.cpu_threads is not None and self.cpu_threads <= 0:
            raise ValueError(f"trainer.cpu_threads={self.cpu_threads} must be a positive integer (or null)")


@dataclass
class TrainConfig:
    samples: Optional[int] = None  # use the store's first N rows (null: all of them)
    val_fraction: float = 0.1  # share of *sequences* held out for validation
    num_workers: int = 0  # DataLoader workers (0: read the memory map in the training process)
    keep_checkpoints: bool = False  # Lightning checkpoints are deleted once the best router is exported

    def __post_init__(self) -> None:
        if self.samples is not None and self.samples <= 0:
            raise ValueError(f"train.samples={self.samples} must be a positive integer (or null: all rows)")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"train.val_fraction={self.val_fraction} must be in (0, 1)")
        if self.num_workers < 0:
            raise ValueError(f"train.num_workers={self.num_workers} must be >= 0")


@dataclass
class TrainRunConfig:
    """Primary config of ``train.py``: one router (kind, layer) trained from the activation store."""

    task_name: str = "train"
    layer: int = MISSING  # type: ignore[assignment]
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logger: Any = None
    seed: int = 0
    output_dir: Optional[str] = None  # null: the Hydra job dir (checkpoints, router_result.json)
