"""Model shapes and densities of the benchmarks: the paper's tables (the one registry) and user shapes.

A benchmark run is a list of :class:`Case` (one model shape at one batch size and, for attention, one
context length) each with the density points to sweep. By default the cases are the paper's tables
(:data:`PAPER_MODELS`, :data:`PAPER_CASES`); a user's shapes come from a project model config
(``conf/model/<name>.yaml``, key ``architecture``), a checkpoint's Hugging Face ``config.json``, or
explicit dimensions (see ``cli.py``). Everything here is plain Python: no GPU, no Triton launch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

import yaml

ELEMENT_BYTES = 2  # the benchmarks run in fp16
SELECTIVE = "selective (ours)"  # the method column of our selective op's rows, in every benchmark
# The method of a plain read of the selective op's bytes (``_harness.same_bytes_read_us``).
STREAM_READ = "streaming read, same bytes"
MLP_KINDS = ("relu", "gated")  # relu: sparse neurons (OPT); gated: SwiGLU (Llama, Mistral, Qwen2)
HEAD_DIM_RANGE = (16, 256)  # the attention kernels take any multiple of 8 in this range


class ShapeError(ValueError):
    """A model shape, density or option combination the benchmarks cannot run (raised before any work)."""


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of one decoder layer the kernels see (a field no benchmark uses may be None)."""

    name: str
    hidden: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    ffn: int | None = None
    mlp: str | None = None

    @property
    def gqa(self) -> bool:
        """Grouped-query attention: fewer KV heads than query heads (selection is per KV group)."""
        return self.kv_heads != self.heads

    @property
    def attention_units(self) -> int:
        """What attention sparsity selects: heads for MHA, KV groups (= KV heads) for GQA."""
        return self.kv_heads  # type: ignore[return-value]

    def mlp_label(self) -> str:
        return f"{self.name} d={self.hidden} n={self.ffn} {self.mlp}"

    def attention_label(self, batch: int, context: int) -> str:
        heads = (
            f"{self.heads}q/{self.kv_heads}kv x{self.head_dim}"
            if self.gqa
            else f"{self.heads}x{self.head_dim}"
        )
        return f"{self.name} B={batch} N={context} {heads}"


# Command-line flag of each ModelShape field, for error messages that say what to pass.
FIELD_FLAGS = {
    "hidden": "--hidden",
    "heads": "--heads",
    "kv_heads": "--kv-heads",
    "head_dim": "--head-dim",
    "ffn": "--ffn",
    "mlp": "--mlp",
}


