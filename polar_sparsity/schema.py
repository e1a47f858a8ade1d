"""Typed configuration schemas shared by every entry point.

Plain dataclasses, importable without Hydra or OmegaConf (the GPU code paths use them too).
``polar_sparsity.config`` registers them with Hydra's ConfigStore, so a composed config is checked
against these types and enums, and ``__post_init__`` range checks run when the entry point turns the
composed config into objects (before any model or data loads).
"""

# OmegaConf 2.3 reads ``Optional[X]`` but not ``X | None`` on Python 3.10, hence the older spelling.
# ruff: noqa: UP007, UP045

from __future__ import annotations

import os
import re
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
    """The model families; ``models.families.FAMILIES`` holds one adapter for each, keyed by these."""

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
    # Missing: the checkpoint directory's name (or the hub id's last part); see config.checkpoint_model.
    name: str = MISSING
    family: Optional[Family] = None  # null: read from the checkpoint's config.json (model_type)
    hf_id: Optional[str] = None
    path: Optional[str] = None  # local checkpoint directory; wins over hf_id
    weights: Weights = Weights.pretrained
    dtype: DType = DType.float32
    tokenizer: Optional[str] = None  # tokenizer id or directory when it differs from the model's
    device_map: Optional[str] = None  # e.g. auto: shard pretrained weights over GPUs (needs accelerate)
    # null: the checkpoint's own. Given: builds model.weights=random offline, and is checked against
    # the checkpoint (config.json) before anything runs when the weights are pretrained.
    architecture: Optional[ArchitectureConfig] = None
    # Keep only the first N decoder layers at their real shape (speed work on models that do not fit).
    num_layers: Optional[int] = None

    def __post_init__(self) -> None:
        if self.path:
            self.path = os.path.expanduser(self.path)  # `model.path='~/x'`: Hydra needs the ~ quoted
        if _given(self.name) and self.weights == Weights.pretrained and not (self.path or self.hf_id):
            raise ValueError(f"model {self.name!r}: weights=pretrained needs model.hf_id or model.path")
        if self.num_layers is not None and self.num_layers < 1:
            raise ValueError(f"model.num_layers={self.num_layers} must be >= 1 (or null: all layers)")
        if _given(self.name) and self.architecture is None and not (self.path or self.hf_id):
            raise ValueError(
                f"model {self.name!r}: weights=random needs model.architecture, or a checkpoint "
                f"(model.path or model.hf_id) whose config.json gives the architecture"
            )
        if self.architecture is not None and self.family is None:
            raise ValueError(
                f"model {self.name!r}: model.architecture is family-neutral and needs model.family "
                f"(one of {[f.value for f in Family]})"
            )


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
    # Norm-ranked reference: heads ranked by their true output norms, no routers. A reference, not an
    # upper bound: trained routers can beat it (a large output norm is not always the useful head).
    sparse_attn = "sparse_attn"
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


_RANGE = re.compile(r"range\((\d+),(\d+)(?:,(\d+))?\)")
_LAYERS_HELP = "a list of layers, 'range(A,B)' (B excluded), 'A-B' (B included), or items joined by ','"


def parse_layers(name: str, spec: Any) -> list[int]:
    """Layer indices from a list (items: N, 'A-B', 'range(A,B)') or one such string; sorted, unique."""
    items = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    layers: set[int] = set()
    for item in items:
        text = str(item).replace(" ", "")
        match = _RANGE.fullmatch(text)
        if match:
            start, stop, step = (int(g) if g else 1 for g in match.groups())
            layers.update(range(start, stop, step))
            continue
        for part in text.split(","):
            first, dash, last = part.partition("-")
            if not first.isdigit() or (dash and not last.isdigit()):
                raise ValueError(f"{name}={spec!r}: {part!r} is not a layer; use {_LAYERS_HELP}")
            layers.update(range(int(first), int(last or first) + 1))
    return sorted(layers)


