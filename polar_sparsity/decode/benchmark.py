"""End-to-end decode throughput: dense vs sparse in the same engine, HF static cache, bytes bound.

``python -m polar_sparsity.decode.benchmark [--setting NAME ...] [--out DIR]`` on a CUDA GPU.

Each case builds the decoding engine with random weights at a model's real layer shapes (fewer
layers where the whole model and its KV cache do not fit: the CSV says how many ran), random routers
of the paper's shapes, a synthetic KV cache at the given context, and times one decode step of the
whole batch by CUDA-graph replay (median of many replays after warm-up). Reported per case:

- tokens/s and step latency for the dense and the sparse engine, and their ratio;
- the Hugging Face model at the same shapes with a static KV cache (eager; ``--hf-compile`` adds a
  ``torch.compile`` run): a strong dense baseline;
- the bytes bound: the bytes one step must read (weights, the KV cache it attends over, routers;
  for sparse, only the selected rows / heads) over the read bandwidth measured in the same run;
- prefill time for the batch at the case's context (dense, SDPA), timed separately;
- a per-component breakdown of one decode step (attention, MLP, QKV + output projections, routers,
  the rest) like the paper's Figure 1a.

Writes ``decode_bench.csv``, ``decode_bench.png`` and ``decode_bench_meta.json`` (GPU, versions,
bandwidth, date) into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

CONF_MODELS = Path(__file__).resolve().parents[2] / "conf" / "model"
ROUTER_RANK = 1024  # the paper's low-rank MLP router: d -> 1024 -> neurons
MEMORY_SHARE = 0.8  # of the free GPU memory one engine (weights + KV cache + routers) may take


@dataclass(frozen=True)
class Case:
    """One measured point: a model's layer shapes at a batch size and context, and what is sparse."""

    setting: str
    model: str
    batch_size: int
    context: int
    attn_topk: float  # heads (KV groups for GQA) kept per sequence in sparse layers
    mlp_density: float | None  # ReLU MLPs: neurons kept (shared by the batch); None: MLP dense
    target: float | None = None  # the speed-up the issue asks for, where it names one


def _cases(setting: str, model: str, batches, contexts, attn_topk, mlp_density, target=None) -> list[Case]:
    return [Case(setting, model, b, n, attn_topk, mlp_density, target) for b in batches for n in contexts]


SETTINGS: dict[str, list[Case]] = {
    # The paper's headline (A100): OPT-66B, context 1920, batch 64, 30% heads; MLP at the batch-64
    # density (0.5 until a calibration table for OPT-66B exists).
    "opt-66b": _cases("opt-66b", "opt-66b", [64], [1920], 0.3, 0.5, 2.2),
    "llama-2-7b": _cases("llama-2-7b", "llama-2-7b", [256], [4096], 0.5, None, 1.8),
    "llama-3.1-8b": _cases("llama-3.1-8b", "llama-3.1-8b", [64], [8192], 0.5, None, 1.5),
    # tokens/s vs batch size and vs context (the plots).
    "batch-sweep": _cases("batch-sweep", "llama-2-7b", [1, 8, 32, 64, 128, 256], [2048], 0.5, None),
    "context-sweep": _cases("context-sweep", "llama-3.1-8b", [64], [512, 1024, 2048, 4096, 8192], 0.5, None),
}
DEFAULT_SETTINGS = ("opt-66b", "llama-2-7b", "llama-3.1-8b", "batch-sweep", "context-sweep")


def model_architecture(model: str) -> tuple[str, dict[str, Any]]:
    """(family, architecture) of ``conf/model/<model>.yaml`` or of a YAML file given by path."""
    import yaml

    path = Path(model) if model.endswith((".yaml", ".yml")) else CONF_MODELS / f"{model}.yaml"
    if not path.is_file():
        valid = sorted(p.stem for p in CONF_MODELS.glob("*.yaml"))
        raise ValueError(f"model {model!r}: no {path}; valid names: {valid}")
    spec = yaml.safe_load(path.read_text())
    return spec["family"], dict(spec["architecture"])


