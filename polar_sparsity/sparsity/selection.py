"""Selection policies: which heads, KV groups or neurons a token keeps.

Pure tensor functions (no model knowledge), shared by the evaluation masking hooks and usable by the
fast decoder. A "unit" is what a policy selects: a query head (MHA), a KV group (GQA: the query heads
sharing one KV head), or an MLP neuron.
"""

from __future__ import annotations

import math

import torch


def num_kept(fraction: float, units: int) -> int:
    """Units kept at a top-k fraction: ceil(fraction * units), at least one and at most all."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"top-k fraction {fraction} must be in (0, 1]")
    # round() first: 0.3 * 10 is 3.0000000000000004 in floating point, which must not become 4.
    return min(units, max(1, math.ceil(round(fraction * units, 9))))


def topk_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask over the last dim marking the ``keep`` highest scores (ties: lowest index first)."""
    units = scores.shape[-1]
    if keep >= units:
        return torch.ones_like(scores, dtype=torch.bool)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(-1, topk_indices(scores, keep), True)


def topk_indices(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (int64, unsorted) of the ``keep`` highest scores (last dim): what ``topk_mask`` marks."""
    return torch.topk(scores.float(), keep, dim=-1, sorted=False).indices


def group_scores(head_scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-KV-group score from per-query-head scores: the max over the group's heads.

    Query head h reads KV head h // group_size (Hugging Face's ``repeat_kv`` layout), so a group is a
    run of ``group_size`` consecutive heads. The max follows the paper's released code.
    """
    if group_size == 1:
        return head_scores
    *lead, heads = head_scores.shape
    return head_scores.reshape(*lead, heads // group_size, group_size).amax(dim=-1)


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
