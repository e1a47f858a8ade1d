"""The static KV cache: preallocated per layer in the kernels' layout, lengths on the device.

Per layer, K and V are ``(max_batch, kv_heads, max_seq_len, head_dim)``. Sequence ``b``'s tokens sit
at slots ``0 .. lengths[b] - 1`` (prompts of different lengths all start at slot 0). A decode step
writes each sequence's new K/V at its own slot ``lengths[b]`` with an index write, and the lengths are
bumped in place, so no step needs the host to know any length: decode steps can be captured in a
CUDA graph and replayed.
"""

from __future__ import annotations

import torch


class StaticKVCache:
    """Preallocated K/V for every layer, plus ``lengths`` (max_batch,) int32 on the device."""

    def __init__(
        self,
        num_layers: int,
        max_batch_size: int,
        num_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if max_batch_size < 1 or max_seq_len < 1:
            raise ValueError(
                f"max_batch_size={max_batch_size} and max_seq_len={max_seq_len} must both be >= 1"
            )
        shape = (max_batch_size, num_kv_heads, max_seq_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = torch.zeros(max_batch_size, dtype=torch.int32, device=device)
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len

    def layer(self, layer: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the first ``batch_size`` sequences (views, the kernels' layout)."""
        return self.k[layer][:batch_size], self.v[layer][:batch_size]

    def write_prompt(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a prefill's K/V (B, kv_heads, T, D) at slots 0 .. T - 1 (padding slots are never read)."""
        batch, _, length, _ = k.shape
        self.k[layer][:batch, :, :length].copy_(k)
        self.v[layer][:batch, :, :length].copy_(v)

    def write_step(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Store one token's K/V (B, kv_heads, D) of each sequence at its own slot ``slots`` (B,) int64."""
        rows = torch.arange(k.shape[0], device=k.device)
        self.k[layer][rows, :, slots] = k
        self.v[layer][rows, :, slots] = v

    def check_room(self, batch_size: int, needed: int) -> None:
        """Refuse a batch that does not fit (before any work starts)."""
        if not 1 <= batch_size <= self.max_batch_size:
            raise ValueError(f"batch of {batch_size} sequences; this engine holds 1..{self.max_batch_size}")
        if needed > self.max_seq_len:
            raise ValueError(
                f"a sequence needs {needed} cache slots (prompt + new tokens) but max_seq_len is "
                f"{self.max_seq_len}; build the engine with a larger max_seq_len"
            )

    def fill_random(self, batch_size: int, context_len: int, seed: int = 0, std: float = 1.0) -> None:
        """Random K/V in the first ``context_len`` slots of ``batch_size`` sequences, lengths set to it."""
        self.check_room(batch_size, context_len)
        generator = torch.Generator(device=self.lengths.device).manual_seed(seed)
        for k, v in zip(self.k, self.v, strict=True):
            k[:batch_size, :, :context_len].normal_(0.0, std, generator=generator)
            v[:batch_size, :, :context_len].normal_(0.0, std, generator=generator)
        self.lengths.zero_()
        self.lengths[:batch_size] = context_len