def hf_config_for(case: Case, num_layers: int):
    from polar_sparsity.models.families import build_hf_config

    family, arch = model_architecture(case.model)
    arch["num_layers"] = num_layers
    return build_hf_config(family, arch)


@dataclass(frozen=True)
class StepBytes:
    """Bytes one decode step reads: weights, KV cache and routers (the bytes bound's numerator)."""

    weights: float
    kv: float
    routers: float

    @property
    def total(self) -> float:
        return self.weights + self.kv + self.routers


def step_bytes(geometry, case: Case, num_layers: int, sparse: bool, dense_attn_layers=(0,)) -> StepBytes:
    """What a step must read at least; sparse counts only the kept heads / neurons and adds routers."""
    from polar_sparsity.models.families import MlpKind
    from polar_sparsity.sparsity.selection import num_kept

    g, elem = geometry, 2  # fp16
    d, hd = g.hidden_size, g.head_dim
    attn_w = d * g.num_heads * hd * 2 + d * g.num_kv_heads * hd * 2  # q, o + k, v
    mlp_mats = 2 if g.mlp_kind == MlpKind.relu else 3
    kv_layer = case.batch_size * case.context * 2 * g.num_kv_heads * hd
    weights = kv = routers = 0.0
    for layer in range(num_layers):
        sparse_attn = sparse and layer not in dense_attn_layers
        kept = num_kept(case.attn_topk, g.num_kv_heads) / g.num_kv_heads if sparse_attn else 1.0
        kv += kv_layer * kept
        routers += d * g.num_kv_heads if sparse_attn else 0
        neurons = g.ffn_dim
        if sparse and case.mlp_density is not None and g.mlp_kind == MlpKind.relu:
            neurons = num_kept(case.mlp_density, g.ffn_dim)
            routers += d * ROUTER_RANK + ROUTER_RANK * g.ffn_dim
        weights += attn_w + mlp_mats * d * neurons
    weights += g.vocab_size * d  # the LM head
    return StepBytes(weights * elem, kv * elem, routers * elem)


