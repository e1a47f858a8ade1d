"""The engine's decode ops, two backends behind one interface.

``triton``: the ``polar_sparsity.kernels`` Triton ops (CUDA, fp16/bf16). ``torch``: the same ops'
torch references from that package (any device and dtype; what CI runs on the CPU). ``auto`` picks
Triton on CUDA with a half-precision dtype and the references otherwise. The engine calls only these
methods, so both backends run the same model code.

The Triton ops run with ``validate=False``: their host-side range checks cost a synchronisation per
call, and the engine's indices come from ``topk`` and its lengths from the cache, so they are in range
by construction (the kernels skip out-of-range indices in any case).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from polar_sparsity.kernels import (
    _tuning,
    dense_decode_attention,
    dense_decode_attention_reference,
    prepare_down_weight,
    selective_down,
    selective_down_reference,
    selective_group_attention,
    selective_group_attention_reference,
    selective_head_attention,
    selective_head_attention_reference,
    selective_up,
    selective_up_reference,
    use_sparse_attention,
    use_sparse_mlp,
)
from polar_sparsity.kernels._common import is_capturing

BACKENDS = ("auto", "torch", "triton")
_KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """``torch`` or ``triton`` for a requested backend, refusing what cannot run here."""
    if backend not in BACKENDS:
        raise ValueError(f"decode backend {backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and dtype in _KERNEL_DTYPES else "torch"
    if backend == "triton":
        if device.type != "cuda":
            raise ValueError(
                f"backend='triton' needs a CUDA device (the engine is on {device}); use backend='torch' "
                f"or 'auto'"
            )
        if dtype not in _KERNEL_DTYPES:
            raise ValueError(f"backend='triton' runs float16/bfloat16; the engine's dtype is {dtype}")
    return backend


class DecodeOps:
    """Decode attention and selective MLP GEMMs on the chosen backend."""

    def __init__(self, backend: str) -> None:
        if backend not in ("torch", "triton"):
            raise ValueError(f"DecodeOps backend must be 'torch' or 'triton', got {backend!r}")
        self.backend = backend
        self._mlp_choice: dict[tuple[int, ...], bool] = {}

    def sparse_mlp_pays(
        self,
        sparse: Callable[[], object],
        dense: Callable[[], object],
        shape: tuple[int, int, int, int],
        device: torch.device,
    ) -> bool:
        """Whether the selective up/down kernels beat the dense MLP (masked to the same neurons).

        ``shape`` is (batch, kept neurons, neurons, width). The torch backend (and Triton's CPU
        interpreter) always takes the selective path: the references define the semantics. On the
        GPU the two paths are timed once per shape, on the layer's own weights, the first time it is
        met outside graph capture (the decoder's warm-up), when kernel tuning is on; otherwise the
        kernels' dense-fallback rule decides. Both paths give the same outputs: only the time differs.
        """
        if self.backend == "torch" or device.type != "cuda":  # the references, or Triton's interpreter
            return True
        if shape not in self._mlp_choice:
            if _tuning.mode() == "tune" and not is_capturing():
                sparse()  # tunes the selective kernels' launch configs before they are timed
                timer = _tuning.GraphTimer(device)
                self._mlp_choice[shape] = timer(sparse) <= timer(dense)
            else:
                batch, kept, neurons, width = shape
                self._mlp_choice[shape] = use_sparse_mlp(batch, kept, neurons, width, False, device)
        return self._mlp_choice[shape]

    def sparse_attention_pays(
        self,
        batch: int,
        kept: int,
        kv_heads: int,
        group: int,
        head_dim: int,
        n_max: int,
        device: torch.device,
    ) -> bool:
        """Whether selective decode attention over ``kept`` KV heads beats the dense kernel (the rule)."""
        if self.backend == "torch" or device.type != "cuda":
            return True
        return use_sparse_attention(batch, kept, kv_heads, group, head_dim, n_max, device)

    def attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        seqlens: torch.Tensor,
        kv_idx: torch.Tensor | None,
    ) -> torch.Tensor:
        """(B, H_q, D) decode attention over the first ``seqlens`` cache slots of each sequence.

        ``kv_idx`` (B, k) int32 or int64: the heads (MHA) or KV groups (GQA) each sequence keeps; the
        query heads of the others come out zero. None: every head (dense).
        """
        mha = q.shape[1] == k_cache.shape[1]
        if self.backend == "triton":
            if kv_idx is None:
                return dense_decode_attention(q, k_cache, v_cache, seqlens, validate=False)
            op = selective_head_attention if mha else selective_group_attention
            return op(q, k_cache, v_cache, seqlens, kv_idx, validate=False)
        if kv_idx is None:
            out = dense_decode_attention_reference(q, k_cache, v_cache, seqlens, dtype=torch.float32)
        else:
            op = selective_head_attention_reference if mha else selective_group_attention_reference
            out = op(q, k_cache, v_cache, seqlens, kv_idx, dtype=torch.float32)
        return out.to(q.dtype)

    def prepare_down_weight(self, w_down: torch.Tensor) -> torch.Tensor:
        """The down projection (d, n) in the selective kernel's layout (n, d); made once at load."""
        return prepare_down_weight(w_down)

    def relu_up(
        self, x: torch.Tensor, w_up: torch.Tensor, bias: torch.Tensor | None, idx: torch.Tensor
    ) -> torch.Tensor:
        """relu(x @ w_up[idx].T + bias[idx]) -> (M, k) for the batch-shared neurons ``idx`` (k,) int64."""
        if self.backend == "triton":
            return selective_up(x, w_up, idx, bias, activation="relu", validate=False)
        return selective_up_reference(x, w_up, idx, bias, activation="relu", dtype=torch.float32).to(x.dtype)

    def down(
        self, a: torch.Tensor, w_down_t: torch.Tensor, bias: torch.Tensor | None, idx: torch.Tensor
    ) -> torch.Tensor:
        """a @ w_down_t[idx] + bias -> (M, d), from the compact activations of :meth:`relu_up`."""
        if self.backend == "triton":
            return selective_down(a, w_down_t, idx, bias, validate=False)
        return selective_down_reference(a, w_down_t, idx, bias, dtype=torch.float32).to(a.dtype)
