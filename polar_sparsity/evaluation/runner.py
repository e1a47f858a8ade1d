"""evaluate: how much accuracy and perplexity a sparsity mode costs on a model, against dense.

Order of work: everything that can be wrong with the inputs (tasks, router bundle, layers, top-k,
positions) is checked before the model loads; then the dense baseline (cached per model, weights,
tasks and data); then the sparse evaluation with the masking hooks; then the outputs (results JSON,
comparison table, sweep CSV row, logger).
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger

from polar_sparsity import runs
from polar_sparsity.collect.checks import check_seq_len
from polar_sparsity.evaluation.harness import TaskSet, local_tasks_dir, resolve_tasks, run_harness
from polar_sparsity.evaluation.perplexity import perplexity
from polar_sparsity.evaluation.results import (
    SWEEP_CSV,
    append_row,
    cache_file,
    comparison_rows,
    file_digest,
    files_digest,
    flat_metrics,
    package_versions,
    read_cache,
    read_csv_rows,
    write_cache,
)
from polar_sparsity.evaluation.sweep import SWEEP_PNG, plot_sweep
from polar_sparsity.models.families import ModelGeometry, family_for_config
from polar_sparsity.models.loading import LoadedModel, load_hf_config, load_model, resolve_device
from polar_sparsity.reporting import format_table, write_json_atomic
from polar_sparsity.schema import (
    EvaluateRunConfig,
    Mode,
    ModelConfig,
    RouterKind,
    SparsityConfig,
    Weights,
    parse_positions,
)
from polar_sparsity.sparsity.budget import attn_fraction, k_of_n
from polar_sparsity.sparsity.masking import SparsityPlan, apply_sparsity, check_plan
from polar_sparsity.tracking import log_image, log_table

log = logging.getLogger(__name__)

RESULTS_FILE = "eval_results.json"
_NUMERIC_PACKAGES = ("lm_eval", "transformers", "torch")  # their versions can change dense numbers


def run_evaluate(settings: EvaluateRunConfig, resolved_config: dict[str, Any], logger: Logger | None = None):
    """Evaluate ``settings.mode`` against dense; returns the results payload (also written as JSON)."""
    started = time.perf_counter()
    out_dir, sweep_dir = run_dirs(settings)
    tasks = resolve_tasks(settings.eval.tasks) if settings.eval.tasks else None
    hf_config = load_hf_config(settings.model)
    if settings.eval.perplexity.enabled:
        check_seq_len(settings.eval.perplexity.seq_len, hf_config, "eval.perplexity.seq_len")
    geometry = family_for_config(hf_config).geometry(hf_config)
    plan, bundle = build_plan(settings, geometry)
    key = dense_key(settings, tasks)
    cache_path = cache_file(settings.eval.cache_dir, settings.model.name, key)

    loaded = load_model(settings.model, settings.device, settings.seed)
    log.info("weights: %s; tokenizer: %s", loaded.weights_source, loaded.tokenizer_source)
    dense, dense_source = _dense_results(loaded, settings, tasks, cache_path, key)
    # mode=dense compares dense with itself: the table shows the baseline and zero deltas.
    sparse = dense if settings.mode == Mode.dense else evaluate_model(loaded, settings, tasks, plan)
    label = settings.mode.value
    rows = comparison_rows(dense, sparse, label)
    payload = {
        "mode": label,
        "model": settings.model.name,
        "weights_source": loaded.weights_source,
        "tokenizer_source": loaded.tokenizer_source,
        "data": settings.data.name,
        "sparsity": _sparsity_summary(settings, plan, geometry),
        "results": sparse,
        "dense": dense | {"source": dense_source},
        "comparison": rows,
        "router_bundle": bundle,
        "config": resolved_config,
        "versions": package_versions(),
        "seconds": round(time.perf_counter() - started, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    results_path = write_json_atomic(out_dir / RESULTS_FILE, payload)
    sweep_row = _sweep_row(settings, payload, dense, sparse, out_dir)
    csv_path = append_row(sweep_dir / SWEEP_CSV, sweep_row)
    # The sweep plot so far (one point in a single run); the multirun callback redraws it at the end.
    png = plot_sweep(read_csv_rows(csv_path), sweep_dir / SWEEP_PNG, f"evaluate {sweep_dir.name}")
    print(format_table(rows, title=_title(settings, plan, geometry)))
    print(f"results: {results_path}\nsweep table: {csv_path}\nplot: {png}\ndense baseline: {dense_source}")
    print(f"evaluate took {payload['seconds']:.1f}s")
    _log(logger, rows, sweep_row, png)
    return payload


def run_dirs(settings: EvaluateRunConfig) -> tuple[Path, Path]:
    """(run dir, sweep dir): from the config when given, else Hydra's job and sweep dirs."""
    out_dir = settings.output_dir or runs.job_output_dir()
    if out_dir is None:
        raise ValueError("output_dir is not set and no Hydra run is active: set output_dir=<dir>")
    return Path(out_dir), Path(settings.sweep_dir or runs.sweep_dir() or out_dir)


