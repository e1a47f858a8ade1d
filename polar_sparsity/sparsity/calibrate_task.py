"""calibrate: the per-layer MLP top-k table per decode batch size, written into the router bundle.

Every input check (settings, store, model, bundle, routers' training split, enough held-out rows)
runs before the first router scores anything. Ends with a per-batch-size summary table, the
per-layer table, wall time, and ``calibration.{json,csv,png}`` beside the MLP routers.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from polar_sparsity.data.store import ActivationStore, StoreError
from polar_sparsity.reporting import format_table, save_figure, subplots, write_csv
from polar_sparsity.schema import CalibrateRunConfig
from polar_sparsity.sparsity.calibration import (
    CALIBRATION_CSV,
    CALIBRATION_PNG,
    NO_COST_TABLE,
    CalibrationError,
    CalibrationSettings,
    CalibrationTable,
    calibrate,
    calibration_path,
    candidate_ks,
    entries_by_batch,
    require_mlp_activity,
    save_calibration,
)
from polar_sparsity.sparsity.cost_table import (
    COST_TABLE_CSV,
    CostTable,
    measure_cost_table,
    read_cost_table,
    write_cost_table,
)
from polar_sparsity.tracking import log_image, log_rows

log = logging.getLogger(__name__)


def run_calibrate(settings: CalibrateRunConfig, resolved_config: dict[str, Any], logger: Any = None) -> dict:
    """Fit, write and report the table; returns its JSON payload."""
    from polar_sparsity.models.loading import resolve_device

    started, cpu_started = time.perf_counter(), time.process_time()
    cfg = settings.calibrate
    fit_settings = CalibrationSettings(
        batch_sizes=tuple(cfg.batch_sizes),
        target_recall=cfg.target_recall,
        granularity=cfg.granularity,
        batches=cfg.batches,
        check_fraction=cfg.check_fraction,
        seed=settings.seed,
        weight_bytes=cfg.weight_bytes,
        max_batches=cfg.max_batches,
        objective=cfg.objective.value,
        latency_budget=cfg.latency_budget,
    )
    _check_store(settings)
    bundle = Path(settings.paths.routers)
    device = resolve_device(settings.device)
    layers = cfg.layers
    cost_table = _cost_table(settings, fit_settings, device)
    with tqdm(
        desc=f"calibrate {settings.model.name}", unit="layer", total=len(layers) if layers else None
    ) as bar:

        def on_layer(layer: int, seconds: float) -> None:
            bar.update(1)
            bar.set_postfix(layer=layer, seconds=f"{seconds:.2f}")

        table = calibrate(
            bundle,
            settings.paths.store,
            fit_settings,
            layers=layers,
            device=device,
            model=settings.model.name,
            on_layer=on_layer,
            cost_table=cost_table,
        )
    seconds = round(time.perf_counter() - started, 2)
    table.meta["seconds"] = seconds
    # CPU time beside wall time: on a shared machine the wall time includes waiting for cores.
    table.meta["process_cpu_seconds"] = round(time.process_time() - cpu_started, 2)
    table.meta["device"] = str(device)
    json_path = save_calibration(table, bundle)
    csv_path = write_csv(json_path.with_name(CALIBRATION_CSV), table.rows())
    png_path = plot_calibration(table, json_path.with_name(CALIBRATION_PNG), settings.model.name)
    _report(table, seconds, json_path, csv_path, png_path)
    log_rows(logger, "calibrate/summary", table.summary_rows(), step_key="batch_size")
    log_image(logger, "calibrate/plot", png_path)
    return table.to_dict()


def _cost_table(settings: CalibrateRunConfig, fit: CalibrationSettings, device: Any) -> CostTable | None:
    """objective=latency: the CSV given, else measured on the CUDA device (and saved beside the table)."""
    cfg = settings.calibrate
    if fit.objective != "latency":
        return None
    if cfg.cost_table is not None:
        return read_cost_table(cfg.cost_table)
    if torch.device(device).type != "cuda":
        raise CalibrationError(NO_COST_TABLE + "; or run on a CUDA GPU (device=cuda) to measure it")
    geometry = ActivationStore(settings.paths.store).geometry
    ks = [int(k) for k in candidate_ks(geometry.ffn_dim, fit.granularity)]
    table = measure_cost_table(
        fit.batch_sizes, ks, geometry.ffn_dim, geometry.hidden_size, torch.device(device)
    )
    path = write_cost_table(table, calibration_path(settings.paths.routers).with_name(COST_TABLE_CSV))
    log.info("measured MLP cost table written to %s", path)
    return table


def _check_store(settings: CalibrateRunConfig) -> None:
    """The store exists, is this model's and data source's, and holds MLP activity (ReLU model)."""
    store = ActivationStore(settings.paths.store)
    for key, expected in (("model", settings.model.name), ("data", settings.data.name)):
        if store.manifest[key] != expected:
            raise StoreError(
                f"the store at {store.root} holds {key} {store.manifest[key]!r}, but this run is for "
                f"{key}={expected!r}; point paths.store at the right store or change {key}="
            )
    require_mlp_activity(store)


def plot_calibration(table: CalibrationTable, path: Path, model: str) -> Path:
    """Density vs layer, one colour per batch size: the router's k (solid), the true union (dashed)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, grid = subplots(1, 1, figsize=(9.5, 4.8))
    axes = grid[0][0]
    colours = plt.get_cmap("viridis")
    k_density, union_density = entries_by_batch(table, "density"), entries_by_batch(table, "union_density")
    sizes = table.batch_sizes
    for i, batch_size in enumerate(sizes):
        colour = colours(i / max(1, len(sizes) - 1))
        axes.plot(table.layers, k_density[batch_size], "-o", color=colour, ms=3, label=f"B={batch_size}")
        axes.plot(table.layers, union_density[batch_size], "--", color=colour, alpha=0.7)
    axes.plot([], [], "k-", label="router top-k (calibrated)")
    axes.plot([], [], "k--", label="union of truly active")
    axes.set(xlabel="layer", ylabel="MLP density (fraction of neurons)", ylim=(0, 1.02))
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    title = f"{model}: MLP density per batch size (target recall {table.target_recall})"
    return save_figure(fig, path, title)


def _report(table: CalibrationTable, seconds: float, json_path: Path, csv_path: Path, png_path: Path) -> None:
    per_layer = [
        {
            "layer": e["layer"],
            "B": e["batch_size"],
            "k": e["k"],
            "density": e["density"],
            "union": e["union_density"],
            "recall": e["recall"],
            "check": e["check_recall"],
            "full": "yes" if e["at_full_width"] else "",
            "mlp_MB": e["mlp_bytes"] / 1e6,
            **(
                {"latency_us": e["latency_us"], "over": "yes" if e["over_budget"] else ""}
                if e["latency_us"] is not None
                else {}
            ),
        }
        for e in table.rows()
    ]
    print(format_table(per_layer, title="Calibrated MLP top-k per layer and batch size"))
    print(format_table(table.summary_rows(), title=f"Per batch size (target recall {table.target_recall})"))
    layer_seconds = table.meta.get("layer_seconds", {})
    mean_layer = sum(layer_seconds.values()) / max(1, len(layer_seconds))
    print(
        f"calibrate took {seconds:.1f}s wall, {table.meta['process_cpu_seconds']:.1f}s CPU "
        f"({mean_layer:.2f}s wall per layer on {table.meta.get('device')})"
    )
    print(f"table: {json_path}\ncsv: {csv_path}\nplot: {png_path}")
    log.info("calibration table written to %s", calibration_path(json_path.parents[1]))
