"""The LightningModule that trains one router with the paper's weighted BCE."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from polar_sparsity.routers.metrics import HeadSelectionMetrics, MlpSelectionMetrics
from polar_sparsity.routers.targets import RouterTarget, topk_labels
from polar_sparsity.schema import RouterKind

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


def make_metrics(
    target: RouterTarget, mean_active: int | None = None, sync: bool = True
) -> HeadSelectionMetrics | MlpSelectionMetrics:
    """The kind's metrics; ``sync=False`` for values computed on one process only (no DDP gather).

    ``mean_active``: MLP routers only, the layer's mean count of neurons that fire (top-k recall's k).
    """
    if target.kind == RouterKind.mha:
        return HeadSelectionMetrics(target.k, sync_on_compute=sync)  # type: ignore[arg-type]
    if mean_active is None:
        raise ValueError("MLP router metrics need the layer's mean active neuron count")
    return MlpSelectionMetrics(target.units, mean_active, sync_on_compute=sync)


STAGES = ("train", "val", "test")


class RouterModule(L.LightningModule):
    """Trains ``net`` to score the units of one layer; one step for every stage, each with its metrics.

    ``val/*`` drives early stopping and checkpoint selection; ``test/*`` re-measures the exported
    (best) weights on the held-out rows.
    """

    def __init__(
        self,
        net: nn.Module,
        target: RouterTarget,
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        neg_weight: float | None = None,
        mean_active: int | None = None,
    ):
        super().__init__()
        self.net, self.target = net, target
        self.lr, self.weight_decay, self.neg_weight = lr, weight_decay, neg_weight
        # Keyed "<stage>_metrics": a ModuleDict key may not shadow a Module attribute such as `train`.
        self.stage_metrics = nn.ModuleDict(
            {f"{s}_metrics": make_metrics(target, mean_active) for s in STAGES}
        )
        self.non_finite_losses: dict[str, torch.Tensor | int] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def labels(self, target: torch.Tensor) -> torch.Tensor:
        """Head routers: each row's top-k units by norm; MLP routers: the stored 0/1 labels."""
        if self.target.kind == RouterKind.mha:
            return topk_labels(target, self.target.k)  # type: ignore[arg-type]
        return target

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        logits = self(batch["x"])
        loss = weighted_bce(logits, self.labels(batch["target"]), self.neg_weight)
        # Counted on the device (no synchronisation per step); checked once per stage epoch.
        self.non_finite_losses[stage] = self.non_finite_losses.get(stage, 0) + (~torch.isfinite(loss)).int()
        training = stage == "train"
        self.log(
            f"{stage}/loss", loss, on_step=training, on_epoch=True, prog_bar=training,
            sync_dist=not training, batch_size=len(batch["x"]),
        )  # fmt: skip
        self.stage_metrics[f"{stage}_metrics"].update(logits.detach(), batch["target"])
        return loss

    def _check_losses(self, stage: str) -> None:
        """A NaN or Inf loss fails the run (it would export a router that scores everything NaN)."""
        count = int(self.non_finite_losses.pop(stage, 0))
        if count:
            raise FloatingPointError(
                f"{count} {stage} batch(es) of epoch {self.current_epoch} had a NaN or Inf loss "
                f"({self.target.kind.value} router, layer {self.target.layer}): training diverged or the "
                f"inputs are not finite; lower router.lr"
            )

    def _log_stage_metrics(self, stage: str) -> None:
        self._check_losses(stage)
        metrics = self.stage_metrics[f"{stage}_metrics"]
        values = metrics.compute()  # synced over DDP ranks
        self.log_dict(
            {f"{stage}/{name}": value.float() for name, value in values.items()}, prog_bar=stage == "val"
        )
        metrics.reset()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def on_train_epoch_end(self) -> None:
        self._log_stage_metrics("train")

    def on_validation_epoch_end(self) -> None:
        self._log_stage_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_stage_metrics("test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