# --- plan: routers and checks, before any model loads ---------------------------------------------


def build_plan(settings: EvaluateRunConfig, geometry: ModelGeometry) -> tuple[SparsityPlan, dict | None]:
    """The masking plan, with the bundle's routers for mode=sparse; fails on anything missing."""
    sp = settings.sparsity
    plan = SparsityPlan(
        mode=settings.mode,
        attn_topk=attn_fraction(sp, geometry),
        mlp_topk=sp.mlp_topk,
        mlp_batch_size=sp.mlp_batch_size,
        dense_attn_layers=frozenset(sp.dense_layers(geometry.num_layers)),
        last_n=parse_positions(sp.positions),
        seed=settings.seed,
    )
    check_plan(plan, geometry, routers=False)  # layer ranges and MLP kind, before touching the bundle
    _warn_if_dense(settings, plan, geometry)
    _warn_unapplied(settings, plan, geometry)
    bundle = None
    if settings.mode == Mode.sparse:
        calibration = _calibrated_keep(settings, plan, geometry) if sp.mlp_batch_size is not None else None
        plan.head_routers, plan.mlp_routers, bundle = _load_bundle(settings, plan, geometry)
        check_plan(plan, geometry)
        if calibration is not None:
            _check_calibrated_routers(calibration, bundle)
            bundle = (bundle or {"path": str(Path(settings.paths.routers).resolve())}) | {
                "calibration": calibration
            }
    return plan, bundle


def _calibrated_keep(settings: EvaluateRunConfig, plan: SparsityPlan, geometry: ModelGeometry) -> dict:
    """Set ``plan.mlp_keep`` to the bundle's calibrated k per layer at ``sparsity.mlp_batch_size``.

    Returns what the results record about it (table file, hash, the batch size whose k is used).
    """
    from polar_sparsity.sparsity.calibration import calibration_path, check_layers, load_calibration

    batch_size, bundle_dir = settings.sparsity.mlp_batch_size, settings.paths.routers
    table = load_calibration(bundle_dir, model=settings.model.name)
    path = calibration_path(bundle_dir)
    if table is None:
        raise ValueError(
            f"sparsity.mlp_batch_size={batch_size} needs the MLP calibration table {path}, which does not "
            f"exist: run `python calibrate.py model={settings.model.name}` after training the MLP routers"
        )
    if table.ffn_dim != geometry.ffn_dim:
        raise ValueError(
            f"{path} is for an MLP of {table.ffn_dim} neurons; this model has {geometry.ffn_dim}"
        )
    check_layers(table, range(geometry.num_layers))
    used = table.calibrated_batch_size(batch_size)  # type: ignore[arg-type]
    if used < batch_size:  # type: ignore[operator]
        log.warning(
            "sparsity.mlp_batch_size=%d is beyond the calibrated batch sizes %s: using B=%d's k",
            batch_size,
            list(table.batch_sizes),
            used,
        )
    plan.mlp_keep = {layer: table.keep(layer, batch_size) for layer in table.layers}  # type: ignore[arg-type]
    return {
        "file": str(path.resolve()),
        "sha256": file_digest(path),
        "routers": table.meta.get("routers", {}),
        "target_recall": table.target_recall,
        "batch_size": batch_size,
        "calibrated_batch_size": used,
        "k": {str(layer): k for layer, k in plan.mlp_keep.items()},
    }


