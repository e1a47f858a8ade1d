"""The engine's Triton code path on the CPU (Triton's interpreter, set by tests/conftest.py).

``backend='triton'`` needs CUDA, so here the op backend is swapped on the built model: the engine's
calls into the kernels (layouts, index dtypes, strides) run for real and match the torch references.
"""

from __future__ import annotations

import os

import pytest
import torch

from polar_sparsity.decode import DecodeEngine, DecodePlan
from polar_sparsity.decode.ops import DecodeOps
from polar_sparsity.models.families import build_hf_config
from tests.decode.helpers import PROMPTS, right_padded, routers

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="CPU check under Triton's interpreter (the GPU tests cover CUDA)",
)

SHAPES = {  # head_dim 16: the smallest the kernels take
    "opt": ("opt", {"num_heads": 4, "num_kv_heads": 4, "activation": "relu", "norm": "layernorm"}),
    "llama-gqa": ("llama", {"num_heads": 4, "num_kv_heads": 2, "activation": "silu", "norm": "rmsnorm"}),
}
BASE = {"vocab_size": 97, "hidden_size": 64, "num_layers": 2, "ffn_dim": 128, "max_position_embeddings": 64}


def _plan(name: str, sparse: bool) -> DecodePlan:
    if not sparse:
        return DecodePlan(dense_attn_layers=frozenset())
    family, arch = SHAPES[name]
    relu = family == "opt"
    return DecodePlan(
        mode="sparse",
        attn_topk=0.5,
        dense_attn_layers=frozenset(),
        head_routers=routers("mha", range(2), BASE["hidden_size"], arch["num_kv_heads"]),
        mlp_routers=routers("mlp", range(2), BASE["hidden_size"], BASE["ffn_dim"]) if relu else {},
        mlp_topk=0.5 if relu else None,
    )


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("name", list(SHAPES))
def test_triton_ops_in_the_engine_match_the_references(name: str, sparse: bool) -> None:
    family, arch = SHAPES[name]
    config = build_hf_config(family, {**BASE, **arch})
    engines = [
        DecodeEngine.random(
            config, _plan(name, sparse), dtype=torch.float16, device="cpu", max_batch_size=3, max_seq_len=32
        )
        for _ in range(2)
    ]
    engines[0].model.ops = DecodeOps("triton")
    logits = [engine.prefill(*right_padded(PROMPTS)) for engine in engines]
    for _ in range(3):
        tokens = logits[1].argmax(-1)
        logits = [engine.decode_one_token(tokens) for engine in engines]
        torch.testing.assert_close(logits[0].float(), logits[1].float(), atol=2e-3, rtol=0)
