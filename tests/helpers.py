"""Tiny random models of every supported family, built through the project's own config path."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from polar_sparsity.models.families import build_hf_config

_BASE = {"vocab_size": 97, "hidden_size": 64, "num_layers": 2, "max_position_embeddings": 64, "ffn_dim": 96}

# name -> (family, architecture overrides); covers MHA and GQA, pre- and post-norm OPT.
TINY_ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "opt": ("opt", {"num_heads": 8, "num_kv_heads": 8, "activation": "relu", "norm": "layernorm"}),
    "opt-postnorm": (
        "opt",
        {
            "num_heads": 4,
            "num_kv_heads": 4,
            "activation": "relu",
            "norm": "layernorm",
            "extra": {"do_layer_norm_before": False, "word_embed_proj_dim": 32},
        },
    ),
    "llama-mha": ("llama", {"num_heads": 4, "num_kv_heads": 4, "activation": "silu", "norm": "rmsnorm"}),
    "llama-gqa": ("llama", {"num_heads": 8, "num_kv_heads": 2, "activation": "silu", "norm": "rmsnorm"}),
    "mistral": (
        "mistral",
        {
            "num_heads": 8,
            "num_kv_heads": 2,
            "activation": "silu",
            "norm": "rmsnorm",
            "extra": {"sliding_window": 32},
        },
    ),
    "qwen2": ("qwen2", {"num_heads": 8, "num_kv_heads": 4, "activation": "silu", "norm": "rmsnorm"}),
}


def tiny_model(name: str, seed: int = 0) -> tuple[str, PreTrainedModel]:
    family, overrides = TINY_ARCHITECTURES[name]
    config = build_hf_config(family, {**_BASE, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    # Random init leaves biases and norms at identity-like values: perturb them so hooks that read
    # the wrong tensor cannot pass by accident.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return family, model
