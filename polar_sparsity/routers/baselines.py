"""Routers that need no training, measured like a trained one: the bar a trained router must clear."""

from __future__ import annotations

import torch

from polar_sparsity.routers.data import RouterDataModule
from polar_sparsity.routers.metrics import HeadSelectionMetrics, MlpSelectionMetrics
from polar_sparsity.routers.module import make_metrics
from polar_sparsity.routers.targets import RouterTarget
from polar_sparsity.schema import RouterKind


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
    if target.kind == RouterKind.mlp:
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
