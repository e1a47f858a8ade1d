"""Triton decode kernels for contextual sparsity (no model knowledge, importable without a GPU).

Each op lives in its own module beside its torch reference (``<op>_reference``):

- :func:`selective_up` / :func:`selective_gated_up` (``selective_mlp_up``): batch-shared neuron subset
  of an MLP up projection (ReLU or SwiGLU), compact (M, k) output.
- :func:`selective_down` (``selective_mlp_down``): down projection from the compact activations, on the
  transposed weight made once by :func:`prepare_down_weight`.
- :func:`batch_firing_scores`: the decode batch's score of each MLP neuron (sum of firing
  probabilities), whose top-k is the batch-shared selection.
- :func:`topk_select`: that top-k (exact, ascending indices, ties lowest index first), a radix select
  spread over the GPU.
- :func:`selective_head_attention` (MHA), :func:`selective_group_attention` (GQA) and
  :func:`dense_decode_attention`: decode attention over a static ``(B, H_kv, N_max, D)`` KV cache with
  per-sequence lengths on the device (CUDA-graph safe) and split-K for long contexts.

Launch configs come per GPU from a shipped table, the user tuning cache, first-use tuning or a
heuristic (``_tuning``; :func:`warm_up` resolves every key before CUDA-graph capture);
:func:`use_sparse_mlp` / :func:`use_sparse_attention` (``dense_fallback``) say where the dense path is
faster. See docs/kernels.md for layouts, tuning, tests and benchmarks.
"""

if __name__ == "kernels":
    # This folder installs as ``polar_sparsity.kernels``. Python reaches it as a top-level ``kernels``
    # only where the checkout's root is on sys.path (``python train.py``, ``python -m`` or pytest run
    # there), and that name belongs to PyPI's ``kernels``, which transformers imports. Hand the name
    # over: load that distribution from the rest of sys.path in this module's place (the import
    # returns what sys.modules holds once this file has run), or fail as a missing module would.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _checkout = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.realpath(p or os.curdir) != _checkout]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _elsewhere)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module
    _spec.loader.exec_module(_module)
else:
    from ._tuning import warm_up
    from .batch_firing_scores import batch_firing_scores, batch_firing_scores_reference
    from .dense_decode_attention import dense_decode_attention, dense_decode_attention_reference
    from .dense_fallback import use_sparse_attention, use_sparse_mlp
    from .selective_group_attention import selective_group_attention, selective_group_attention_reference
    from .selective_head_attention import selective_head_attention, selective_head_attention_reference
    from .selective_mlp_down import prepare_down_weight, selective_down, selective_down_reference
    from .selective_mlp_up import (
        selective_gated_up,
        selective_gated_up_reference,
        selective_up,
        selective_up_reference,
    )
    from .topk_select import topk_select, topk_select_reference

__all__ = [
    "batch_firing_scores",
    "batch_firing_scores_reference",
    "dense_decode_attention",
    "dense_decode_attention_reference",
    "prepare_down_weight",
    "selective_down",
    "selective_down_reference",
    "selective_gated_up",
    "selective_gated_up_reference",
    "selective_group_attention",
    "selective_group_attention_reference",
    "selective_head_attention",
    "selective_head_attention_reference",
    "selective_up",
    "selective_up_reference",
    "topk_select",
    "topk_select_reference",
    "use_sparse_attention",
    "use_sparse_mlp",
    "warm_up",
]