def _warn_if_dense(settings: EvaluateRunConfig, plan: SparsityPlan, geometry: ModelGeometry) -> None:
    """A sparse mode whose setting keeps every unit everywhere is the dense model: say so loudly."""
    if settings.mode == Mode.dense or plan.attn_layers(geometry) or plan.mlp_layers(geometry):
        return
    sp = settings.sparsity
    log.warning(
        "mode=%s keeps every unit: attention keeps %s per token (attn_topk=%s, attn_keep=%s) or no layer "
        "is sparse, and the MLP is dense. This run measures the dense model; lower sparsity.attn_topk or "
        "set sparsity.attn_keep below %d.",
        settings.mode.value,
        k_of_n(sp, geometry),
        sp.attn_topk,
        sp.attn_keep,
        geometry.num_kv_heads,
    )


def _warn_unapplied(settings: EvaluateRunConfig, plan: SparsityPlan, geometry: ModelGeometry) -> None:
    """Say which configured settings this mode ignores (a sweep over modes shares one set of them)."""
    sp = settings.sparsity
    ignored = []
    if sp.mlp_topk is not None and not plan.mlp_layers(geometry):
        ignored.append(f"sparsity.mlp_topk={sp.mlp_topk} (the MLP stays dense)")
    if sp.router_topk is not None and settings.mode != Mode.sparse:
        ignored.append(f"sparsity.router_topk={sp.router_topk} (no routers)")
    if ignored:
        log.warning("mode=%s does not apply %s", settings.mode.value, "; ".join(ignored))


def _load_bundle(settings: EvaluateRunConfig, plan: SparsityPlan, geometry: ModelGeometry):
    from polar_sparsity.routers.bundle import load_routers, router_path

    bundle_dir = settings.paths.routers
    device = resolve_device(settings.device)
    router_topk = settings.sparsity.router_topk or settings.sparsity.attn_topk
    head_layers, mlp_layers = plan.attn_layers(geometry), plan.mlp_layers(geometry)
    common = {
        "device": device,
        "model": settings.model.name,
        "weights": settings.model.weights.value,
        "geometry": geometry.as_dict(),
    }
    heads = (
        load_routers(bundle_dir, RouterKind.mha, router_topk, head_layers, **common) if head_layers else {}
    )
    mlps = load_routers(bundle_dir, RouterKind.mlp, None, mlp_layers, **common) if mlp_layers else {}
    if not heads and not mlps:
        log.info("mode=sparse keeps every head and neuron here: no routers needed")
        return heads, mlps, None
    files = {}
    for kind, routers, topk in ((RouterKind.mha, heads, router_topk), (RouterKind.mlp, mlps, None)):
        for layer, router in routers.items():
            path = router_path(bundle_dir, kind, layer, topk)
            files[str(path.relative_to(bundle_dir))] = {"sha256": file_digest(path), "meta": router.meta}
    return heads, mlps, {"path": str(Path(bundle_dir).resolve()), "router_topk": router_topk, "files": files}


def _check_calibrated_routers(calibration: dict, bundle: dict | None) -> None:
    """Refuse a table fitted for other weights of the MLP routers used now (retrained since)."""
    used = {name: record["sha256"] for name, record in (bundle or {}).get("files", {}).items()}
    stale = sorted(
        name
        for name, digest in used.items()
        if name.startswith("mlp/") and calibration["routers"].get(name) not in (None, digest)
    )
    if stale:
        raise ValueError(
            f"the calibration table {calibration['file']} was fitted for other weights of {stale} "
            f"(retrained since?); re-run `python calibrate.py`"
        )


# --- dense baseline --------------------------------------------------------------------------------


def dense_key(settings: EvaluateRunConfig, tasks: TaskSet | None) -> dict[str, Any]:
    """Everything the dense results depend on (the cache is valid for exactly this key)."""
    ev = settings.eval
    return {
        "model": settings.model.name,
        "weights": _weights_fingerprint(settings),
        "dtype": settings.model.dtype.value,
        "tokenizer": settings.model.tokenizer,
        "device": resolve_device(settings.device).type,
        "tasks": tasks.names if tasks else [],
        "local_task_data": _local_task_digest() if tasks else None,
        "num_fewshot": ev.num_fewshot,
        "limit": ev.limit,
        "seed": settings.seed,
        "data": settings.data.name,
        "perplexity": asdict(ev.perplexity) if ev.perplexity.enabled else None,
        # last:N changes which predictions the perplexity scores (not the dense model itself).
        "scored_positions": settings.sparsity.positions if ev.perplexity.enabled else None,
        "versions": {k: v for k, v in package_versions().items() if k in _NUMERIC_PACKAGES},
    }


