"""The engine on a CUDA GPU: Triton backend vs torch references, CUDA graphs vs eager (`pytest -m gpu`)."""

from __future__ import annotations

import pytest
import torch

from polar_sparsity.decode import DecodeEngine, DecodePlan
from polar_sparsity.models.families import build_hf_config
from tests.decode.helpers import PROMPTS, right_padded, routers

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# Real head dims (the kernels take 16..256); small enough for a quick test.
SHAPES = {
    "opt": (
        "opt",
        {"num_heads": 8, "num_kv_heads": 8, "activation": "relu", "norm": "layernorm"},
    ),
    "llama-gqa": (
        "llama",
        {"num_heads": 8, "num_kv_heads": 2, "activation": "silu", "norm": "rmsnorm"},
    ),
}
BASE = {
    "vocab_size": 512,
    "hidden_size": 512,
    "num_layers": 3,
    "ffn_dim": 1024,
    "max_position_embeddings": 256,
}
STEPS = 12


def _config(name: str):
    family, arch = SHAPES[name]
    return build_hf_config(family, {**BASE, **arch})


def _plan(name: str) -> DecodePlan:
    hidden, groups = BASE["hidden_size"], SHAPES[name][1]["num_kv_heads"]
    relu = SHAPES[name][0] == "opt"
    return DecodePlan(
        mode="sparse",
        attn_topk=0.5,
        head_routers=_cuda(routers("mha", range(1, 3), hidden, groups)),
        mlp_routers=_cuda(routers("mlp", range(3), hidden, BASE["ffn_dim"])) if relu else {},
        mlp_topk=0.5 if relu else None,
    )


def _cuda(loaded: dict) -> dict:
    for router in loaded.values():
        router.net.cuda()
    return loaded


def _engine(name: str, dtype: torch.dtype, backend: str, graphs: bool, sparse: bool) -> DecodeEngine:
    plan = _plan(name) if sparse else DecodePlan()
    return DecodeEngine.random(
        _config(name),
        plan,
        dtype=dtype,
        device="cuda",
        seed=0,
        max_batch_size=4,
        max_seq_len=256,
        backend=backend,
        cuda_graphs=graphs,
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("name", list(SHAPES))
def test_triton_backend_matches_torch_references(name: str, sparse: bool, dtype: torch.dtype) -> None:
    """Teacher-forced: both backends see the same tokens; their logits agree within the dtype's precision."""
    engines = [_engine(name, dtype, backend, False, sparse) for backend in ("triton", "torch")]
    assert [e.backend for e in engines] == ["triton", "torch"]
    ids, lengths = right_padded(PROMPTS)
    logits = [e.prefill(ids, lengths) for e in engines]
    # Loose enough for a router near-tie flipping one boundary neuron between backends, tight enough
    # that a wrong head, group or neuron set (logits of order 0.1 .. 1 here) fails.
    tol = 2e-2 if dtype == torch.float16 else 5e-2
    for _ in range(STEPS):
        torch.testing.assert_close(logits[0].float(), logits[1].float(), atol=tol, rtol=tol)
        tokens = logits[1].argmax(-1)
        logits = [e.decode_one_token(tokens) for e in engines]


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("name", list(SHAPES))
def test_cuda_graphs_give_the_eager_tokens(name: str, sparse: bool) -> None:
    runs = {}
    for graphs in (True, False):
        engine = _engine(name, torch.float16, "triton", graphs, sparse)
        assert engine.cuda_graphs == graphs
        runs[graphs] = engine.generate(PROMPTS, max_new_tokens=24).new_tokens
        # A second batch size gets its own graph.
        runs[(graphs, 1)] = engine.generate(PROMPTS[:1], max_new_tokens=8).new_tokens
    assert runs[True] == runs[False]
    assert runs[(True, 1)] == runs[(False, 1)]


def test_synthetic_context_decodes_with_graphs() -> None:
    engine = _engine("llama-gqa", torch.float16, "auto", True, True)
    assert engine.backend == "triton"
    engine.set_synthetic_context(4, 200)
    for step in range(3):
        logits = engine.decode_one_token(torch.arange(4, device="cuda"))
        assert torch.isfinite(logits).all()
        assert engine.cache.lengths.tolist() == [201 + step] * 4
