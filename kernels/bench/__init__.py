"""Benchmarks for the kernels.

``python -m polar_sparsity.kernels.bench {attn,gqa,gemm,mlp,block,all} [--out DIR]``.
"""
