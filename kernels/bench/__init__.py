"""Benchmarks for the kernels: ``python -m kernels.bench {attn,gqa,gemm,mlp,block,all} [--out DIR]``."""
