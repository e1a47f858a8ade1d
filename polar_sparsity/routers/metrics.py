"""Validation metrics that measure what deployment does with a router's scores.

Head routers are used by ranking: each token keeps its top-k units (heads, or KV groups for GQA).
So the metrics compare the router's top-k with the true top-k by output norm:

* ``topk_recall``: share of the true top-k units the router's top-k contains (random: ~k).
* ``norm_recall``: attention-output norm the router's top-k keeps, relative to the true top-k's
  (1.0 = oracle): how much of what matters survives.

MLP routers are used by ranking too (the top-k neurons of the batch-summed scores, with k calibrated
for 99% recall), so besides precision, recall and F1 at the 0.5 threshold:

* ``topk_recall``: share of the neurons that fired that the router's top-k contains, with k the
  layer's mean active count (measured on the training rows): recall at the budget an oracle needs.
* ``k99``: per token, the fraction of neurons the router must keep (in its score order) to cover 99%
  of the neurons that fired; the cost of deployment at the paper's recall target (oracle: ``density``).
* ``density``: fraction of neurons that fired (the lower bound for ``k99``).

States are sums, so DDP ranks combine exactly (torchmetrics syncs them at ``compute``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torchmetrics import Metric

from polar_sparsity.routers.targets import topk_labels

RECALL_TARGET = 0.99


class HeadSelectionMetrics(Metric):
    higher_is_better = True
    full_state_update = False

    def __init__(self, k: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.k = k
        for name in ("topk_recall", "norm_recall", "rows"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, scores: torch.Tensor, norms: torch.Tensor) -> None:  # type: ignore[override]
        """scores, norms: (B, units)."""
        norms = norms.float()
        chosen = topk_labels(scores.float(), self.k)
        oracle = topk_labels(norms, self.k)
        self.topk_recall += ((chosen * oracle).sum(-1) / self.k).sum().double()
        kept = (norms * chosen).sum(-1)
        best = (norms * oracle).sum(-1).clamp_min(1e-12)
        self.norm_recall += (kept / best).sum().double()
        self.rows += norms.shape[0]

    def compute(self) -> dict[str, torch.Tensor]:
        rows = self.rows.clamp_min(1)
        return {"topk_recall": self.topk_recall / rows, "norm_recall": self.norm_recall / rows}


def neurons_for_recall(
    scores: torch.Tensor, labels: torch.Tensor, target: float = RECALL_TARGET
) -> torch.Tensor:
    """Per row: how many top-scored units cover ``target`` of the positives (0 for rows without any)."""
    order = scores.float().argsort(dim=-1, descending=True)
    covered = labels.float().gather(-1, order).cumsum(-1)
    need = torch.ceil(labels.float().sum(-1) * target - 1e-6)
    count = (covered < need.unsqueeze(-1)).sum(-1) + 1
    return torch.where(need > 0, count, torch.zeros_like(count)).float()


class MlpSelectionMetrics(Metric):
    full_state_update = False

    def __init__(self, num_neurons: int, mean_active: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.num_neurons, self.mean_active = num_neurons, mean_active
        for name in ("tp", "fp", "fn", "topk_hits", "needed", "active", "rows"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, scores: torch.Tensor, labels: torch.Tensor) -> None:  # type: ignore[override]
        """scores (B, F) logits; labels (B, F) 1.0 where the neuron fired."""
        labels = labels.float()
        predicted = (scores > 0).float()  # logit > 0 <=> probability > 0.5
        self.tp += (predicted * labels).sum().double()
        self.fp += (predicted * (1 - labels)).sum().double()
        self.fn += ((1 - predicted) * labels).sum().double()
        self.topk_hits += (topk_labels(scores.float(), self.mean_active) * labels).sum().double()
        self.needed += neurons_for_recall(scores, labels).sum().double()
        self.active += labels.sum().double()
        self.rows += labels.shape[0]

    def compute(self) -> dict[str, torch.Tensor]:
        cells = self.rows.clamp_min(1) * self.num_neurons
        nan = torch.tensor(math.nan, dtype=torch.float64, device=self.tp.device)
        predicted, actual = self.tp + self.fp, self.tp + self.fn
        recall = self.tp / actual if actual > 0 else nan
        precision = self.tp / predicted if predicted > 0 else nan
        return {
            "k99": self.needed / cells,
            "density": self.active / cells,
            "topk_recall": self.topk_hits / self.active if self.active > 0 else nan,
            "recall": recall,
            "precision": precision,
            "f1": 2 * precision * recall / (precision + recall) if self.tp > 0 else nan,
        }
