"""train: fit one router (kind, layer) on the activation store, export it into the router bundle.

Failure policy (documented in docs/training.md): a failing job records ``status: failed`` with its
error in ``router_result.json`` and in the sweep's summary, then re-raises. Hydra's launchers run
the other jobs of the sweep regardless and the multirun exits non-zero at the end, as usual for Hydra.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

import polar_sparsity
from polar_sparsity.data.store import ActivationStore, StoreError
from polar_sparsity.reporting import format_table, write_json_atomic
from polar_sparsity.routers import summary
from polar_sparsity.routers.bundle import router_path, save_router
from polar_sparsity.routers.checks import check_finite_net, check_layer_finite, check_row_provenance
from polar_sparsity.routers.data import RouterDataModule, RouterTarget
from polar_sparsity.routers.metrics import HeadSelectionMetrics, MlpSelectionMetrics
from polar_sparsity.routers.module import RouterModule, make_metrics
from polar_sparsity.routers.nets import build_net, import_class, router_class
from polar_sparsity.routers.targets import topk_count
from polar_sparsity.schema import RouterKind, TrainRunConfig

log = logging.getLogger(__name__)

_METRICS = {
    "mha": ("loss", "topk_recall", "norm_recall"),
    "mlp": ("loss", "k99", "density", "topk_recall", "recall", "precision", "f1"),
}


# -- checks: everything that can be wrong with the inputs fails here, before any training ---------


def open_store(settings: TrainRunConfig) -> ActivationStore:
    """The store at ``paths.store``, checked against the configured model, data and layer."""
    store = ActivationStore(settings.paths.store)
    manifest = store.manifest
    expected_identity = (
        ("model", settings.model.name),
        ("weights", settings.model.weights.value),
        ("data", settings.data.name),
    )
    for key, expected in expected_identity:
        if manifest[key] != expected:
            raise StoreError(
                f"the store at {store.root} holds {key} {manifest[key]!r}, but this run is for "
                f"{key}={expected!r}; point paths.store at the right store or change {key}="
            )
    layers = store.geometry.num_layers
    if not 0 <= settings.layer < layers:
        raise ValueError(
            f"layer={settings.layer} is outside {settings.model.name}, which has layers 0..{layers - 1} "
            f"(sweep them all with layer='range(0,{layers})' -m)"
        )
    if settings.router.kind == RouterKind.mlp and not store.has_mlp:
        raise ValueError(
            f"router=mlp needs a ReLU MLP, but {settings.model.name} has a {store.geometry.mlp_kind.value} "
            f"MLP (no exact zeros, so no neuron labels are stored); train router=mha for this model"
        )
    check_row_provenance(store, settings.train.samples)
    check_layer_finite(store, settings.layer, settings.router.kind.value, settings.train.samples)
    return store


def make_target(settings: TrainRunConfig, store: ActivationStore) -> RouterTarget:
    g, router = store.geometry, settings.router
    if router.kind == RouterKind.mha:
        units = g.num_kv_heads  # one score per KV group (== per head for MHA models)
        k = topk_count(router.topk, units)  # type: ignore[arg-type]
    else:
        units, k = g.ffn_dim, None
    return RouterTarget(
        kind=router.kind.value,
        layer=settings.layer,
        units=units,
        k=k,
        num_heads=g.num_heads,
        num_kv_heads=g.num_kv_heads,
        group_reduce=router.group_reduce.value,
    )


def net_spec(settings: TrainRunConfig, store: ActivationStore, target: RouterTarget) -> dict[str, Any]:
    """{'class', 'kwargs'} of the router net: the configured ones plus the store's sizes."""
    kwargs = {k: v for k, v in settings.router.net.items() if k != "_target_"}
    sizes = {"in_features": store.geometry.hidden_size, "out_features": target.units}
    import_class(settings.router.net["_target_"])  # an unknown class is named first
    router_class(settings.router.net["_target_"])  # evaluation loads only the project's routers
    clashes = {k: kwargs[k] for k in sizes if k in kwargs and kwargs[k] != sizes[k]}
    if clashes:
        raise ValueError(
            f"router.net sets {clashes}, but the store fixes {sizes}; remove them from router.net"
        )
    return {"class": settings.router.net["_target_"], "kwargs": {**kwargs, **sizes}}


def check_monitor(settings: TrainRunConfig) -> None:
    valid = [f"val/{name}" for name in _METRICS[settings.router.kind.value]]
    if settings.router.monitor not in valid:
        raise ValueError(f"router.monitor={settings.router.monitor!r} is not one of {valid}")


# -- the task --------------------------------------------------------------------------------------