def with_overrides(model: ModelShape, **dims: int | str | None) -> ModelShape:
    """``model`` with the given dimensions replaced (None keeps the model's value); KV heads default to
    the heads and the head dim to hidden / heads, as in Hugging Face configs."""
    shape = replace(model, **{k: v for k, v in dims.items() if v is not None})
    if shape.kv_heads is None and shape.heads is not None:
        shape = replace(shape, kv_heads=shape.heads)
    if shape.head_dim is None and shape.hidden is not None and shape.heads:
        shape = replace(shape, head_dim=shape.hidden // shape.heads)
    return shape


def validate_model(model: ModelShape, needed: Sequence[str]) -> None:
    """Raise :class:`ShapeError` if a dimension a benchmark needs is missing or the shape is inconsistent."""
    missing = [FIELD_FLAGS[f] for f in needed if getattr(model, f) is None]
    if missing:
        raise ShapeError(f"model {model.name!r} lacks {', '.join(missing)}; pass them or use --model")
    for f in fields(ModelShape):
        value = getattr(model, f.name)
        if f.name not in ("name", "mlp") and value is not None and (not isinstance(value, int) or value < 1):
            raise ShapeError(
                f"{FIELD_FLAGS[f.name]} of {model.name!r} is {value!r}; it must be a positive integer"
            )
    if model.mlp is not None and model.mlp not in MLP_KINDS:
        raise ShapeError(f"--mlp {model.mlp!r} of {model.name!r} is not a kind; valid: {list(MLP_KINDS)}")
    if model.heads is not None and model.kv_heads is not None and model.heads % model.kv_heads:
        raise ShapeError(
            f"{model.name!r}: {model.heads} heads are not divisible by {model.kv_heads} KV heads "
            "(each KV head serves the same number of query heads)"
        )
    lo, hi = HEAD_DIM_RANGE
    if model.head_dim is not None and not (lo <= model.head_dim <= hi and model.head_dim % 8 == 0):
        raise ShapeError(
            f"head dim {model.head_dim} of {model.name!r} is not supported; the kernels take a multiple of 8 "
            f"in {lo}..{hi}"
        )


# --- The registry: the paper's model shapes and benchmark tables ------------------------------------

PAPER_MODELS: dict[str, ModelShape] = {
    "opt-66b": ModelShape("opt-66b", hidden=9216, heads=72, kv_heads=72, head_dim=128, ffn=36864, mlp="relu"),
    "llama-2-7b": ModelShape(
        "llama-2-7b", hidden=4096, heads=32, kv_heads=32, head_dim=128, ffn=11008, mlp="gated"
    ),
    "llama-3-8b": ModelShape(
        "llama-3-8b", hidden=4096, heads=32, kv_heads=8, head_dim=128, ffn=14336, mlp="gated"
    ),
    "llama-3-70b": ModelShape(
        "llama-3-70b", hidden=8192, heads=64, kv_heads=8, head_dim=128, ffn=28672, mlp="gated"
    ),
}

BENCHES = ("attn", "gqa", "gemm", "mlp", "block")
ATTENTION_BENCHES = ("attn", "gqa", "block")  # the benchmarks with a KV cache (batch x context)
MLP_BENCHES = ("gemm", "mlp", "block")

# (model, batch sizes, context lengths) per benchmark; context () where the benchmark has no KV cache.
PAPER_CASES: dict[str, tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]] = {
    "attn": (("opt-66b", (64,), (1920,)), ("llama-2-7b", (256,), (4096,))),
    "gqa": (("llama-3-70b", (64,), (8192,)),),
    "gemm": (("opt-66b", (1, 16, 64, 256), ()), ("llama-3-8b", (1, 16, 64, 256), ())),
    "mlp": (("opt-66b", (16, 64), ()), ("llama-3-8b", (16, 64), ())),
    # OPT: heads and neurons both sparse; Llama-3-70B: KV groups sparse, SwiGLU MLP dense (the paper).
    "block": (("opt-66b", (64,), (1920,)), ("llama-3-70b", (64,), (8192,))),
}
MHA_DENSITIES = (0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
MLP_DENSITIES = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
# A user's model outside the tables: these batch sizes and context length unless --batch / --context.
DEFAULT_BATCHES = {"attn": (64,), "gqa": (64,), "gemm": (1, 16, 64, 256), "mlp": (16, 64), "block": (64,)}
DEFAULT_CONTEXTS = (4096,)

NEEDED_FIELDS = {
    "attn": ("heads", "kv_heads", "head_dim"),
    "gqa": ("heads", "kv_heads", "head_dim"),
    "gemm": ("hidden", "ffn", "mlp"),
    "mlp": ("hidden", "ffn", "mlp"),
    "block": ("hidden", "heads", "kv_heads", "head_dim", "ffn", "mlp"),
}


# --- Cases and density points -------------------------------------------------------------------


def kept_units(density: float, units: int) -> int:
    """Units a density point keeps in the benchmarks (at least one)."""
    return max(1, round(density * units))


@dataclass(frozen=True)
class Point:
    """One density point: the plotted density and the unit counts the kernels get."""

    density: float
    heads: int | None = None  # kept attention units: heads (MHA) or KV groups (GQA)
    neurons: int | None = None  # active MLP neurons, shared by the batch


@dataclass(frozen=True)
class Case:
    """One model shape at one batch size (and context length), with its density points."""

    bench: str
    model: ModelShape
    batch: int
    context: int | None
    points: tuple[Point, ...]

    @property
    def label(self) -> str:
        if self.bench in ("attn", "gqa"):
            return self.model.attention_label(self.batch, self.context)  # type: ignore[arg-type]
        if self.bench == "block":
            return f"{self.model.name} B={self.batch} N={self.context}"
        return f"{self.model.mlp_label()} M={self.batch}"


def default_densities(bench: str, model: ModelShape) -> tuple[float, ...]:
    """The paper's density sweep for a benchmark and model: every KV-group count for GQA attention
    (few groups), the MHA list for heads, the MLP list for neurons (and for a ReLU block, both)."""
    attention_sweep = bench in ("attn", "gqa") or (bench == "block" and model.mlp == "gated")
    if attention_sweep and model.gqa:
        return tuple(g / model.kv_heads for g in range(1, model.kv_heads + 1))  # type: ignore[operator]
    if bench in ("attn", "gqa"):
        return MHA_DENSITIES
    return MLP_DENSITIES


def check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise ShapeError(f"density {density} is outside (0, 1]; give the kept fraction, e.g. 0.25")


def _check_counts(
    model: ModelShape, kept_heads: Sequence[int] | None, active_neurons: Sequence[int] | None
) -> None:
    """Counts lie within the model's units; the block's paired head and neuron counts are equally many."""
    if kept_heads is not None:
        units = model.attention_units
        for k in kept_heads:
            if not 1 <= k <= units:
                what = (
                    f"{units} KV groups (for GQA models --kept-heads counts KV groups)"
                    if model.gqa
                    else f"{units} heads"
                )
                raise ShapeError(f"--kept-heads {k} is not in 1..{units}: {model.name!r} has {what}")
    if active_neurons is not None:
        for k in active_neurons:
            if not 1 <= k <= model.ffn:  # type: ignore[operator]
                raise ShapeError(
                    f"--active-neurons {k} is not in 1..{model.ffn}: the FFN of {model.name!r} has "
                    f"{model.ffn} neurons"
                )
    if kept_heads is not None and active_neurons is not None and len(kept_heads) != len(active_neurons):
        raise ShapeError(
            f"the block pairs --kept-heads ({len(kept_heads)} values) with --active-neurons "
            f"({len(active_neurons)} values) point by point; give the same number of each"
        )


def density_points(
    bench: str,
    model: ModelShape,
    densities: Sequence[float] | None = None,
    kept_heads: Sequence[int] | None = None,
    active_neurons: Sequence[int] | None = None,
) -> tuple[Point, ...]:
    """The density points of one benchmark and model, from fractions or from unit counts.

    At most one of ``densities`` and the counts may be given; none gives :func:`default_densities`.
    In the block, head and neuron counts given together pair up point by point; either alone sets the
    other to the same fraction (a SwiGLU block keeps its MLP dense, so it takes no neuron counts).
    """
    if densities is not None and (kept_heads is not None or active_neurons is not None):
        raise ShapeError("give densities either as fractions (--density) or as counts, not both")
    sparse_mlp = bench in ("gemm", "mlp") or (bench == "block" and model.mlp == "relu")
    if bench == "block" and model.mlp == "gated" and active_neurons is not None:
        raise ShapeError(
            f"{model.name!r} has a gated (SwiGLU) MLP, which the block keeps dense (the paper's "
            "attention-only sparsity); drop --active-neurons"
        )
    _check_counts(model, kept_heads, active_neurons)

    attention = bench in ATTENTION_BENCHES
    if kept_heads is not None:
        fractions = [k / model.attention_units for k in kept_heads]
    elif active_neurons is not None:
        fractions = [k / model.ffn for k in active_neurons]  # type: ignore[operator]
    else:
        fractions = list(densities if densities is not None else default_densities(bench, model))
    for d in fractions:
        check_density(d)
    points = []
    for i, d in enumerate(fractions):
        heads = neurons = None
        if attention:
            heads = kept_heads[i] if kept_heads is not None else kept_units(d, model.attention_units)
        if sparse_mlp:
            neurons = active_neurons[i] if active_neurons is not None else kept_units(d, model.ffn)  # type: ignore[arg-type]
        points.append(Point(density=d, heads=heads, neurons=neurons))
    return tuple(points)


def paper_cases(bench: str) -> tuple[tuple[ModelShape, tuple[int, ...], tuple[int, ...]], ...]:
    """The paper's (model shape, batch sizes, context lengths) of one benchmark."""
    return tuple((PAPER_MODELS[name], batches, contexts) for name, batches, contexts in PAPER_CASES[bench])


def check_bench_model(bench: str, model: ModelShape) -> None:
    """The model has what the benchmark needs, and MHA / GQA goes to the matching attention benchmark."""
    validate_model(model, NEEDED_FIELDS[bench])
    if bench == "attn" and model.gqa:
        raise ShapeError(
            f"attn benchmarks MHA (heads == KV heads); {model.name!r} has {model.heads} heads and "
            f"{model.kv_heads} KV heads: use gqa"
        )
    if bench == "gqa" and not model.gqa:
        raise ShapeError(
            f"gqa benchmarks grouped-query attention; {model.name!r} has {model.heads} heads and as many "
            "KV heads: use attn"
        )


def build_cases(
    bench: str,
    model: ModelShape | None = None,
    batches: Sequence[int] | None = None,
    contexts: Sequence[int] | None = None,
    densities: Sequence[float] | None = None,
    kept_heads: Sequence[int] | None = None,
    active_neurons: Sequence[int] | None = None,
) -> list[Case]:
    """The cases of one benchmark: the paper's tables, or ``model``; lists given replace the defaults.

    Raises :class:`ShapeError` (naming the bad value and what is valid) before anything is allocated.
    """
    if bench not in BENCHES:
        raise ShapeError(f"unknown benchmark {bench!r}; valid: {list(BENCHES)}")
    for name, values in (("--batch", batches), ("--context", contexts)):
        if values is not None and (not values or any(v < 1 for v in values)):
            raise ShapeError(f"{name} {list(values)} must list positive integers")
    if contexts is not None and bench not in ATTENTION_BENCHES:
        raise ShapeError(
            f"{bench} has no KV cache, so no context length; --context is for {list(ATTENTION_BENCHES)}"
        )
    if kept_heads is not None and bench not in ATTENTION_BENCHES:
        raise ShapeError(f"{bench} has no attention; --kept-heads is for {list(ATTENTION_BENCHES)}")
    if active_neurons is not None and bench not in MLP_BENCHES:
        raise ShapeError(f"{bench} has no MLP; --active-neurons is for {list(MLP_BENCHES)}")
    if model is None:
        plan = paper_cases(bench)
    else:
        default_contexts = DEFAULT_CONTEXTS if bench in ATTENTION_BENCHES else ()
        plan = ((model, DEFAULT_BATCHES[bench], default_contexts),)
    cases = []
    for shape, paper_batches, paper_contexts in plan:
        check_bench_model(bench, shape)
        points = density_points(bench, shape, densities, kept_heads, active_neurons)
        ctx_list: Sequence[int | None] = (
            (contexts or paper_contexts) if bench in ATTENTION_BENCHES else (None,)
        )
        for batch in batches or paper_batches:
            for context in ctx_list:
                cases.append(Case(bench, shape, batch, context, points))
    return cases


# --- Reading a model's shape from a project config or a checkpoint ------------------------------------

HF_GATED_TYPES = ("llama", "mistral", "qwen2")  # model_type values with a SwiGLU MLP


def model_from_architecture(name: str, arch: dict) -> ModelShape:
    """A shape from a project model config's ``architecture`` block (``conf/model/*.yaml``)."""
    activation = arch.get("activation")
    kinds = {"relu": "relu", "silu": "gated", "swish": "gated"}
    if activation not in kinds:
        raise ShapeError(
            f"{name}: architecture.activation {activation!r} is not supported; valid: {sorted(kinds)}"
        )
    try:
        return with_overrides(
            ModelShape(name),
            hidden=arch["hidden_size"],
            heads=arch["num_heads"],
            kv_heads=arch.get("num_kv_heads"),
            head_dim=arch.get("head_dim"),
            ffn=arch["ffn_dim"],
            mlp=kinds[activation],
        )
    except KeyError as exc:
        raise ShapeError(f"{name}: the architecture block lacks {exc.args[0]!r}") from None


def model_from_hf_config(name: str, config: dict) -> ModelShape:
    """A shape from a Hugging Face ``config.json`` (model types opt, llama, mistral, qwen2)."""
    model_type = config.get("model_type")
    try:
        if model_type == "opt":
            if config.get("activation_function", "relu") != "relu":
                raise ShapeError(
                    f"{name}: OPT activation {config['activation_function']!r} is not supported; "
                    "valid: ['relu']"
                )
            return with_overrides(
                ModelShape(name),
                hidden=config["hidden_size"],
                heads=config["num_attention_heads"],
                ffn=config["ffn_dim"],
                mlp="relu",
            )
        if model_type in HF_GATED_TYPES:
            if config.get("hidden_act", "silu") not in ("silu", "swish"):
                raise ShapeError(
                    f"{name}: gated MLP activation {config['hidden_act']!r} is not supported; valid: ['silu']"
                )
            return with_overrides(
                ModelShape(name),
                hidden=config["hidden_size"],
                heads=config["num_attention_heads"],
                kv_heads=config.get("num_key_value_heads"),
                head_dim=config.get("head_dim"),
                ffn=config["intermediate_size"],
                mlp="gated",
            )
    except KeyError as exc:
        raise ShapeError(f"{name}: config.json lacks {exc.args[0]!r}") from None
    raise ShapeError(f"{name}: model_type {model_type!r} is not supported; valid: {['opt', *HF_GATED_TYPES]}")


def model_config_dirs(cwd: Path | None = None) -> list[Path]:
    """Where ``--model NAME`` is looked up: ``conf/model`` under the current directory, then the
    source checkout this package was installed from (absent in an installed wheel)."""
    here = (cwd or Path.cwd()) / "conf" / "model"
    checkout = Path(__file__).resolve().parents[2] / "conf" / "model"
    return list(dict.fromkeys(p for p in (here, checkout) if p.is_dir()))


def load_model(spec: str, cwd: Path | None = None) -> ModelShape:
    """The shape named by ``--model``: a project config name, a YAML path, or a checkpoint directory."""
    path = Path(spec)
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise ShapeError(f"--model {spec}: the directory has no config.json")
        return model_from_hf_config(path.resolve().name, json.loads(config.read_text()))
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ShapeError(f"--model {spec}: no such file")
        return _model_from_yaml(path)
    dirs = model_config_dirs(cwd)
    for d in dirs:
        if (d / f"{spec}.yaml").is_file():
            return _model_from_yaml(d / f"{spec}.yaml")
    names = sorted({p.stem for d in dirs for p in d.glob("*.yaml")})
    raise ShapeError(
        f"--model {spec!r} is not a model config, a .yaml file or a checkpoint directory; "
        f"configs found in {[str(d) for d in dirs] or 'no conf/model directory'}: {names}"
    )


def _model_from_yaml(path: Path) -> ModelShape:
    doc = yaml.safe_load(path.read_text()) or {}
    arch = doc.get("architecture")
    if not isinstance(arch, dict):
        raise ShapeError(f"{path}: no 'architecture' block (see conf/model/*.yaml)")
    return model_from_architecture(doc.get("name") or path.stem, arch)