def _weights_fingerprint(settings: EvaluateRunConfig) -> dict[str, Any]:
    model = settings.model
    if model.weights == Weights.random:
        architecture = asdict(model.architecture) if model.architecture is not None else None
        # Without an architecture in the config, the checkpoint's config.json gives it: fingerprint that.
        return {"random_seed": settings.seed, "architecture": architecture or _files_fingerprint(model)}
    return _files_fingerprint(model)


def _files_fingerprint(model: ModelConfig) -> dict[str, Any]:
    if model.path:
        # Name, size and modification time of each checkpoint file: cheap, and changes on retraining.
        files = sorted(p for p in Path(model.path).iterdir() if p.is_file())
        return {
            "path": str(Path(model.path).resolve()),
            "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files},
        }
    return {"hf_id": model.hf_id}


def _local_task_digest() -> str:
    data = sorted(Path(local_tasks_dir()).rglob("*.jsonl")) + sorted(Path(local_tasks_dir()).glob("*.yaml"))
    return files_digest(data)


def _dense_results(
    loaded: LoadedModel, settings: EvaluateRunConfig, tasks: TaskSet | None, cache_path: Path, key: dict
) -> tuple[dict[str, Any], str]:
    """Cached dense results when valid (mode=dense always recomputes and refreshes the cache)."""
    if settings.eval.dense_cache and settings.mode != Mode.dense:
        cached = read_cache(cache_path, key)
        if cached is not None:
            log.info("dense baseline from cache %s", cache_path)
            return cached, f"cache {cache_path}"
    log.info("evaluating the dense baseline")
    dense = evaluate_model(loaded, settings, tasks, None)
    if settings.eval.dense_cache:
        write_cache(cache_path, key, dense)
        return dense, f"computed in this run, cached at {cache_path}"
    return dense, "computed in this run"


# --- one evaluation --------------------------------------------------------------------------------


def evaluate_model(
    loaded: LoadedModel, settings: EvaluateRunConfig, tasks: TaskSet | None, plan: SparsityPlan | None
) -> dict[str, Any]:
    """Perplexity and lm-eval tasks with ``plan``'s hooks installed (None or mode=dense: unmodified)."""
    started = time.perf_counter()
    hooks = (
        apply_sparsity(loaded.model, loaded.adapter, loaded.geometry, plan)
        if plan is not None and plan.mode != Mode.dense
        else nullcontext(None)
    )
    results: dict[str, Any] = {}
    with hooks as controller:
        if settings.eval.perplexity.enabled:
            results["perplexity"] = _perplexity(loaded, settings, controller)
        if tasks is not None:
            if controller is not None:
                controller.set_lengths(None)  # lm-eval batches: rows end at the tensor (batch_size=1)
            harness = run_harness(
                loaded.model,
                loaded.tokenizer,
                tasks,
                num_fewshot=settings.eval.num_fewshot,
                limit=settings.eval.limit,
                batch_size=settings.eval.batch_size,
                bootstrap_iters=settings.eval.bootstrap_iters,
                seed=settings.seed,
            )
            results["lm_eval"] = harness.pop("metrics")
            results["lm_eval_info"] = harness
        if controller is not None:
            results["measured_density"] = {
                "attn": controller.stats.attn_density(),
                "mlp": controller.stats.mlp_density(),
            }
    results["seconds"] = round(time.perf_counter() - started, 2)
    return results


def _perplexity(loaded: LoadedModel, settings: EvaluateRunConfig, controller) -> dict[str, Any]:
    from polar_sparsity.data.tokens import load_texts

    cfg = settings.eval.perplexity
    value = perplexity(
        loaded.model,
        loaded.tokenizer,
        load_texts(settings.data, cfg.split),
        seq_len=cfg.seq_len,
        batch_size=cfg.batch_size,
        max_tokens=cfg.max_tokens,
        last_n=parse_positions(settings.sparsity.positions),
        on_batch=controller.set_lengths if controller is not None else None,
    )
    return value | {"data": settings.data.name, "split": cfg.split}