def run_train(
    settings: TrainRunConfig, resolved_config: dict[str, Any], logger: Any = None
) -> dict[str, Any]:
    """Train and export one router; returns (and writes) its result record."""
    output_dir = _output_dir(settings)
    started = time.perf_counter()
    try:
        result = _train(settings, output_dir, logger)
    except Exception as error:
        result = _failure(settings, error)
        _record(result, output_dir, started)
        raise
    _record(result, output_dir, started)
    if _sweep_dir() is None:
        print(format_table([summary.result_row(result)], title=f"Router ({summary.title_of(result)})"))
        if summary.vs_static(result) == "worse":
            print("warning: this router does not beat the static baseline (vs_static=worse)")
    return result


def _train(settings: TrainRunConfig, output_dir: Path, logger: Any) -> dict[str, Any]:
    # Every check runs before the first training step.
    check_monitor(settings)
    store = open_store(settings)
    target = make_target(settings, store)
    spec = net_spec(settings, store, target)
    L.seed_everything(settings.seed, workers=True, verbose=False)
    net = build_net(spec["class"], spec["kwargs"])
    _set_cpu_threads(settings, net)
    data = RouterDataModule(
        store.root,
        target,
        settings.router.batch_size,
        settings.train.samples,
        settings.train.val_fraction,
        settings.seed,
        settings.train.num_workers,
    )
    log.info(
        "%s router, layer %d: %d train / %d validation rows (held out by sequence)",
        target.kind,
        target.layer,
        len(data.train_rows),
        len(data.val_rows),
    )
    _name_wandb_run(logger, settings, target)
    unit_stats = data.unit_statistics()
    module, result = _fit(settings, net, target, data, unit_stats, output_dir, logger)
    if module.trainer.is_global_zero:
        path = router_path(settings.paths.routers, target.kind, target.layer, settings.router.topk)
        meta = _bundle_meta(settings, store, target, spec, result)
        check_finite_net(module.net, path)
        result["router_file"] = str(save_router(path, module.net, meta))
        log.info("router written to %s", result["router_file"])
    if not settings.train.keep_checkpoints:
        shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)
    return result


def _fit(
    settings: TrainRunConfig,
    net: torch.nn.Module,
    target: RouterTarget,
    data: RouterDataModule,
    unit_stats: torch.Tensor,
    output_dir: Path,
    logger: Any,
) -> tuple[RouterModule, dict[str, Any]]:
    """Train with early stopping, then test the best checkpoint (its weights are exported)."""
    cfg = settings.router
    mean_active = mean_active_count(unit_stats) if target.kind == "mlp" else None
    module = RouterModule(
        net,
        target,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        neg_weight=cfg.neg_weight,
        mean_active=mean_active,
    )
    checkpoint = ModelCheckpoint(
        dirpath=output_dir / "checkpoints",
        filename="best",
        monitor=cfg.monitor,
        mode=cfg.monitor_mode.value,
        save_top_k=1,
        save_weights_only=True,
    )
    trainer = _trainer(settings, logger, output_dir, checkpoint)
    trainer.fit(module, datamodule=data)
    last = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    best = trainer.test(module, datamodule=data, ckpt_path="best", verbose=False)[0]
    result = {
        **_identity(settings, target),
        "status": "ok",
        "metrics": _strip(best, "test/"),
        "last_metrics": _strip(last, "val/"),
        "baselines": baseline_metrics(data, target, settings.seed, unit_stats, mean_active),
        "epochs": trainer.current_epoch,
        "train_rows": len(data.train_rows),
        "val_rows": len(data.val_rows),
    }
    return module, result


def _trainer(
    settings: TrainRunConfig, logger: Any, output_dir: Path, checkpoint: ModelCheckpoint
) -> L.Trainer:
    cfg, hw = settings.router, settings.trainer
    callbacks: list[Any] = [checkpoint]
    if cfg.early_stopping.enabled:
        callbacks.append(
            EarlyStopping(
                monitor=cfg.monitor,
                mode=cfg.monitor_mode.value,
                patience=cfg.early_stopping.patience,
                min_delta=cfg.early_stopping.min_delta,
            )
        )
    return L.Trainer(
        accelerator=hw.accelerator,
        devices=hw.devices,
        strategy=hw.strategy,
        num_nodes=hw.num_nodes,
        precision=hw.precision,
        max_epochs=cfg.max_epochs,
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        default_root_dir=str(output_dir),
        log_every_n_steps=hw.log_every_n_steps,
        enable_progress_bar=hw.enable_progress_bar,
        enable_model_summary=False,
        deterministic=hw.deterministic,
        use_distributed_sampler=False,  # RowBatchSampler shards itself over ranks
    )


_SMALL_NET = 1_000_000  # parameters: below this, one CPU thread trains fastest


def _set_cpu_threads(settings: TrainRunConfig, net: torch.nn.Module) -> None:
    threads = settings.trainer.cpu_threads
    if threads is None and sum(p.numel() for p in net.parameters()) < _SMALL_NET:
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)


