"""What a training job leaves behind: its result record (also on failure) and its router's metadata.

``router_result.json`` in the job dir feeds the sweep summary; the bundle metadata travels inside the
router's safetensors file, enough to rebuild and judge the router without Hydra.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Any

import polar_sparsity
from polar_sparsity import runs
from polar_sparsity.data.store import ActivationStore
from polar_sparsity.reporting import write_json_atomic
from polar_sparsity.routers import summary
from polar_sparsity.routers.targets import RouterTarget
from polar_sparsity.schema import RouterKind, TrainRunConfig


def identity(settings: TrainRunConfig, target: RouterTarget | None = None) -> dict[str, Any]:
    """The fields that name a job's router in its record and in the sweep table."""
    router = settings.router
    return {
        "kind": router.kind.value,
        "layer": settings.layer,
        "topk": router.topk,
        "model": settings.model.name,
        "data": settings.data.name,
        "unit": target.unit_name if target else None,
        "units": target.units if target else None,
        "k": target.k if target else None,
        "job": runs.job_name(),
    }


def failure(settings: TrainRunConfig, error: BaseException) -> dict[str, Any]:
    """The record of a job that raised (called inside the ``except`` block: keeps the traceback)."""
    return {
        **identity(settings),
        "status": "failed",
        "error": f"{type(error).__name__}: {error}",
        "traceback": traceback.format_exc(),
    }


def strip_prefix(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    """``{'val/loss': t}`` -> ``{'loss': float}`` for the keys with ``prefix``."""
    return {k.removeprefix(prefix): float(v) for k, v in metrics.items() if k.startswith(prefix)}


def record(result: dict[str, Any], output_dir: Path, started: float) -> None:
    """router_result.json in the job dir; in a sweep, refresh the sweep's summary table too."""
    from lightning.pytorch.utilities import rank_zero_only

    result["seconds"] = round(time.perf_counter() - started, 2)
    if getattr(rank_zero_only, "rank", 0) != 0:  # DDP: one record per job, from rank 0
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output_dir / summary.RESULT_FILE, result)
    sweep = runs.sweep_dir()
    if sweep is not None:
        summary.refresh(sweep)


def bundle_meta(
    settings: TrainRunConfig,
    store: ActivationStore,
    target: RouterTarget,
    spec: dict[str, Any],
    result: dict[str, Any],
) -> dict[str, Any]:
    """The router file's metadata: what it predicts, how it was trained and scored, on which store."""
    router, manifest = settings.router, store.manifest
    return {
        "kind": target.kind.value,
        "layer": target.layer,
        "topk": router.topk,
        "k": target.k,
        "model": manifest["model"],
        "weights": manifest.get("weights"),
        "data": manifest["data"],
        "geometry": manifest["geometry"],
        "net": spec,
        "group_reduce": router.group_reduce.value if target.kind == RouterKind.mha else None,
        "unit": target.unit_name,
        "num_outputs": target.units,
        "metrics": {
            "best": result["metrics"],
            "last": result["last_metrics"],
            "baselines": result["baselines"],
            "monitor": router.monitor,
        },
        "train": {
            "epochs": result["epochs"],
            "train_rows": result["train_rows"],
            "val_rows": result["val_rows"],
            "batch_size": router.batch_size,
            "lr": router.lr,
            "weight_decay": router.weight_decay,
            "neg_weight": router.neg_weight,
            "seed": settings.seed,
            "split": "held out by sequence",
            # With seed, these reproduce the split (calibration fits on the held-out sequences).
            "samples": settings.train.samples,
            "val_fraction": settings.train.val_fraction,
        },
        "store": store.provenance(),
        "package_version": polar_sparsity.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
