"""Bad input fails before any evaluation starts, with a message naming the bad value."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from polar_sparsity.evaluation.harness import resolve_tasks
from polar_sparsity.evaluation.runner import build_plan
from polar_sparsity.models.families import family_for_config
from polar_sparsity.models.loading import load_hf_config
from polar_sparsity.schema import Mode, parse_positions
from tests.evaluation.conftest import evaluate_settings, write_head_bundle


def _geometry(settings):
    config = load_hf_config(settings.model)
    return family_for_config(config).geometry(config)


def test_defaults_compose_to_the_offline_suite(tmp_path: Path) -> None:
    settings, _ = evaluate_settings(tmp_path)
    assert settings.mode == Mode.sparse and settings.model.name == "tiny-opt"
    assert settings.eval.tasks == ["pydocs_continuation", "pydocs_perplexity"]
    assert settings.sparsity.dense_attn_layers == [0] and settings.sparsity.positions == "all"
    assert settings.paths.routers == f"{tmp_path}/routers/tiny-opt/python-docs"
    assert settings.eval.cache_dir == f"{tmp_path}/eval/dense-cache"


def test_paper_suite_is_the_nine_zero_shot_tasks(tmp_path: Path) -> None:
    settings, _ = evaluate_settings(tmp_path, "eval=paper")
    assert settings.eval.num_fewshot == 0
    assert sorted(settings.eval.tasks) == sorted(
        ["copa", "openbookqa", "piqa", "rte", "winogrande", "hellaswag", "mmlu", "arc_easy", "arc_challenge"]
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sparsity.attn_topk=1.5", r"sparsity.attn_topk=1.5 must be a fraction in \(0, 1\]"),
        ("sparsity.attn_topk=0", r"sparsity.attn_topk=0.0 must be a fraction in \(0, 1\]"),
        ("sparsity.mlp_topk=-0.1", r"sparsity.mlp_topk=-0.1 must be a fraction"),
        ("sparsity.router_topk=2", r"sparsity.router_topk=2.0 must be a fraction"),
        ("sparsity.positions=last:x", r"sparsity.positions='last:x' is not valid"),
        ("sparsity.positions=first:3", r"sparsity.positions='first:3' is not valid"),
        ("sparsity.positions=last:0", r"sparsity.positions='last:0' is not valid"),
        ("sparsity.positions=last:4", r"needs eval.batch_size=1 for lm-eval tasks \(got 16\)"),
        ("eval.limit=0", r"eval.limit=0.0 must be positive"),
        ("eval.batch_size=0", r"eval.batch_size=0 must be a positive integer"),
        ("sparsity.dense_attn_layers=[-1]", r"layers must be >= 0"),
    ],
)
def test_out_of_range_values_are_refused(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        evaluate_settings(tmp_path, override)


def test_valid_positions_and_dense_last_n(tmp_path: Path) -> None:
    assert parse_positions("all") is None and parse_positions("last:16") == 16
    settings, _ = evaluate_settings(tmp_path, "sparsity.positions=last:4", "eval.batch_size=1")
    assert settings.sparsity.positions == "last:4"
    # Dense masks nothing, so any batch size works; so does perplexity alone (it knows row ends).
    evaluate_settings(tmp_path, "sparsity.positions=last:4", "mode=dense")
    evaluate_settings(tmp_path, "sparsity.positions=last:4", "eval.tasks=[]")


def test_unknown_mode_names_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigCompositionException) as info:
        evaluate_settings(tmp_path, "mode=spares")
    assert "dense" in str(info.value.__cause__) and "sparse_attn" in str(info.value.__cause__)


def test_unknown_task_names_close_matches() -> None:
    with pytest.raises(ValueError) as info:
        resolve_tasks(["pydocs_perplexity", "pydocs_continuaton", "arc_easyy"])
    message = str(info.value)
    assert "unknown lm-eval task(s): 'pydocs_continuaton' (close: pydocs_continuation" in message
    assert "'arc_easyy' (close: arc_easy" in message and "'pydocs_perplexity'" not in message.split(".")[0]


def test_dense_layer_out_of_range(tmp_path: Path) -> None:
    settings, _ = evaluate_settings(tmp_path, "mode=sparse_attn", "sparsity.dense_attn_layers=[0,4]")
    with pytest.raises(ValueError, match=r"dense_attn_layers has layers \[4\] outside this model's 0..3"):
        build_plan(settings, _geometry(settings))


def test_mlp_topk_on_a_gated_model(tmp_path: Path) -> None:
    settings, _ = evaluate_settings(tmp_path, "model=tiny-llama", "sparsity.mlp_topk=0.3")
    with pytest.raises(ValueError, match="needs a ReLU MLP; this model's MLP is gated"):
        build_plan(settings, _geometry(settings))


def test_sparse_without_a_bundle(tmp_path: Path) -> None:
    settings, _ = evaluate_settings(tmp_path)
    with pytest.raises(RuntimeError, match="no router bundle at .*train routers first"):
        build_plan(settings, _geometry(settings))


def test_bundle_with_missing_layers(tmp_path: Path) -> None:
    settings, _ = evaluate_settings(tmp_path)
    write_head_bundle(Path(settings.paths.routers), "tiny-opt", [1, 3], 256, 8)
    with pytest.raises(RuntimeError, match=r"no router for layer\(s\) 2 \(present: 1, 3\)"):
        build_plan(settings, _geometry(settings))


def test_bundle_without_the_requested_topk(tmp_path: Path) -> None:
    settings, _ = evaluate_settings(tmp_path, "sparsity.attn_topk=0.25")
    write_head_bundle(Path(settings.paths.routers), "tiny-opt", [1, 2, 3], 256, 8)
    with pytest.raises(RuntimeError, match=r"no mha routers for topk=0.25 \(available: topk=0.5\)"):
        build_plan(settings, _geometry(settings))
    # The trained top-k=0.5 routers can rank heads for any kept fraction when asked to.
    settings, _ = evaluate_settings(tmp_path, "sparsity.attn_topk=0.25", "sparsity.router_topk=0.5")
    plan, bundle = build_plan(settings, _geometry(settings))
    assert sorted(plan.head_routers) == [1, 2, 3] and bundle["router_topk"] == 0.5


def test_bundle_of_another_model(tmp_path: Path) -> None:
    settings, _ = evaluate_settings(tmp_path)
    write_head_bundle(Path(settings.paths.routers), "opt-125m", [1, 2, 3], 256, 8)
    with pytest.raises(RuntimeError, match="trained for model 'opt-125m', not 'tiny-opt'"):
        build_plan(settings, _geometry(settings))


def test_bundle_with_wrong_unit_count(tmp_path: Path) -> None:
    # A per-query-head router for the GQA tiny-llama, which selects its 2 KV groups.
    settings, _ = evaluate_settings(tmp_path, "model=tiny-llama")
    write_head_bundle(Path(settings.paths.routers), "tiny-llama", [1, 2, 3], 256, 8)
    with pytest.raises(ValueError, match="scores 8 units; this model has 2"):
        build_plan(settings, _geometry(settings))


def test_full_bundle_loads_with_ids(tmp_path: Path) -> None:
    settings, _ = evaluate_settings(tmp_path)
    write_head_bundle(Path(settings.paths.routers), "tiny-opt", [1, 2, 3], 256, 8)
    plan, bundle = build_plan(settings, _geometry(settings))
    assert sorted(plan.head_routers) == [1, 2, 3]
    assert sorted(bundle["files"]) == [f"mha/topk=0.5/layer_00{i}.safetensors" for i in (1, 2, 3)]
    assert all(
        len(entry["sha256"]) == 64 and entry["meta"]["model"] == "tiny-opt"
        for entry in bundle["files"].values()
    )
    # Keeping every head needs no routers at all.
    settings, _ = evaluate_settings(tmp_path, "sparsity.attn_topk=1.0")
    plan, bundle = build_plan(settings, _geometry(settings))
    assert plan.head_routers == {} and bundle is None
