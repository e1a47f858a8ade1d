"""Done means, on the shipped tiny models: keeping everything is dense, and at top-k 0.5 the oracle
loses least, the trained routers less than random heads (held-out perplexity, paired tokens)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from polar_sparsity.collect.runner import run_collect
from polar_sparsity.config import resolved_config, to_settings
from polar_sparsity.data.tokens import batched, load_texts, packed_sequences
from polar_sparsity.evaluation.runner import build_plan, evaluate_model
from polar_sparsity.models.loading import load_model
from polar_sparsity.routers.task import run_train
from polar_sparsity.schema import CollectRunConfig, Mode, TrainRunConfig
from polar_sparsity.sparsity import SparsityPlan, apply_sparsity
from tests.evaluation.conftest import ROOT, evaluate_settings

STORE_SAMPLES = 24000
# The routers' perplexity loss must be clearly below random heads' (observed ratio about 0.65).
ROUTER_OVER_RANDOM = 0.85
PPL_TOKENS = 16384  # about 60% of the test split; every mode scores the same tokens


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(name, overrides=overrides)


@pytest.fixture(scope="module", params=["tiny-opt", "tiny-llama"])
def trained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A small store and head routers (top-k 0.5) for layers 1-3, trained by the project's train step."""
    model, root = request.param, tmp_path_factory.mktemp(request.param)
    common = [f"paths.artifacts={root}", f"model={model}", "logger=none"]
    cfg = _compose("collect", [*common, f"collect.samples={STORE_SAMPLES}", "collect.seq_len=128"])
    run_collect(to_settings(cfg, CollectRunConfig), resolved_config(cfg))
    for layer in (1, 2, 3):
        # The router tests' fast recipe: the paper's optimiser with a larger step and few epochs.
        fast = ["router.lr=3e-3", "router.max_epochs=3", "trainer.enable_progress_bar=false"]
        job = [f"layer={layer}", f"output_dir={root / f'train-{layer}'}"]
        cfg = _compose("train", [*common, "router=mha", *fast, *job])
        run_train(to_settings(cfg, TrainRunConfig), resolved_config(cfg))
    return model, root


def _settings(root: Path, model: str, mode: str, topk: float):
    settings, _ = evaluate_settings(
        root, f"model={model}", f"mode={mode}", f"sparsity.attn_topk={topk}", "eval.tasks=[]",
        f"eval.perplexity.max_tokens={PPL_TOKENS}",
    )  # fmt: skip
    return settings


def test_oracle_loses_least_and_routers_beat_random_heads(trained: tuple[str, Path]) -> None:
    model, root = trained
    loaded = load_model(_settings(root, model, "dense", 1.0).model, "cpu")
    dense = evaluate_model(loaded, _settings(root, model, "dense", 1.0), None, None)["perplexity"][
        "perplexity"
    ]
    loss = {}
    for mode in ("sparse_attn", "sparse", "random_attn"):
        settings = _settings(root, model, mode, 0.5)
        plan, _ = build_plan(settings, loaded.geometry)
        result = evaluate_model(loaded, settings, None, plan)
        assert result["measured_density"]["attn"] == pytest.approx(0.5)
        loss[mode] = result["perplexity"]["perplexity"] - dense
    print(f"{model}: dense perplexity {dense:.2f}, losses at top-k 0.5: {loss}")
    assert 0 < loss["sparse_attn"] < loss["sparse"] < ROUTER_OVER_RANDOM * loss["random_attn"]


def test_keeping_everything_reproduces_dense_logits(trained: tuple[str, Path]) -> None:
    model, root = trained
    settings = _settings(root, model, "sparse", 0.5)
    loaded = load_model(settings.model, "cpu")
    routers, _ = build_plan(settings, loaded.geometry)  # the trained routers, installed at top-k 1.0
    texts = load_texts(settings.data, "test")
    sequences = packed_sequences(texts, loaded.tokenizer, 256, loaded.geometry.vocab_size)
    batch = next(batched(sequences, 4, loaded.tokenizer.pad_token_id))
    with torch.no_grad():
        dense = loaded.model(**batch).logits
        for mode in (Mode.sparse, Mode.sparse_attn, Mode.random_attn):
            plan = SparsityPlan(
                mode, attn_topk=1.0, dense_attn_layers=frozenset(), head_routers=routers.head_routers
            )
            with apply_sparsity(loaded.model, loaded.adapter, loaded.geometry, plan):
                assert torch.equal(loaded.model(**batch).logits, dense), mode
    # Through the entry point's own path as well: top-k 1.0 in mode=sparse needs no routers.
    full = _settings(root, model, "sparse", 1.0)
    plan, bundle = build_plan(full, loaded.geometry)
    assert bundle is None
    ppl = evaluate_model(loaded, full, None, plan)["perplexity"]
    dense_ppl = evaluate_model(loaded, _settings(root, model, "dense", 1.0), None, None)["perplexity"]
    assert ppl["perplexity"] == dense_ppl["perplexity"]