def mean_active_count(firing_rates: torch.Tensor) -> int:
    """The layer's mean number of neurons that fire per token (at least 1)."""
    return max(1, round(float(firing_rates.sum())))


@torch.no_grad()
def baseline_metrics(
    data: RouterDataModule,
    target: RouterTarget,
    seed: int,
    unit_stats: torch.Tensor,
    mean_active: int | None = None,
) -> dict[str, dict[str, float]]:
    """The same validation metrics for two routers that need no training.

    static: every token gets the units that were most active on the training rows (highest mean
    norm, or firing rate as a logit so that its threshold metrics mean "always-on neurons").
    random: a fresh random ranking per token.
    """
    stats = unit_stats
    if target.kind == "mlp":
        stats = torch.logit(stats.clamp(1e-6, 1 - 1e-6))
    # Every rank reads the whole validation set here: no gathering over DDP ranks.
    static, rand = (make_metrics(target, mean_active, sync=False) for _ in range(2))
    generator = torch.Generator().manual_seed(seed)
    for batch in data.val_dataloader(partition=False):
        rows = len(batch["x"])
        static.update(stats.expand(rows, -1), batch["target"])
        rand.update(torch.randn(rows, target.units, generator=generator), batch["target"])
    return {"static": _values(static), "random": _values(rand)}


def _values(metric: HeadSelectionMetrics | MlpSelectionMetrics) -> dict[str, float]:
    return {name: float(value) for name, value in metric.compute().items()}


def _strip(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    return {k.removeprefix(prefix): float(v) for k, v in metrics.items() if k.startswith(prefix)}


# -- records ---------------------------------------------------------------------------------------


def _identity(settings: TrainRunConfig, target: RouterTarget | None = None) -> dict[str, Any]:
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
        "job": _job_name(),
    }


def _failure(settings: TrainRunConfig, error: BaseException) -> dict[str, Any]:
    return {
        **_identity(settings),
        "status": "failed",
        "error": f"{type(error).__name__}: {error}",
        "traceback": traceback.format_exc(),
    }


def _record(result: dict[str, Any], output_dir: Path, started: float) -> None:
    """router_result.json in the job dir; in a sweep, refresh the sweep's summary table too."""
    from lightning.pytorch.utilities import rank_zero_only

    result["seconds"] = round(time.perf_counter() - started, 2)
    if getattr(rank_zero_only, "rank", 0) != 0:  # DDP: one record per job, from rank 0
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output_dir / summary.RESULT_FILE, result)
    sweep = _sweep_dir()
    if sweep is not None:
        summary.refresh(sweep)


def _bundle_meta(
    settings: TrainRunConfig,
    store: ActivationStore,
    target: RouterTarget,
    spec: dict[str, Any],
    result: dict[str, Any],
) -> dict[str, Any]:
    router, manifest = settings.router, store.manifest
    return {
        "kind": target.kind,
        "layer": target.layer,
        "topk": router.topk,
        "k": target.k,
        "model": manifest["model"],
        "weights": manifest.get("weights"),
        "data": manifest["data"],
        "geometry": manifest["geometry"],
        "net": spec,
        "group_reduce": router.group_reduce.value if target.kind == "mha" else None,
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
        },
        "store": {
            "path": str(store.root.resolve()),
            "model": manifest["model"],
            "data": manifest["data"],
            "rows": manifest["rows"],
            "weights": manifest.get("weights"),
            "dtype": manifest.get("dtype"),
        },
        "package_version": polar_sparsity.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# -- Hydra context ---------------------------------------------------------------------------------


def _hydra():
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def _sweep_dir() -> Path | None:
    """The multirun's sweep dir, or None in a single run (or outside Hydra)."""
    from hydra.types import RunMode

    hydra_cfg = _hydra()
    if hydra_cfg is None or hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return Path(hydra_cfg.sweep.dir)


def _job_name() -> str | None:
    hydra_cfg = _hydra()
    return hydra_cfg.job.override_dirname if hydra_cfg is not None else None


def _output_dir(settings: TrainRunConfig) -> Path:
    if settings.output_dir:
        return Path(settings.output_dir)
    hydra_cfg = _hydra()
    if hydra_cfg is not None:
        return Path(hydra_cfg.runtime.output_dir)
    return Path(tempfile.mkdtemp(prefix="polar-sparsity-train-"))


def _name_wandb_run(logger: Any, settings: TrainRunConfig, target: RouterTarget) -> None:
    """One W&B run per router: name it by kind/k/layer (the group, from conf/logger, is the sweep)."""
    from lightning.pytorch.loggers import WandbLogger

    if isinstance(logger, WandbLogger):
        k = f"-k{settings.router.topk}" if target.kind == "mha" else ""
        logger.experiment.name = f"train-{settings.model.name}-{target.kind}{k}-L{target.layer}"
        logger.experiment.tags = (*(logger.experiment.tags or ()), target.kind, f"layer={target.layer}")
