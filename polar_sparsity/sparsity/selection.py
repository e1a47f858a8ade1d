"""Selection policies: which heads, KV groups or neurons a token keeps.

Pure tensor functions (no model knowledge), shared by the evaluation masking hooks and usable by the
fast decoder. A "unit" is what a policy selects: a query head (MHA), a KV group (GQA: the query heads
sharing one KV head), or an MLP neuron.
"""

from __future__ import annotations

import math

import torch


def num_kept(fraction: float, units: int) -> int:
    """Units a top-k fraction keeps: ceil(fraction * units), at least one and at most all.

    The one rule for training labels, evaluation masks and the decoding engine. A fraction is a
    decimal the user wrote (0.3, 0.7); its floating-point product with ``units`` can land a few ulps
    above the exact value (0.7 * 10 is 7.000000000000001), so a product within 1e-9 above an integer
    counts as that integer. The exact product of a decimal with at most 8 places is a multiple of
    1e-8, so it is an integer or at least 1e-8 away from one: below 10**6 units (rounding error under
    1e-9) the tolerance moves no other count.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"top-k fraction {fraction} must be in (0, 1]")
    if units < 1:
        raise ValueError(f"units={units} must be at least 1")
    return min(units, max(1, math.ceil(fraction * units - 1e-9)))


def topk_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask over the last dim marking the ``keep`` highest scores (ties: lowest index first)."""
    units = scores.shape[-1]
    if keep >= units:
        return torch.ones_like(scores, dtype=torch.bool)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(-1, topk_indices(scores, keep), True)


def topk_indices(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (int64, unsorted) of the ``keep`` highest scores (last dim): what ``topk_mask`` marks."""
    if scores.is_cuda and scores.dim() == 1:
        # The batch-shared neuron selection of a decode step: one long vector, where torch.topk is
        # latency-bound (~45 us at 36,864 neurons on an H200); the same set, ascending.
        from polar_sparsity.kernels.topk_select import topk_select

        return topk_select(scores.float().contiguous(), keep)
    return torch.topk(scores.float(), keep, dim=-1, sorted=False).indices


GROUP_REDUCTIONS = ("max", "mean", "sum")


def group_scores(head_scores: torch.Tensor, group_size: int, reduce: str = "max") -> torch.Tensor:
    """(..., heads) per-query-head scores -> (..., heads // group_size) per-KV-group scores.

    Query head h reads KV head h // group_size (Hugging Face's ``repeat_kv`` layout), so a group is a
    run of ``group_size`` consecutive heads. ``reduce`` is max (the paper's released code, and what
    the evaluation oracle uses), mean or sum; with one head per group the scores are returned as is.
    """
    if reduce not in GROUP_REDUCTIONS:
        raise ValueError(f"group reduction {reduce!r} is not one of {GROUP_REDUCTIONS}")
    *lead, heads = head_scores.shape
    if group_size < 1 or heads % group_size:
        raise ValueError(f"{heads} heads do not split into KV groups of {group_size} heads")
    if group_size == 1:
        return head_scores
    grouped = head_scores.reshape(*lead, heads // group_size, group_size)
    if reduce == "max":
        return grouped.amax(dim=-1)
    return grouped.mean(dim=-1) if reduce == "mean" else grouped.sum(dim=-1)


def expand_groups(group_mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """A per-group mask as a per-query-head mask."""
    return group_mask if group_size == 1 else group_mask.repeat_interleave(group_size, dim=-1)


def head_norms(attn_output: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """L2 norm of each head's output (the output projection's input viewed as heads x head_dim)."""
    per_head = attn_output.reshape(*attn_output.shape[:-1], num_heads, head_dim)
    return torch.linalg.vector_norm(per_head.float(), dim=-1)


def random_scores(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Uniform scores: their top-k is a uniformly random subset per token."""
    return torch.rand(shape, generator=generator, device=device)


def sparse_positions(
    batch: int, length: int, last_n: int | None, lengths: torch.Tensor | None, device: torch.device
) -> torch.Tensor | None:
    """(batch, length) bool: where masking applies; None means everywhere.

    ``last:N`` marks the last N real positions of each row: rows end at ``lengths`` when given
    (right-padded batches), else at the tensor's end. A single-token decode step is always "last".
    """
    if last_n is None:
        return None
    ends = (
        torch.full((batch,), length, device=device)
        if lengths is None
        else lengths.to(device=device, dtype=torch.long)
    )
    position = torch.arange(length, device=device).unsqueeze(0)
    ends = ends.unsqueeze(1)
    return (position >= ends - last_n) & (position < ends)


def batch_neuron_scores(logits: torch.Tensor) -> torch.Tensor:
    """One score per MLP neuron for a whole decode batch: (..., batch, neurons) logits -> (..., neurons).

    The sum over the batch of each token's firing probability (the expected number of tokens that
    fire the neuron); its top-k is the batch's shared selection. Probabilities rather than raw or
    ReLU-clipped logits: a very negative logit of one token cannot veto a neuron the others need,
    and every neuron keeps a rank (no ties at zero).
    """
    if logits.is_cuda and logits.dim() == 2 and logits.stride(-1) == 1:
        # One pass over the logits on the GPU (the decode step's hot path); the same sum.
        from polar_sparsity.kernels.batch_firing_scores import batch_firing_scores

        return batch_firing_scores(logits)
    return torch.sigmoid(logits.float()).sum(dim=-2)
