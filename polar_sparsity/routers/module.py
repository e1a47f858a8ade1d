"""The LightningModule that trains one router with the paper's weighted BCE."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from polar_sparsity.routers.data import RouterTarget
from polar_sparsity.routers.metrics import HeadSelectionMetrics, MlpSelectionMetrics
from polar_sparsity.routers.targets import topk_labels

_MIN_NEG_WEIGHT = 1e-3  # a batch without positives would otherwise weigh every element 0


def weighted_bce(logits: torch.Tensor, labels: torch.Tensor, neg_weight: float | None = None) -> torch.Tensor:
    """BCE with positives weighted 1 and negatives ``neg_weight`` (default: the batch's positive rate).

    Active units are rare (MLP) or a fixed minority (top-k heads); down-weighting negatives by the
    positive rate balances the two classes, as in the paper's training code.
    """
    weight = labels.mean() if neg_weight is None else torch.tensor(neg_weight, device=labels.device)
    weight = weight.clamp_min(_MIN_NEG_WEIGHT).detach()
    element_weight = labels + (1 - labels) * weight
    return F.binary_cross_entropy_with_logits(logits.float(), labels, weight=element_weight)


def make_metrics(target: RouterTarget) -> HeadSelectionMetrics | MlpSelectionMetrics:
    if target.kind == "mha":
        return HeadSelectionMetrics(target.k)  # type: ignore[arg-type]
    return MlpSelectionMetrics(target.units)


class RouterModule(L.LightningModule):
    """Trains ``net`` to score the units of one layer; logs ``val/*`` deployment metrics each epoch."""

    def __init__(
        self,
        net: nn.Module,
        target: RouterTarget,
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        neg_weight: float | None = None,
    ):
        super().__init__()
        self.net, self.target = net, target
        self.lr, self.weight_decay, self.neg_weight = lr, weight_decay, neg_weight
        self.val_metrics = make_metrics(target)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def labels(self, target: torch.Tensor) -> torch.Tensor:
        """Head routers: each row's top-k units by norm; MLP routers: the stored 0/1 labels."""
        return topk_labels(target, self.target.k) if self.target.kind == "mha" else target  # type: ignore[arg-type]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = weighted_bce(self(batch["x"]), self.labels(batch["target"]), self.neg_weight)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch["x"]))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["x"])
        loss = weighted_bce(logits, self.labels(batch["target"]), self.neg_weight)
        self.log("val/loss", loss, on_epoch=True, sync_dist=True, batch_size=len(batch["x"]))
        self.val_metrics.update(logits, batch["target"])

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()  # synced over DDP ranks
        self.log_dict({f"val/{name}": value.float() for name, value in values.items()}, prog_bar=True)
        self.val_metrics.reset()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
