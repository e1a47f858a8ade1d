"""Labels, metrics and the loss against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from polar_sparsity.routers.metrics import HeadSelectionMetrics, MlpSelectionMetrics, neurons_for_recall
from polar_sparsity.routers.module import weighted_bce
from polar_sparsity.routers.targets import topk_labels
from polar_sparsity.sparsity.selection import group_scores, num_kept


@pytest.mark.parametrize(
    ("fraction", "units", "k"), [(0.5, 8, 4), (0.7, 10, 7), (0.3, 8, 3), (0.01, 8, 1), (1.0, 2, 2)]
)
def test_num_kept_is_ceil_at_least_one(fraction: float, units: int, k: int) -> None:
    assert num_kept(fraction, units) == k


def test_num_kept_rejects_fractions_outside_unit_interval() -> None:
    with pytest.raises(ValueError, match="top-k fraction 0 must be in"):
        num_kept(0, 8)


def test_gqa_groups_are_contiguous_heads() -> None:
    norms = torch.tensor([[1.0, 5.0, 2.0, 2.0, 0.0, 1.0, 9.0, 3.0]])  # 8 heads, 2 KV groups of 4
    assert group_scores(norms, 4, "max").tolist() == [[5.0, 9.0]]
    assert group_scores(norms, 4, "sum").tolist() == [[10.0, 13.0]]
    assert group_scores(norms, 4, "mean").tolist() == [[2.5, 3.25]]
    assert group_scores(norms, 1, "max") is norms  # MHA: one unit per head


def test_topk_labels_mark_each_rows_largest() -> None:
    labels = topk_labels(torch.tensor([[0.1, 0.9, 0.5, 0.2], [4.0, 3.0, 2.0, 1.0]]), 2)
    assert labels.tolist() == [[0, 1, 1, 0], [1, 1, 0, 0]]


def test_head_metrics_by_hand() -> None:
    norms = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    metric = HeadSelectionMetrics(k=2)
    # Row 0 picks units {0, 2} (true top-2 {0, 1}); row 1 picks {0, 1} (true {2, 3}).
    metric.update(torch.tensor([[9.0, 0.0, 8.0, 0.0], [9.0, 8.0, 0.0, 0.0]]), norms)
    values = metric.compute()
    assert values["topk_recall"].item() == pytest.approx((0.5 + 0.0) / 2)
    assert values["norm_recall"].item() == pytest.approx((6 / 7 + 3 / 7) / 2)
    perfect = HeadSelectionMetrics(k=2)
    perfect.update(norms, norms)
    assert perfect.compute()["topk_recall"].item() == 1.0 and perfect.compute()["norm_recall"].item() == 1.0


def test_neurons_for_99_percent_recall_by_hand() -> None:
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5], [0.1, 0.2, 0.3, 0.4, 0.5], [1.0, 0.0, 0.0, 0.0, 0.0]])
    labels = torch.tensor([[1, 0, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    # Row 0: positives at ranks 1 and 3 -> 3 units; row 1: the only positive is ranked last -> 5; row 2: none.
    assert neurons_for_recall(scores, labels).tolist() == [3.0, 5.0, 0.0]


def test_mlp_metrics_by_hand() -> None:
    metric = MlpSelectionMetrics(num_neurons=4, mean_active=2)
    metric.update(torch.tensor([[2.0, -1.0, 1.0, -3.0]]), torch.tensor([[1.0, 1.0, 0.0, 0.0]]))
    values = {k: v.item() for k, v in metric.compute().items()}
    # Both positives are covered at rank 3 (scores 2, 1, -1): 3 of 4 neurons. The top-2 (scores 2, 1)
    # holds one of the two positives; at the 0.5 threshold: 1 true positive, 1 false positive, 1 miss.
    expected = {"recall": 0.5, "precision": 0.5, "f1": 0.5, "density": 0.5, "k99": 0.75, "topk_recall": 0.5}
    assert values == pytest.approx(expected)


def test_weighted_bce_weighs_negatives_by_the_positive_rate() -> None:
    logits = torch.tensor([[0.3, -1.2, 2.0, 0.1]])
    labels = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    per_element = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    expected = (per_element * torch.tensor([[1.0, 0.25, 0.25, 0.25]])).mean()
    assert weighted_bce(logits, labels).item() == pytest.approx(expected.item())
    fixed = (per_element * torch.tensor([[1.0, 0.5, 0.5, 0.5]])).mean()
    assert weighted_bce(logits, labels, neg_weight=0.5).item() == pytest.approx(fixed.item())


def test_baseline_metrics_never_gather_over_ranks() -> None:
    # Baselines are computed on CPU by every rank over the whole validation set; gathering CPU
    # tensors over NCCL fails ("No backend type associated with device type cpu", seen on an H100).
    from polar_sparsity.routers.module import make_metrics
    from polar_sparsity.routers.targets import RouterTarget

    target = RouterTarget("mha", 0, units=8, k=4, num_heads=8, num_kv_heads=8, group_reduce="max")
    assert make_metrics(target).sync_on_compute and not make_metrics(target, sync=False).sync_on_compute
