"""Selection policies and masking hooks that apply contextual sparsity to an unmodified HF model."""

from polar_sparsity.sparsity.masking import SparsityController, SparsityPlan, apply_sparsity, check_plan
from polar_sparsity.sparsity.selection import group_scores, num_kept, topk_mask

__all__ = [
    "SparsityController",
    "SparsityPlan",
    "apply_sparsity",
    "check_plan",
    "group_scores",
    "num_kept",
    "topk_mask",
]