@dataclass
class SparsityConfig:
    attn_topk: float = 0.5  # fraction of heads (KV groups for GQA) kept per token
    # Whole count of heads (KV groups for GQA) kept per token; when set it replaces attn_topk.
    attn_keep: Optional[int] = None
    mlp_topk: Optional[float] = None  # fraction of MLP neurons kept per token (ReLU models); null = MLP dense
    # mode=sparse, ReLU models: per layer, the k calibrated for this decode batch size (calibrate.py)
    # instead of a fixed mlp_topk; null = not used.
    mlp_batch_size: Optional[int] = None
    dense_attn_layers: list[int] = field(default_factory=lambda: [0])  # attention stays dense here
    # The positive form: only these layers are sparse (see parse_layers); excludes dense_attn_layers.
    sparse_attn_layers: Any = None
    positions: str = "all"  # all | last:N (only the last N positions of each sequence are sparse)
    # mode=sparse: which trained head routers (bundle mha/topk=<k>) rank the heads; null: attn_topk's own.
    router_topk: Optional[float] = None

    def __post_init__(self) -> None:
        _check_fraction("sparsity.attn_topk", self.attn_topk)
        _check_fraction("sparsity.router_topk", self.router_topk)
        _check_fraction("sparsity.mlp_topk", self.mlp_topk)
        if self.mlp_batch_size is not None and self.mlp_batch_size <= 0:
            raise ValueError(
                f"sparsity.mlp_batch_size={self.mlp_batch_size} must be a positive integer (or null)"
            )
        if self.mlp_batch_size is not None and self.mlp_topk is not None:
            raise ValueError(
                f"sparsity.mlp_topk={self.mlp_topk} and sparsity.mlp_batch_size={self.mlp_batch_size} both "
                f"set the MLP's k: keep one (mlp_batch_size uses the calibrated per-layer k)"
            )
        if self.attn_keep is not None and self.attn_keep < 1:
            raise ValueError(f"sparsity.attn_keep={self.attn_keep} must be a whole count >= 1 (or null)")
        parse_positions(self.positions)
        negative = [layer for layer in self.dense_attn_layers if layer < 0]
        if negative:
            raise ValueError(f"sparsity.dense_attn_layers={self.dense_attn_layers}: layers must be >= 0")
        if self.sparse_attn_layers is not None:
            parse_layers("sparsity.sparse_attn_layers", self.sparse_attn_layers)
            if list(self.dense_attn_layers) != [0]:
                raise ValueError(
                    f"sparsity.sparse_attn_layers={self.sparse_attn_layers!r} and "
                    f"sparsity.dense_attn_layers={self.dense_attn_layers} both say which layers are sparse; "
                    f"give one of them (the other layers are the complement)"
                )

    def dense_layers(self, num_layers: int) -> list[int]:
        """Layers whose attention stays dense: dense_attn_layers, or all but sparse_attn_layers."""
        if self.sparse_attn_layers is None:
            return sorted(self.dense_attn_layers)
        sparse = parse_layers("sparsity.sparse_attn_layers", self.sparse_attn_layers)
        outside = [layer for layer in sparse if layer >= num_layers]
        if outside:
            raise ValueError(
                f"sparsity.sparse_attn_layers={self.sparse_attn_layers!r} has layers {outside} outside "
                f"this model's 0..{num_layers - 1}"
            )
        return [layer for layer in range(num_layers) if layer not in sparse]


@dataclass
class ParallelConfig:
    """Tensor parallelism of the decoding engine (``polar_sparsity.decode.parallel``)."""

    tp: int = 1  # ranks sharing each layer's heads and neurons; > 1: launch with torchrun --nproc-per-node=tp

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise ValueError(f"parallel.tp={self.tp} must be a positive integer (1: one process)")


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


# --- generation (generate.py) ---------------------------------------------------------------------


class DecodeBackend(str, Enum):
    auto = "auto"  # the Triton kernels on CUDA, their torch references elsewhere
    torch = "torch"  # the torch reference ops (any device)
    triton = "triton"  # the Triton kernels (a CUDA GPU; the CPU only under TRITON_INTERPRET=1)


# What the decoding engine can run: head / MLP routers, or nothing sparse. Oracle and random heads
# need every head's true output, which a decoder that skips heads never computes.
GENERATE_MODES = (Mode.dense, Mode.sparse)


