"""Choosing what is sparse: a whole count (attn_keep), the sparse layers (positive form), "k of n"."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from polar_sparsity.evaluation.runner import build_plan
from polar_sparsity.models.families import MlpKind, ModelGeometry
from polar_sparsity.schema import SparsityConfig, parse_layers
from polar_sparsity.sparsity.budget import attn_fraction, attn_kept, k_of_n
from polar_sparsity.sparsity.selection import num_kept
from tests.evaluation.conftest import evaluate_settings


def _geometry(num_heads: int, num_kv_heads: int, num_layers: int = 30) -> ModelGeometry:
    return ModelGeometry(num_layers, 64, num_heads, num_kv_heads, 8, 128, MlpKind.gated, 100)


def test_fractions_and_counts_say_k_of_n_for_three_kv_groups() -> None:
    geometry = _geometry(9, 3)
    assert k_of_n(SparsityConfig(attn_topk=0.34), geometry) == "2 of 3 KV groups"
    assert k_of_n(SparsityConfig(attn_topk=0.67), geometry) == "3 of 3 KV groups"
    for keep in (1, 2, 3):
        sparsity = SparsityConfig(attn_keep=keep)
        assert attn_kept(sparsity, geometry) == keep
        # The fraction handed to the masks gives back exactly the count through the one top-k rule.
        assert num_kept(attn_fraction(sparsity, geometry), 3) == keep
    assert k_of_n(SparsityConfig(attn_keep=5), _geometry(12, 12)) == "5 of 12 heads"


def test_attn_keep_is_checked_against_the_model() -> None:
    with pytest.raises(ValueError, match=r"attn_keep=4 but this model has 3 KV groups per layer; use 1..3"):
        attn_kept(SparsityConfig(attn_keep=4), _geometry(9, 3))
    with pytest.raises(ValueError, match=r"attn_keep=0 must be a whole count >= 1"):
        SparsityConfig(attn_keep=0)


@pytest.mark.parametrize(
    ("spec", "layers"),
    [("range(1,5)", [1, 2, 3, 4]), ("1-4,7", [1, 2, 3, 4, 7]), ([3, 1, "5-6"], [1, 3, 5, 6]), (2, [2])],
)
def test_layer_specs(spec, layers: list[int]) -> None:
    assert parse_layers("sparsity.sparse_attn_layers", spec) == layers


def test_sparse_layers_are_the_complement_of_dense_layers() -> None:
    sparsity = SparsityConfig(sparse_attn_layers="range(1,5)")
    assert sparsity.dense_layers(8) == [0, 5, 6, 7]
    assert SparsityConfig(dense_attn_layers=[0, 3]).dense_layers(8) == [0, 3]
    with pytest.raises(ValueError, match=r"has layers \[9\] outside this model's 0..7"):
        SparsityConfig(sparse_attn_layers=[1, 9]).dense_layers(8)
    with pytest.raises(ValueError, match=r"'x' is not a layer; use a list of layers, 'range\(A,B\)'"):
        SparsityConfig(sparse_attn_layers="1,x")


def test_sparse_and_dense_layers_together_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="both say which layers are sparse; give one of them"):
        evaluate_settings(tmp_path, "sparsity.dense_attn_layers=[0,1]", "sparsity.sparse_attn_layers=[2,3]")


def test_positive_layers_and_counts_reach_the_plan(tmp_path: Path) -> None:
    settings, _ = evaluate_settings(
        tmp_path, "mode=sparse_attn", "sparsity.attn_keep=3", "sparsity.sparse_attn_layers='range(1,3)'"
    )
    plan, _ = build_plan(settings, _geometry(8, 8, num_layers=4))
    assert plan.dense_attn_layers == frozenset({0, 3})
    assert num_kept(plan.attn_topk, 8) == 3


def test_a_setting_that_keeps_everything_is_called_out(tmp_path: Path, caplog) -> None:
    settings, _ = evaluate_settings(tmp_path, "mode=random_attn", "sparsity.attn_topk=0.67")
    with caplog.at_level(logging.WARNING):
        plan, _ = build_plan(settings, _geometry(9, 3, num_layers=4))
    assert plan.attn_layers(_geometry(9, 3, num_layers=4)) == []
    assert "keeps every unit: attention keeps 3 of 3 KV groups" in caplog.text