def layers_that_fit(geometry, case: Case, free_bytes: int) -> int:
    """How many of the model's layers one engine (sparse: with routers) can hold at this batch/context."""
    one = step_bytes(geometry, case, 1, sparse=True, dense_attn_layers=())
    dense_one = step_bytes(geometry, case, 1, sparse=False)
    per_layer = (
        dense_one.weights - geometry.vocab_size * geometry.hidden_size * 2 + dense_one.kv + one.routers
    )
    fixed = 2 * geometry.vocab_size * geometry.hidden_size * 2  # embedding + LM head
    budget = free_bytes * MEMORY_SHARE - fixed
    if budget < per_layer:
        raise ValueError(
            f"{case.model} at batch {case.batch_size}, context {case.context} needs "
            f"{(per_layer + fixed) / 2**30:.1f} GiB for one layer; {free_bytes / 2**30:.1f} GiB are free"
        )
    return min(geometry.num_layers, int(budget // per_layer))


def time_steps(step: Callable[[], object], warmup: int = 5, reps: int = 40) -> float:
    """Median seconds per call of ``step`` (CUDA events around each call, after warm-up)."""
    from polar_sparsity.kernels._tuning import event_median_us

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    return event_median_us(step, reps) * 1e-6


def time_hf_static(hf_config, case: Case, compile_model: bool) -> float:
    """Seconds per decode step of the Hugging Face model with a static KV cache at this context.

    The static cache is attended over its whole length with a mask (how Hugging Face decodes with
    it), so its contents need not come from a prefill: one token initialises it, then steps at
    position ``context`` are timed.
    """
    from transformers import AutoModelForCausalLM, StaticCache

    from polar_sparsity.models.loading import cache_argument

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float16).eval()
    cache = StaticCache(config=hf_config, max_cache_len=case.context + 1)
    tokens = torch.randint(hf_config.vocab_size, (case.batch_size, 1), device="cuda")
    position = torch.tensor([case.context], device="cuda")
    forward = (
        torch.compile(model.forward, mode="reduce-overhead", fullgraph=False)
        if compile_model
        else model.forward
    )
    kv = {cache_argument(model): cache}
    with torch.no_grad():
        model(input_ids=tokens, **kv, use_cache=True, cache_position=position - case.context)
        step = partial(forward, input_ids=tokens, **kv, use_cache=True, cache_position=position)
        seconds = time_steps(step, warmup=6 if compile_model else 3, reps=20)
    del model, cache, forward, step
    torch.cuda.empty_cache()
    return seconds


def random_plan(geometry, case: Case, sparse: bool, device: torch.device, dtype: torch.dtype):
    """A decode plan with random routers of the paper's shapes (timing does not depend on their skill)."""
    from polar_sparsity.decode import DecodePlan
    from polar_sparsity.models.families import MlpKind
    from polar_sparsity.routers.bundle import LoadedRouter
    from polar_sparsity.routers.nets import HeadRouter, MlpRouter

    if not sparse:
        return DecodePlan(mode="dense")
    sparse_mlp = case.mlp_density is not None and geometry.mlp_kind == MlpKind.relu

    def router(layer: int, make: Callable[[], torch.nn.Module], units: int) -> LoadedRouter:
        with torch.device(device):  # made where it runs: no host copy of large MLP routers
            net = make().to(dtype).eval()
        return LoadedRouter(layer=layer, net=net, meta={"num_outputs": units})

    d, units, ffn = geometry.hidden_size, geometry.num_kv_heads, geometry.ffn_dim
    layers = range(geometry.num_layers)
    head = {layer: router(layer, lambda: HeadRouter(d, units), units) for layer in layers if layer != 0}
    mlp = (
        {layer: router(layer, lambda: MlpRouter(d, ffn, ROUTER_RANK), ffn) for layer in layers}
        if sparse_mlp
        else {}
    )
    return DecodePlan(
        mode="sparse",
        attn_topk=case.attn_topk,
        head_routers=head,
        mlp_routers=mlp,
        mlp_topk=case.mlp_density if sparse_mlp else None,
    )


def component_times(engine, batch: int) -> dict[str, float]:
    """Seconds per decode step spent in each component, every layer included (each timed alone).

    Inputs are the engine's own tensors at the step's shapes; each component runs for all layers in
    one CUDA graph (the harness rotates nothing here: the weights of all layers exceed L2 anyway).
    """
    import torch.nn.functional as F

    from polar_sparsity.decode.plan import head_indices, neuron_indices
    from polar_sparsity.kernels.bench._harness import time_graph

    model, cache, plan = engine.model, engine.cache, engine.plan
    g = model.geometry
    x = torch.randn(batch, g.hidden_size, device=engine.device, dtype=engine.dtype) * 0.1
    seqlens = cache.lengths[:batch].clone()
    layers = list(model.layers)
    q = torch.randn(batch, g.num_heads, g.head_dim, device=engine.device, dtype=engine.dtype)
    head_idx = {
        layer.layer: head_indices(plan.head_routers[layer.layer], x, model.attn_keep)
        for layer in layers
        if layer.layer in model.sparse_attn
    }
    neuron_idx = {
        layer.layer: neuron_indices(
            plan.mlp_routers[layer.layer], x, plan.neurons_kept(layer.layer, batch, g)
        )
        for layer in layers
        if layer.layer in model.sparse_mlp
    }
    attn_out = torch.randn(batch, g.num_heads * g.head_dim, device=engine.device, dtype=engine.dtype)

    def projections() -> None:
        for layer in layers:
            F.linear(x, layer.w_qkv, layer.b_qkv)
            F.linear(attn_out, layer.w_o, layer.b_o)

    def attention() -> None:
        for layer in layers:
            k_cache, v_cache = cache.layer(layer.layer, batch)
            model.ops.attention(q, k_cache, v_cache, seqlens, head_idx.get(layer.layer))

    def mlp() -> None:
        for layer in layers:
            idx = neuron_idx.get(layer.layer)
            layer.mlp_dense(x) if idx is None else model._mlp_sparse(layer, x, idx)

    def routers() -> None:
        for layer in layers:
            if layer.layer in head_idx:
                head_indices(plan.head_routers[layer.layer], x, model.attn_keep)
            if layer.layer in neuron_idx:
                neuron_indices(plan.mlp_routers[layer.layer], x, len(neuron_idx[layer.layer]))

    parts = {"attention": attention, "mlp": mlp, "qkv+o projections": projections}
    if head_idx or neuron_idx:
        parts["routers"] = routers
    with torch.no_grad():
        return {name: time_graph([fn]) * 1e-6 for name, fn in parts.items()}


WARMUP, REPS = 5, 40


def build_engine(case: Case, num_layers: int, sparse: bool):
    """A random-weight engine with ``num_layers`` of the model's layers and a synthetic context."""
    from polar_sparsity.decode import DecodeEngine

    hf_config = hf_config_for(case, num_layers)
    geometry = model_geometry(case, num_layers)
    plan = random_plan(geometry, case, sparse, torch.device("cuda"), torch.float16)
    engine = DecodeEngine.random(
        hf_config,
        plan,
        dtype=torch.float16,
        device="cuda",
        max_batch_size=case.batch_size,
        max_seq_len=case.context + WARMUP + REPS + 8,
    )
    engine.set_synthetic_context(case.batch_size, case.context)
    return engine


def time_engine(engine, case: Case) -> float:
    """Median seconds per decode step of the whole batch (CUDA-graph replay when the engine has it)."""
    tokens = torch.randint(engine.spec.geometry.vocab_size, (case.batch_size,), device="cuda")
    return time_steps(lambda: engine.decode_one_token(tokens), WARMUP, REPS)


def model_geometry(case: Case, num_layers: int | None = None):
    from polar_sparsity.models.families import build_hf_config, family_for_config

    family, arch = model_architecture(case.model)
    config = build_hf_config(family, arch)
    geometry = family_for_config(config).geometry(config)
    return geometry if num_layers is None else replace(geometry, num_layers=num_layers)


def projected_full_depth(case: Case, layers: int, step: float, total_layers: int, sparse: bool) -> float:
    """Step seconds at the model's full depth, from a second run at half the layers.

    Time grows linearly in the layers past the first (layer 0 is dense in both engines, the LM head is
    paid once): two depths give the per-layer cost and the fixed part, measured, not modelled.
    """
    fewer = max(2, layers // 2)
    engine = build_engine(case, fewer, sparse)
    try:
        step_fewer = time_engine(engine, case)
    finally:
        del engine
        torch.cuda.empty_cache()
    per_layer = (step - step_fewer) / (layers - fewer)
    return step + per_layer * (total_layers - layers)


def measure(case: Case, bandwidth: float, max_layers: int | None, hf_compile: bool) -> list[dict]:
    """Dense, sparse and Hugging Face rows for one case (the bytes bound and breakdown in each)."""
    full = model_geometry(case)
    free, _ = torch.cuda.mem_get_info()
    layers = min(max_layers or full.num_layers, layers_that_fit(full, case, free))
    geometry = replace(full, num_layers=layers)
    base = {**asdict(case), "layers_run": layers, "layers_total": full.num_layers}
    rows, dense = [], {}
    for sparse in (False, True):
        engine = build_engine(case, layers, sparse)
        step = time_engine(engine, case)
        components = component_times(engine, case.batch_size)
        prefill = None if sparse else _prefill_rate(engine, case)
        del engine
        torch.cuda.empty_cache()
        bound = step_bytes(geometry, case, layers, sparse).total / bandwidth
        row = {
            **base,
            "method": "sparse" if sparse else "dense",
            "step_ms": step * 1e3,
            "tokens_per_s": case.batch_size / step,
            "bound_ms": bound * 1e3,
            "bound_fraction": bound / step,
            "speedup_vs_dense": dense.get("step", step) / step,
            **{f"{name}_ms": seconds * 1e3 for name, seconds in components.items()},
            "rest_ms": (step - sum(components.values())) * 1e3,
        }
        if prefill is not None:
            row["prefill_tokens_per_s"] = prefill
        if layers < full.num_layers and layers >= 3:
            projected = projected_full_depth(case, layers, step, full.num_layers, sparse)
            full_bound = step_bytes(full, case, full.num_layers, sparse).total / bandwidth
            row["full_depth_step_ms"] = projected * 1e3
            row["full_depth_bound_ms"] = full_bound * 1e3
            if sparse:
                row["full_depth_speedup"] = dense["projected"] / projected
            dense.setdefault("projected", projected)
        dense.setdefault("step", step)
        rows.append(row)
    for compiled in (False, True) if hf_compile else (False,):
        name = "hf static cache" + (" (compiled)" if compiled else "")
        try:
            step = time_hf_static(hf_config_for(case, layers), case, compiled)
        except Exception as error:  # noqa: BLE001 - a baseline that cannot run here is a recorded result
            rows.append({**base, "method": name, "note": f"{type(error).__name__}: {error}"[:200]})
            torch.cuda.empty_cache()
            continue
        rows.append(
            {
                **base,
                "method": name,
                "step_ms": step * 1e3,
                "tokens_per_s": case.batch_size / step,
                "speedup_vs_dense": dense["step"] / step,
            }
        )
    return rows


def _prefill_rate(engine, case: Case) -> float:
    """Dense prefill tokens/s at the case's context, for as many sequences as 64k tokens allow."""
    batch = max(1, min(case.batch_size, 65536 // case.context))
    ids = torch.randint(engine.spec.geometry.vocab_size, (batch, case.context), device="cuda")
    lengths = torch.full((batch,), case.context, dtype=torch.int32, device="cuda")
    seconds = time_steps(lambda: engine.prefill(ids, lengths), warmup=1, reps=3)
    return batch * case.context / seconds


def environment(bandwidth: float) -> dict[str, Any]:
    import transformers
    import triton

    props = torch.cuda.get_device_properties(0)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": props.name,
        "sms": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "read_bandwidth_tb_s": round(bandwidth / 1e12, 3),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "dtype": "float16",
    }


def summary_table(rows: list[dict]) -> str:
    """One line per (case, method): what a person reads first."""
    header = (
        f"{'setting':<14} {'model':<13} {'L':>5} {'B':>4} {'ctx':>5} {'method':<26} {'step ms':>8} "
        f"{'tok/s':>9} {'bound ms':>8} {'of bound':>8} {'vs dense':>8} {'full':>6} {'target':>6}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        if "step_ms" not in r:
            lines.append(f"{r['setting']:<14} {r['model']:<13} {r['method']:<26} failed: {r.get('note', '')}")
            continue
        bound = f"{r['bound_ms']:8.2f} {r['bound_fraction']:8.2f}" if "bound_ms" in r else f"{'':8} {'':8}"
        target = f"{r['target']:.2f}" if r.get("target") and r["method"] == "sparse" else ""
        full = f"{r['full_depth_speedup']:.2f}" if "full_depth_speedup" in r else ""
        lines.append(
            f"{r['setting']:<14} {r['model']:<13} {r['layers_run']:>2}/{r['layers_total']:<2} "
            f"{r['batch_size']:>4} {r['context']:>5} {r['method']:<26} {r['step_ms']:8.2f} "
            f"{r['tokens_per_s']:9.0f} {bound} {r['speedup_vs_dense']:8.2f} {full:>6} {target:>6}"
        )
    return "\n".join(lines)


def plot(path: Path, rows: list[dict], env: dict[str, Any]) -> None:
    """tokens/s vs batch size and vs context (dense, sparse, HF, bytes bound), and step breakdowns."""
    from polar_sparsity.reporting import save_figure, subplots

    fig, grid = subplots(1, 3, figsize=(18, 5))
    axes = grid[0]
    for ax, setting, axis in ((axes[0], "batch-sweep", "batch_size"), (axes[1], "context-sweep", "context")):
        sub = [r for r in rows if r["setting"] == setting and "step_ms" in r]
        for method in dict.fromkeys(r["method"] for r in sub):
            pts = sorted((r[axis], r["tokens_per_s"]) for r in sub if r["method"] == method)
            ax.plot(*zip(*pts, strict=True), marker="o", label=method)
            bound = sorted(
                (r[axis], r["batch_size"] / (r["bound_ms"] * 1e-3))
                for r in sub
                if r["method"] == method and "bound_ms" in r
            )
            if bound:
                ax.plot(
                    *zip(*bound, strict=True),
                    ":",
                    color=ax.lines[-1].get_color(),
                    label=f"{method} bytes bound",
                )
        if sub:
            depths = sorted({r["layers_run"] for r in sub})
            layers = f"{depths[0]}" if len(depths) == 1 else f"{depths[0]}-{depths[-1]} (as many as fit)"
            ax.set_title(
                f"{setting}: {sub[0]['model']}, {layers} of {sub[0]['layers_total']} layers", fontsize=9
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(axis.replace("_", " "))
        ax.set_ylabel("generated tokens/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    parts = ("attention_ms", "mlp_ms", "qkv+o projections_ms", "routers_ms", "rest_ms")
    bars = [
        r
        for r in rows
        if r["method"] in ("dense", "sparse") and r["setting"] in ("opt-66b", "llama-2-7b", "llama-3.1-8b")
    ]
    bottom = [0.0] * len(bars)
    for part in parts:
        values = [max(r.get(part, 0.0), 0.0) for r in bars]
        axes[2].bar(range(len(bars)), values, bottom=bottom, label=part.removesuffix("_ms"))
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    axes[2].set_xticks(range(len(bars)), [f"{r['setting']}\n{r['method']}" for r in bars], fontsize=7)
    axes[2].set_ylabel("ms per decode step")
    axes[2].set_title("decode step breakdown", fontsize=9)
    axes[2].legend(fontsize=7)
    save_figure(
        fig, path, f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, fp16, {env['date'][:10]}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--setting", action="append", choices=sorted(SETTINGS), help="repeatable; default: all"
    )
    parser.add_argument(
        "--max-layers", type=int, default=None, help="cap the layers per model (default: as many as fit)"
    )
    parser.add_argument(
        "--hf-compile", action="store_true", help="also time torch.compile'd Hugging Face decoding"
    )
    parser.add_argument("--out", type=Path, default=Path("artifacts/decode_bench"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the decode benchmark needs a CUDA GPU (CUDA graphs and the Triton kernels)")
    if args.max_layers is not None and args.max_layers < 1:
        raise SystemExit(f"--max-layers={args.max_layers} must be >= 1")
    from tqdm.auto import tqdm

    from polar_sparsity.kernels.bench._harness import read_bandwidth
    from polar_sparsity.reporting import write_csv, write_json_atomic

    cases = [case for name in (args.setting or DEFAULT_SETTINGS) for case in SETTINGS[name]]
    bandwidth = read_bandwidth()
    env = environment(bandwidth)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "decode_bench_meta.json", {**env, "cases": [asdict(c) for c in cases]})
    rows: list[dict] = []
    for case in tqdm(cases, desc="decode benchmark"):
        rows += measure(case, bandwidth, args.max_layers, args.hf_compile)
        write_csv(args.out / "decode_bench.csv", rows)  # each case lands as soon as it is done
    plot(args.out / "decode_bench.png", rows, env)
    versions = f"torch {env['torch']}, triton {env['triton']}"
    print(f"{env['gpu']}: read bandwidth {env['read_bandwidth_tb_s']} TB/s, {versions}")
    print(summary_table(rows))


if __name__ == "__main__":
    main()
