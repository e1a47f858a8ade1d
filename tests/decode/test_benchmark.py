"""The decode benchmark's CPU-side pieces: shapes from the model configs, the bytes bound, memory fit."""

from __future__ import annotations

import pytest

from polar_sparsity.decode import benchmark
from polar_sparsity.models.families import build_hf_config, family_for_config


def _geometry(model: str):
    family, arch = benchmark.model_architecture(model)
    config = build_hf_config(family, arch)
    return family_for_config(config).geometry(config)


def test_opt_66b_bytes_bound_matches_the_paper_setting() -> None:
    """OPT-66B, batch 64, context 1920, 30% heads, half the neurons: the bound is about 2.35x."""
    (case,) = benchmark.SETTINGS["opt-66b"]
    geometry = _geometry(case.model)
    dense = benchmark.step_bytes(geometry, case, geometry.num_layers, sparse=False)
    sparse = benchmark.step_bytes(geometry, case, geometry.num_layers, sparse=True)
    assert dense.routers == 0
    assert sparse.routers > 0
    assert 2.25 < dense.total / sparse.total < 2.45


def test_gated_models_keep_the_mlp_dense() -> None:
    (case,) = benchmark.SETTINGS["llama-3.1-8b"]
    geometry = _geometry(case.model)
    dense = benchmark.step_bytes(geometry, case, 4, sparse=False)
    sparse = benchmark.step_bytes(geometry, case, 4, sparse=True)
    assert sparse.weights == dense.weights  # projections and the SwiGLU MLP stay dense
    # layer 0 dense, layers 1-3 read half the KV groups
    assert sparse.kv == pytest.approx(dense.kv * (1 + 3 * 0.5) / 4)


def test_layers_that_fit_and_refusal() -> None:
    (case,) = benchmark.SETTINGS["llama-2-7b"]  # batch 256, context 4096: ~17 GB of KV per layer
    geometry = _geometry(case.model)
    assert benchmark.layers_that_fit(geometry, case, 140 * 2**30) < geometry.num_layers
    with pytest.raises(ValueError, match="GiB for one layer"):
        benchmark.layers_that_fit(geometry, case, 8 * 2**30)


def test_unknown_model_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="valid names: .*opt-66b"):
        benchmark.model_architecture("opt-67b")


def test_main_refuses_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(benchmark.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        benchmark.main(["--setting", "opt-66b"])
