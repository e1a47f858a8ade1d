"""Every family's hook points checked against a manual computation on a tiny random model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from polar_sparsity.collect.capture import capture_activations
from polar_sparsity.models.families import FAMILIES, MlpKind, family_for_config, get_family
from polar_sparsity.schema import Family
from tests.helpers import TINY_ARCHITECTURES, tiny_model

BATCH, SEQ = 2, 11


def _rms_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    eps = norm.variance_epsilon
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm.weight


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _heads(x: torch.Tensor, proj: torch.nn.Linear, head_dim: int) -> torch.Tensor:
    return proj(x).view(BATCH, SEQ, -1, head_dim).transpose(1, 2)  # (B, heads, S, D)


def _manual_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention; KV heads are shared by consecutive query heads (GQA)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v  # (B, H, S, D)


def _manual_layer(family: str, model, layer_index: int, hidden: torch.Tensor):
    """Router input, per-head outputs and the MLP's down-projection input of one layer, by hand."""
    layer = get_family(family).layers(model)[layer_index]
    attn = layer.self_attn
    head_dim = attn.head_dim
    if family == "opt":
        pre_norm = model.config.do_layer_norm_before
        ln1, ln2 = layer.self_attn_layer_norm, layer.final_layer_norm
        router_input = (
            F.layer_norm(hidden, ln1.normalized_shape, ln1.weight, ln1.bias, ln1.eps) if pre_norm else hidden
        )
        q, k, v = (_heads(router_input, p, head_dim) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        heads = _manual_attention(q, k, v)
        merged = heads.transpose(1, 2).reshape(BATCH, SEQ, -1)
        mid = hidden + merged @ attn.out_proj.weight.T + attn.out_proj.bias
        if pre_norm:
            mlp_in = F.layer_norm(mid, ln2.normalized_shape, ln2.weight, ln2.bias, ln2.eps)
        else:
            mid = F.layer_norm(mid, ln1.normalized_shape, ln1.weight, ln1.bias, ln1.eps)
            mlp_in = mid
        down_input = torch.relu(layer.fc1(mlp_in))
    else:
        router_input = _rms_norm(hidden, layer.input_layernorm)
        q, k, v = (_heads(router_input, p, head_dim) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        positions = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
        cos, sin = model.model.rotary_emb(hidden, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        heads = _manual_attention(q, k, v)
        merged = heads.transpose(1, 2).reshape(BATCH, SEQ, -1)
        mid = hidden + merged @ attn.o_proj.weight.T
        mlp_in = _rms_norm(mid, layer.post_attention_layernorm)
        down_input = F.silu(layer.mlp.gate_proj(mlp_in)) * layer.mlp.up_proj(mlp_in)
    return router_input, heads.transpose(1, 2), down_input, mlp_in


@pytest.mark.parametrize("name", sorted(TINY_ARCHITECTURES))
def test_hook_points_match_manual_computation(name: str) -> None:
    family, model = tiny_model(name)
    adapter = family_for_config(model.config)
    geometry = adapter.geometry(model.config)
    input_ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ))

    down_inputs: dict[int, torch.Tensor] = {}
    hooks = [
        adapter.mlp_down_proj(model, i).register_forward_pre_hook(
            lambda m, args, i=i: down_inputs.__setitem__(i, args[0].reshape(BATCH, SEQ, -1))
        )
        for i in range(geometry.num_layers)
    ]
    with torch.no_grad(), capture_activations(model, adapter, geometry) as captured:
        hidden_states = model(input_ids, output_hidden_states=True).hidden_states
    for hook in hooks:
        hook.remove()

    for i in range(geometry.num_layers):
        with torch.no_grad():
            router_input, heads, down_input, _ = _manual_layer(family, model, i, hidden_states[i])
        got = captured.layers[i]
        torch.testing.assert_close(
            got.router_input, router_input.reshape(BATCH * SEQ, -1), rtol=1e-4, atol=1e-5
        )
        expected_norms = heads.norm(dim=-1).reshape(BATCH * SEQ, geometry.num_heads)
        torch.testing.assert_close(got.head_norms, expected_norms, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(down_inputs[i], down_input, rtol=1e-4, atol=1e-5)
        if geometry.mlp_kind == MlpKind.relu:
            expected_active = (down_input > 0).reshape(BATCH * SEQ, -1)
            assert torch.equal(got.mlp_active, expected_active)
        else:
            assert got.mlp_active is None


def test_geometry_of_gqa_and_post_norm_models() -> None:
    _, gqa = tiny_model("llama-gqa")
    geometry = family_for_config(gqa.config).geometry(gqa.config)
    assert (geometry.num_heads, geometry.num_kv_heads, geometry.group_size) == (8, 2, 4)
    assert geometry.mlp_kind == MlpKind.gated
    _, opt = tiny_model("opt-postnorm")
    geometry = family_for_config(opt.config).geometry(opt.config)
    assert (geometry.num_heads, geometry.num_kv_heads, geometry.mlp_kind) == (4, 4, MlpKind.relu)


def test_unknown_family_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown model family 'gpt2'.*llama"):
        get_family("gpt2")
    assert set(FAMILIES) == {"opt", "llama", "mistral", "qwen2"}


def test_every_configurable_family_has_its_adapter() -> None:
    assert list(FAMILIES) == list(Family)
    assert all(get_family(family).name == family.value for family in Family)


def test_norm_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match="norm 'rmsnorm' does not match"):
        get_family("opt").build_config(
            {
                "vocab_size": 10,
                "hidden_size": 8,
                "num_layers": 1,
                "num_heads": 2,
                "ffn_dim": 8,
                "activation": "relu",
                "norm": "rmsnorm",
                "max_position_embeddings": 8,
            }
        )