# --- outputs ---------------------------------------------------------------------------------------


def _sparsity_summary(settings: EvaluateRunConfig, plan: SparsityPlan, geometry: ModelGeometry) -> dict:
    sp = settings.sparsity
    return {
        "attn_topk": sp.attn_topk,
        "attn_keep": sp.attn_keep,
        "attn_kept": k_of_n(sp, geometry),
        "keeps_everything": not (plan.attn_layers(geometry) or plan.mlp_layers(geometry)),
        "mlp_topk": sp.mlp_topk,
        "mlp_batch_size": sp.mlp_batch_size,
        "mlp_k": {layer: plan.mlp_kept(layer, geometry.ffn_dim) for layer in plan.mlp_layers(geometry)},
        "router_topk": sp.router_topk,
        "positions": sp.positions,
        "dense_attn_layers": sorted(plan.dense_attn_layers),
        "attn_unit": "kv_group" if geometry.group_size > 1 else "head",
        "attn_units_per_layer": geometry.num_kv_heads,
        "attn_fraction": plan.attn_topk,
        "masked_attn_layers": plan.attn_layers(geometry),
        "masked_mlp_layers": plan.mlp_layers(geometry),
    }


def _title(settings: EvaluateRunConfig, plan: SparsityPlan, geometry: ModelGeometry) -> str:
    """The comparison's title: only the settings that the masking applies in this run."""
    sp = settings.sparsity
    detail = ""
    if settings.mode != Mode.dense:
        mlp = _mlp_label(sp) if plan.mlp_layers(geometry) else "MLP dense"
        everything = not (plan.attn_layers(geometry) or plan.mlp_layers(geometry))
        detail = (
            f" ({_attn_setting(sp)}: {k_of_n(sp, geometry)}, {mlp}, positions={sp.positions}, "
            f"dense attention layers {sorted(plan.dense_attn_layers)}"
            f"{'; KEEPS EVERY UNIT: same as dense' if everything else ''})"
        )
    return f"{settings.model.name} on {settings.data.name}: dense vs {settings.mode.value}{detail}"


def _mlp_label(sparsity: Any) -> str:
    if sparsity.mlp_batch_size is not None:
        return f"MLP k calibrated for batch size {sparsity.mlp_batch_size}"
    return f"mlp_topk={sparsity.mlp_topk}"


def _attn_setting(sparsity: SparsityConfig) -> str:
    if sparsity.attn_keep is not None:
        return f"attn_keep={sparsity.attn_keep}"
    return f"attn_topk={sparsity.attn_topk}"


def _sweep_row(settings: EvaluateRunConfig, payload: dict, dense: dict, sparse: dict, out_dir: Path) -> dict:
    sp = settings.sparsity
    measured = sparse.get("measured_density", {})
    row: dict[str, Any] = {
        "model": settings.model.name,
        "mode": settings.mode.value,
        "attn_topk": 1.0 if settings.mode == Mode.dense else payload["sparsity"]["attn_fraction"],
        "attn_kept": payload["sparsity"]["attn_kept"],
        "mlp_topk": sp.mlp_topk if payload["sparsity"]["masked_mlp_layers"] else None,  # only if applied
        "mlp_batch_size": sp.mlp_batch_size,
        "positions": sp.positions,
        "measured_attn_density": measured.get("attn"),
        "measured_mlp_density": measured.get("mlp"),
    }
    row |= flat_metrics(sparse)
    row |= flat_metrics(dense, prefix="dense:")
    row["run_dir"] = str(out_dir)
    return row


def _log(logger: Logger | None, rows: list[dict[str, Any]], sweep_row: dict[str, Any], png: Path) -> None:
    """The comparison as a W&B table and the plot, and the flat metrics for any logger."""
    if logger is None:
        return
    log_image(logger, "evaluate/plot", png)
    log_table(logger, "evaluate/comparison", rows)
    numeric = {f"evaluate/{k}": v for k, v in sweep_row.items() if isinstance(v, (int, float))}
    logger.log_metrics(numeric)
    logger.save()
