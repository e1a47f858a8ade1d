"""The selection rules' one home: training labels and evaluation masks keep the same units."""

from __future__ import annotations

import pytest
import torch

from polar_sparsity.models.families import MlpKind, ModelGeometry
from polar_sparsity.routers.targets import RouterTarget, topk_labels
from polar_sparsity.schema import Mode
from polar_sparsity.sparsity import SparsityPlan
from polar_sparsity.sparsity.selection import group_scores, head_norms, num_kept, topk_mask

MAX_UNITS = 128
FRACTIONS = [i / 1000 for i in range(1, 1001)]


def _geometry(units: int) -> ModelGeometry:
    return ModelGeometry(2, 16, units, units, 4, 32, MlpKind.gated, 100)


def test_labels_and_masks_keep_the_same_count_for_every_thousandth() -> None:
    """For every fraction i/1000 and 1..128 units: labels and masks keep exactly ceil(i * units / 1000)."""
    plans = [SparsityPlan(Mode.sparse_attn, attn_topk=fraction) for fraction in FRACTIONS]
    label_counts, mask_counts = [], []
    for units in range(1, MAX_UNITS + 1):
        geometry = _geometry(units)
        label_counts.append([RouterTarget.for_heads(0, f, units, units, "max").k for f in FRACTIONS])
        mask_counts.append([plan.attn_keep(geometry) for plan in plans])
    thousandths = torch.arange(1, 1001).unsqueeze(0)
    units = torch.arange(1, MAX_UNITS + 1).unsqueeze(1)
    exact = -(-(thousandths * units) // 1000)  # integer ceil: no floating point involved
    assert torch.equal(torch.tensor(label_counts), exact)
    assert torch.equal(torch.tensor(mask_counts), exact)


def test_labels_and_masks_select_the_same_units() -> None:
    generator = torch.Generator().manual_seed(0)
    for units in range(1, MAX_UNITS + 1):
        scores = torch.rand(4, units, generator=generator)
        for keep in range(1, units + 1):
            assert torch.equal(topk_labels(scores, keep).bool(), topk_mask(scores, keep)), (units, keep)


def test_num_kept_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match=r"top-k fraction 1.5 must be in \(0, 1\]"):
        num_kept(1.5, 8)
    with pytest.raises(ValueError, match="units=0 must be at least 1"):
        num_kept(0.5, 0)


def test_group_scores_refuses_bad_reduce_and_uneven_groups() -> None:
    scores = torch.rand(2, 8)
    with pytest.raises(ValueError, match=r"group reduction 'median' is not one of \('max', 'mean', 'sum'\)"):
        group_scores(scores, 4, "median")
    with pytest.raises(ValueError, match="8 heads do not split into KV groups of 3 heads"):
        group_scores(scores, 3)


def test_head_norms_are_per_head_l2() -> None:
    attn_output = torch.tensor([[3.0, 4.0, 0.0, 1.0]])  # 2 heads of dim 2
    assert head_norms(attn_output, 2, 2).tolist() == [[5.0, 1.0]]
