"""Building engines: plans from router bundles, random weights at real shape, and clear refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from polar_sparsity.decode import DecodeEngine, DecodePlan, build_plan
from polar_sparsity.models.decoder_weights import decoder_spec, hf_decoder_tensors
from polar_sparsity.models.families import build_hf_config, family_for_config
from polar_sparsity.models.loading import load_model
from polar_sparsity.routers.bundle import BundleError, router_path, save_router
from polar_sparsity.routers.nets import MlpRouter
from polar_sparsity.schema import SparsityConfig
from tests.decode.helpers import PROMPTS, engine_for, routers, sparse_plans
from tests.evaluation.conftest import evaluate_settings, write_head_bundle
from tests.helpers import tiny_model


def write_mlp_bundle(bundle_dir: Path, model: str, layers: list[int], in_features: int, units: int) -> None:
    for layer in layers:
        torch.manual_seed(layer)
        kwargs = {"in_features": in_features, "out_features": units, "hidden": 32}
        meta = {
            "kind": "mlp",
            "layer": layer,
            "model": model,
            "unit": "neuron",
            "num_outputs": units,
            "net": {"class": "polar_sparsity.routers.nets.MlpRouter", "kwargs": kwargs},
        }
        save_router(router_path(bundle_dir, "mlp", layer), MlpRouter(**kwargs), meta)


@pytest.fixture(scope="module")
def tiny_opt(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("tiny-opt")
    settings, _ = evaluate_settings(root, "model=tiny-opt")
    loaded = load_model(settings.model, device="cpu")
    bundle = root / "bundle"
    g = loaded.geometry
    write_head_bundle(bundle, "tiny-opt", [1, 2, 3], g.hidden_size, g.num_kv_heads, topk=0.5)
    write_mlp_bundle(bundle, "tiny-opt", [0, 1, 2, 3], g.hidden_size, g.ffn_dim)
    return loaded, bundle


def _plan(loaded, bundle, mode="sparse", **sparsity):
    config = SparsityConfig(**{"attn_topk": 0.5, **sparsity})
    return build_plan(mode, config, loaded.geometry, bundle, "tiny-opt", "cpu", torch.float32)


def test_plan_from_a_bundle_generates_sparse(tiny_opt) -> None:
    loaded, bundle = tiny_opt
    plan = _plan(loaded, bundle, mlp_topk=0.5)
    assert sorted(plan.head_routers) == [1, 2, 3] and sorted(plan.mlp_routers) == [0, 1, 2, 3]
    engine = DecodeEngine.from_hf(loaded, plan, max_batch_size=3, max_seq_len=64)
    assert engine.backend == "torch" and not engine.cuda_graphs
    out = engine.generate(PROMPTS, max_new_tokens=5, eos_token_id=None)
    assert [len(t) for t in out.new_tokens] == [5, 5, 5]
    assert out.attn_density == {0: 1.0, 1: 0.5, 2: 0.5, 3: 0.5}
    assert out.mlp_density == {layer: 0.5 for layer in range(4)}
    dense = DecodeEngine.from_hf(loaded, _plan(loaded, None, mode="dense"), max_batch_size=3, max_seq_len=64)
    assert dense.generate(PROMPTS, max_new_tokens=5).new_tokens != out.new_tokens


@pytest.mark.parametrize(
    ("make_bundle", "sparsity", "error"),
    [
        (lambda b: b / "missing", {}, "no router bundle"),
        (lambda b: b, {"dense_attn_layers": []}, r"no router for layer\(s\) 0"),
        (lambda b: b, {"attn_topk": 0.3}, "no mha routers for topk=0.3"),
    ],
)
def test_missing_or_partial_bundle_is_refused(tiny_opt, make_bundle, sparsity, error) -> None:
    loaded, bundle = tiny_opt
    with pytest.raises(BundleError, match=error):
        _plan(loaded, make_bundle(bundle), **sparsity)


def test_bundle_of_another_model_is_refused(tiny_opt) -> None:
    loaded, bundle = tiny_opt
    with pytest.raises(BundleError, match="trained for model 'tiny-opt', not 'opt-125m'"):
        build_plan("sparse", SparsityConfig(), loaded.geometry, bundle, "opt-125m", "cpu", torch.float32)


def test_bundle_without_mlp_routers_is_refused(tiny_opt, tmp_path) -> None:
    loaded, _ = tiny_opt
    g = loaded.geometry
    write_head_bundle(tmp_path, "tiny-opt", [1, 2, 3], g.hidden_size, g.num_kv_heads, topk=0.5)
    with pytest.raises(BundleError, match="no mlp routers"):
        _plan(loaded, tmp_path, mlp_topk=0.5)


def test_dense_needs_no_bundle_and_other_modes_are_refused(tiny_opt) -> None:
    loaded, _ = tiny_opt
    assert _plan(loaded, None, mode="dense").mode == "dense"
    with pytest.raises(ValueError, match="'sparse_attn' is not one of"):
        _plan(loaded, None, mode="sparse_attn")
    with pytest.raises(ValueError, match="needs a router bundle"):
        _plan(loaded, None)


def test_fractions_keeping_everything_need_no_routers(tiny_opt) -> None:
    loaded, _ = tiny_opt
    plan = _plan(loaded, None, attn_topk=1.0, mlp_topk=1.0)
    assert plan.sparse_attn_layers(loaded.geometry) == [] and plan.sparse_mlp_layers(loaded.geometry) == []
    with pytest.raises(ValueError, match=r"layers \[7\] outside this model's 0..3"):
        _plan(loaded, None, attn_topk=1.0, dense_attn_layers=[0, 7])


def test_gated_mlp_sparsity_is_refused_before_loading() -> None:
    _, model = tiny_model("llama-gqa")
    geometry = family_for_config(model.config).geometry(model.config)
    with pytest.raises(ValueError, match="needs a ReLU model"):
        build_plan("sparse", SparsityConfig(mlp_topk=0.5), geometry, None, "x", "cpu", torch.float32)


def test_plan_without_routers_for_sparse_layers_is_refused() -> None:
    _, model = tiny_model("opt")
    with pytest.raises(ValueError, match=r"head router for layers \[1\]"):
        engine_for(model, DecodePlan(mode="sparse", attn_topk=0.5))


def test_bad_backends_are_refused() -> None:
    _, model = tiny_model("opt")
    plan, _ = sparse_plans(model, 0.5, None)
    spec = decoder_spec(model.config)
    for backend, error in (("triton", "needs a CUDA device"), ("cuda", "not one of")):
        with pytest.raises(ValueError, match=error):
            DecodeEngine(
                spec, hf_decoder_tensors(model, spec), plan, max_batch_size=1, max_seq_len=8, backend=backend
            )


def test_lengths_past_the_model_are_refused() -> None:
    _, mistral = tiny_model("mistral")
    plan = DecodePlan()
    with pytest.raises(ValueError, match="sliding attention window"):
        DecodeEngine.random(
            mistral.config, plan, dtype=torch.float32, device="cpu", max_batch_size=1, max_seq_len=33
        )
    _, opt = tiny_model("opt")
    with pytest.raises(ValueError, match="64 learned positions"):
        DecodeEngine.random(
            opt.config, plan, dtype=torch.float32, device="cpu", max_batch_size=1, max_seq_len=65
        )


_BIG_SHAPES = {  # OPT-66B's layer shapes would not suit a CPU test; these keep the same structure
    "vocab_size": 512,
    "hidden_size": 256,
    "num_layers": 3,
    "num_heads": 8,
    "num_kv_heads": 8,
    "ffn_dim": 1024,
    "activation": "relu",
    "norm": "layernorm",
    "max_position_embeddings": 128,
}


def test_random_engine_runs_at_shape_with_synthetic_context() -> None:
    config = build_hf_config("opt", _BIG_SHAPES)
    plan = DecodePlan(
        mode="sparse",
        attn_topk=0.5,
        head_routers=routers("mha", range(1, 3), 256, 8),
        mlp_routers=routers("mlp", range(3), 256, 1024),
        mlp_topk=0.25,
    )
    engine = DecodeEngine.random(
        config, plan, dtype=torch.float16, device="cpu", max_batch_size=4, max_seq_len=128
    )
    assert engine.model.embed.shape == (512, 256) and engine.model.embed.dtype == torch.float16
    assert engine.cache.k[0].shape == (4, 8, 128, 32)
    engine.set_synthetic_context(4, 100)
    assert engine.cache.lengths.tolist() == [100] * 4
    logits = engine.decode_one_token(torch.tensor([1, 2, 3, 4]))
    assert logits.shape == (4, 512) and torch.isfinite(logits).all()
    assert engine.cache.lengths.tolist() == [101] * 4
    out = engine.generate([[1, 2, 3], [4]], max_new_tokens=4)
    assert [len(t) for t in out.new_tokens] == [4, 4]
    assert out.mlp_density == {0: 0.25, 1: 0.25, 2: 0.25}
    with pytest.raises(ValueError, match="needs 200 cache slots"):
        engine.set_synthetic_context(2, 200)


def test_random_weights_are_seeded() -> None:
    config = build_hf_config("opt", _BIG_SHAPES)
    make = lambda seed: DecodeEngine.random(  # noqa: E731
        config, DecodePlan(), dtype=torch.float32, device="cpu", seed=seed, max_batch_size=1, max_seq_len=8
    )
    a, b, c = make(0), make(0), make(1)
    assert torch.equal(a.model.layers[1].w_qkv, b.model.layers[1].w_qkv)
    assert not torch.equal(a.model.layers[1].w_qkv, c.model.layers[1].w_qkv)
    assert torch.equal(a.model.layers[0].attn_norm.weight, torch.ones(256))
