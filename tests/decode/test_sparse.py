"""Sparse decoding: one semantics with the evaluation masks, and top-k 1.0 decodes like dense."""

from __future__ import annotations

import pytest
import torch

from polar_sparsity.models.families import MlpKind, family_for_config
from polar_sparsity.sparsity import apply_sparsity
from tests.decode.helpers import PROMPTS, engine_for, hf_last_logits, right_padded, sparse_plans
from tests.helpers import TINY_ARCHITECTURES, tiny_model

FAMILIES = list(TINY_ARCHITECTURES)
RELU = [name for name in FAMILIES if TINY_ARCHITECTURES[name][0] == "opt"]
ATOL = 1e-4


@pytest.mark.parametrize(
    ("name", "mlp_topk"), [(name, None) for name in FAMILIES] + [(name, 1.0) for name in RELU]
)
def test_topk_one_decodes_like_dense(name: str, mlp_topk: float | None) -> None:
    """Routers and selective ops run, keep every unit, and change nothing."""
    _, model = tiny_model(name)
    plan, _ = sparse_plans(model, attn_topk=1.0, mlp_topk=mlp_topk)
    dense = engine_for(model).generate(PROMPTS, max_new_tokens=8)
    sparse = engine_for(model, plan).generate(PROMPTS, max_new_tokens=8)
    assert sparse.new_tokens == dense.new_tokens
    assert set(sparse.attn_density.values()) == {1.0}


def _engine_step(model, plan, prompts):
    """Dense prefill, then one sparse decode step on each prompt's greedy next token."""
    engine = engine_for(model, plan)
    tokens = engine.prefill(*right_padded(prompts)).argmax(-1)
    return tokens, engine.decode_one_token(tokens)


@torch.no_grad()
def _masked_last_logits(model, mask_plan, sequences):
    adapter = family_for_config(model.config)
    with apply_sparsity(model, adapter, adapter.geometry(model.config), mask_plan):
        return hf_last_logits(model, sequences)


@pytest.mark.parametrize("name", FAMILIES)
def test_sparse_heads_equal_the_evaluation_masks(name: str) -> None:
    """Per sequence head (KV-group) selection: a batch of prompts of different lengths."""
    _, model = tiny_model(name)
    plan, mask_plan = sparse_plans(model, attn_topk=0.5, mlp_topk=None)
    tokens, sparse = _engine_step(model, plan, PROMPTS)
    sequences = [[*p, t] for p, t in zip(PROMPTS, tokens.tolist(), strict=True)]
    torch.testing.assert_close(sparse, _masked_last_logits(model, mask_plan, sequences), atol=ATOL, rtol=0)
    # Not vacuous: dropping half the heads changes the logits well beyond the tolerance.
    dense = hf_last_logits(model, sequences)
    assert (sparse - dense).abs().max() > 100 * ATOL


@pytest.mark.parametrize("name", RELU)
def test_sparse_heads_and_neurons_equal_the_evaluation_masks(name: str) -> None:
    """Batch of one: the engine's batch-shared neuron set is then the token's own top-k."""
    _, model = tiny_model(name)
    assert family_for_config(model.config).geometry(model.config).mlp_kind == MlpKind.relu
    plan, mask_plan = sparse_plans(model, attn_topk=0.5, mlp_topk=0.25, dense_layers={0})
    for prompt in PROMPTS:
        tokens, sparse = _engine_step(model, plan, [prompt])
        sequence = [[*prompt, tokens.item()]]
        torch.testing.assert_close(sparse, _masked_last_logits(model, mask_plan, sequence), atol=ATOL, rtol=0)
        # The MLP mask matters here: heads alone give other logits.
        heads_only, _ = sparse_plans(model, attn_topk=0.5, mlp_topk=None, dense_layers={0})
        _, heads_logits = _engine_step(model, heads_only, [prompt])
        assert (sparse - heads_logits).abs().max() > 100 * ATOL


def test_batch_shares_one_neuron_set() -> None:
    """MLP density reports the batch-shared k; generation at batch 3 runs the selective path."""
    _, model = tiny_model("opt")
    plan, _ = sparse_plans(model, attn_topk=0.5, mlp_topk=0.25)
    out = engine_for(model, plan).generate(PROMPTS, max_new_tokens=4)
    geometry = family_for_config(model.config).geometry(model.config)
    assert out.mlp_density == {layer: 24 / geometry.ffn_dim for layer in range(geometry.num_layers)}
    assert out.attn_density == {layer: 0.5 for layer in range(geometry.num_layers)}
    assert all(len(tokens) == 4 for tokens in out.new_tokens)


def test_calibrated_keep_overrides_the_fraction() -> None:
    _, model = tiny_model("opt")
    plan, _ = sparse_plans(model, attn_topk=0.5, mlp_topk=0.25)
    calibrated = type(plan)(**{**plan.__dict__, "mlp_keep": lambda layer, batch: 10 * (layer + 1) + batch})
    out = engine_for(model, calibrated).generate(PROMPTS[:2], max_new_tokens=3)
    assert out.mlp_density == {0: 12 / 96, 1: 22 / 96}
