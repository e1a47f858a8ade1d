"""Evaluation: lm-eval adapter, held-out perplexity, the offline task suite, result tables and sweeps.

Submodules are imported where needed: ``harness`` pulls in lm-eval, which the GPU paths never need.
"""
