"""train: fit one router (kind, layer) on the activation store, export it into the router bundle.

Failure policy (documented in docs/training.md): a failing job records ``status: failed`` with its
error in ``router_result.json`` and in the sweep's summary, then re-raises. Hydra's launchers run
the other jobs of the sweep regardless and the multirun exits non-zero at the end, as usual for Hydra.
Input checks live in ``checks``, the no-training baselines in ``baselines``, the records in ``records``.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from polar_sparsity import runs
from polar_sparsity.reporting import format_table
from polar_sparsity.routers import records, summary
from polar_sparsity.routers.baselines import baseline_metrics, mean_active_count
from polar_sparsity.routers.bundle import router_path, save_router
from polar_sparsity.routers.checks import check_finite_net, check_monitor, make_target, net_spec, open_store
from polar_sparsity.routers.data import RouterDataModule
from polar_sparsity.routers.module import RouterModule
from polar_sparsity.routers.nets import build_net
from polar_sparsity.routers.targets import RouterTarget
from polar_sparsity.schema import RouterKind, TrainRunConfig
from polar_sparsity.tracking import name_wandb_run

log = logging.getLogger(__name__)


def run_train(
    settings: TrainRunConfig, resolved_config: dict[str, Any], logger: Any = None
) -> dict[str, Any]:
    """Train and export one router; returns (and writes) its result record."""
    output_dir = _output_dir(settings)
    started = time.perf_counter()
    try:
        result = _train(settings, output_dir, logger)
    except Exception as error:
        result = records.failure(settings, error)
        records.record(result, output_dir, started)
        raise
    records.record(result, output_dir, started)
    if runs.sweep_dir() is None:
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
        target.kind.value,
        target.layer,
        len(data.train_rows),
        len(data.val_rows),
    )
    _name_run(logger, settings, target)
    unit_stats = data.unit_statistics()
    module, result = _fit(settings, net, target, data, unit_stats, output_dir, logger)
    if module.trainer.is_global_zero:
        path = router_path(settings.paths.routers, target.kind, target.layer, settings.router.topk)
        meta = records.bundle_meta(settings, store, target, spec, result)
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
    mean_active = mean_active_count(unit_stats) if target.kind == RouterKind.mlp else None
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
        **records.identity(settings, target),
        "status": "ok",
        "metrics": records.strip_prefix(best, "test/"),
        "last_metrics": records.strip_prefix(last, "val/"),
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


def _output_dir(settings: TrainRunConfig) -> Path:
    if settings.output_dir:
        return Path(settings.output_dir)
    return runs.job_output_dir() or Path(tempfile.mkdtemp(prefix="polar-sparsity-train-"))


def _name_run(logger: Any, settings: TrainRunConfig, target: RouterTarget) -> None:
    """One W&B run per router: named by kind/k/layer (the group, from conf/logger, is the sweep)."""
    kind = target.kind.value
    k = f"-k{settings.router.topk}" if target.kind == RouterKind.mha else ""
    name_wandb_run(
        logger, f"train-{settings.model.name}-{kind}{k}-L{target.layer}", (kind, f"layer={target.layer}")
    )