@dataclass
class DecodeConfig:
    max_new_tokens: int = 64  # per prompt; a sequence stops earlier at the end-of-text token
    temperature: float = 0.0  # 0: greedy; > 0: sampling from softmax(logits / temperature)
    top_p: float = 1.0  # nucleus sampling: the smallest set of tokens holding this probability mass
    batch_size: int = 8  # prompts decoded together (the engine's batch)
    backend: DecodeBackend = DecodeBackend.auto
    cuda_graphs: bool = True  # capture decode steps in CUDA graphs (GPU only; ignored on the CPU)

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise ValueError(f"decode.max_new_tokens={self.max_new_tokens} must be a positive integer")
        if self.temperature < 0:
            raise ValueError(f"decode.temperature={self.temperature} must be >= 0 (0 is greedy decoding)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"decode.top_p={self.top_p} must be in (0, 1] (1.0 keeps every token)")
        if self.batch_size <= 0:
            raise ValueError(f"decode.batch_size={self.batch_size} must be a positive integer")


@dataclass
class GenerateRunConfig:
    """Primary config of ``generate.py``: complete prompts with the decoding engine."""

    task_name: str = "generate"
    mode: Mode = Mode.dense
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)  # names the router bundle (routers per data source)
    paths: PathsConfig = field(default_factory=PathsConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    prompts: Optional[list[str]] = None  # the prompts themselves
    prompts_file: Optional[str] = None  # .jsonl ({"prompt": ...} per line) or .txt (one per line)
    logger: Any = None
    device: str = "auto"
    seed: int = 0  # sampling (batch i uses seed + i) and random weights
    output_dir: Optional[str] = None  # null: the Hydra run dir

    def __post_init__(self) -> None:
        if self.mode not in GENERATE_MODES:
            valid = ", ".join(m.value for m in GENERATE_MODES)
            raise ValueError(
                f"mode={self.mode.value} is an evaluation mode (evaluate.py): it needs every head's true "
                f"output, which the decoding engine never computes. generate.py supports mode={valid}"
            )
        if self.sparsity.positions != "all":
            raise ValueError(
                f"sparsity.positions={self.sparsity.positions} applies to evaluate.py only: generate.py "
                f"always prefills the prompt densely and makes every decode step sparse (positions=all)"
            )
        if self.prompts is not None and self.prompts_file is not None:
            raise ValueError("give either prompts=[...] or prompts_file=PATH, not both")
        if self.prompts is not None:
            check_prompts(self.prompts, "prompts")


def check_prompts(prompts: list[str], source: str) -> None:
    """At least one prompt, and none empty (an empty prompt has no token to condition on)."""
    if not prompts:
        raise ValueError(f"{source} holds no prompts; give at least one")
    empty = [i for i, prompt in enumerate(prompts) if not str(prompt).strip()]
    if empty:
        raise ValueError(f"{source}: prompt(s) {empty} are empty; every prompt needs some text")


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


# --- MLP top-k calibration (calibrate.py) ---------------------------------------------------------


class CalibrateObjective(str, Enum):
    recall = "recall"  # the smallest k (per layer and batch size) meeting target_recall (paper)
    latency = "latency"  # the largest k whose measured MLP latency fits latency_budget x dense


PAPER_CALIBRATION_BATCH_SIZES = [1, 2, 4, 8, 16, 32, 48, 64, 128, 256]


def check_calibration(
    batch_sizes: list[int],
    target_recall: float,
    granularity: int,
    batches: int,
    check_fraction: float,
    weight_bytes: int,
    max_batches: int,
) -> None:
    """Range checks of the calibration settings, shared by the Hydra schema and the library."""
    if not batch_sizes or any(b <= 0 for b in batch_sizes) or len(set(batch_sizes)) != len(batch_sizes):
        raise ValueError(
            f"calibrate.batch_sizes={list(batch_sizes)} must be distinct positive integers "
            f"(paper: {PAPER_CALIBRATION_BATCH_SIZES})"
        )
    if not 0.0 < target_recall <= 1.0:
        raise ValueError(f"calibrate.target_recall={target_recall} must be in (0, 1] (paper: 0.99)")
    for name, value in (("granularity", granularity), ("batches", batches), ("weight_bytes", weight_bytes)):
        if value <= 0:
            raise ValueError(f"calibrate.{name}={value} must be a positive integer")
    if not 0.0 < check_fraction < 1.0:
        raise ValueError(f"calibrate.check_fraction={check_fraction} must be in (0, 1)")
    if max_batches < batches:
        raise ValueError(f"calibrate.max_batches={max_batches} must be >= calibrate.batches={batches}")


@dataclass
class CalibrateConfig:
    batch_sizes: list[int] = field(default_factory=lambda: list(PAPER_CALIBRATION_BATCH_SIZES))
    target_recall: float = 0.99  # share of the batch's union of active neurons the top-k must keep
    granularity: int = 128  # k is a multiple of this (kernel tile), or the full width
    objective: CalibrateObjective = CalibrateObjective.recall
    # Decode batches per batch size: enough to draw every held-out row about once, within these bounds.
    batches: int = 128
    max_batches: int = 4096
    check_fraction: float = 0.25  # share of the routers' held-out sequences kept back to check the k
    weight_bytes: int = 2  # bytes per MLP weight for the reported bytes per step (fp16/bf16: 2)
    layers: Optional[list[int]] = None  # null: every MLP router in the bundle
    # objective=latency: sparse MLP latency may be at most this fraction of the dense MLP's, per batch
    # size; latencies measured on the GPU at calibration time, or read from cost_table (CSV) without one.
    latency_budget: float = 0.5
    cost_table: Optional[str] = None

    def __post_init__(self) -> None:
        if not 0.0 < self.latency_budget <= 1.0:
            raise ValueError(f"calibrate.latency_budget={self.latency_budget} must be in (0, 1]")
        if self.cost_table is not None:
            from polar_sparsity.sparsity.cost_table import read_cost_table  # noqa: PLC0415

            read_cost_table(self.cost_table)  # exists and has the needed columns
        check_calibration(
            self.batch_sizes,
            self.target_recall,
            self.granularity,
            self.batches,
            self.check_fraction,
            self.weight_bytes,
            self.max_batches,
        )


@dataclass
class CalibrateRunConfig:
    """Primary config of ``calibrate.py``: per-layer MLP top-k per batch size, stored with the bundle."""

    task_name: str = "calibrate"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)
    logger: Any = None
    device: str = "auto"  # where the routers score the held-out rows
    seed: int = 0  # which held-out sequences check the fit, and the random batches
