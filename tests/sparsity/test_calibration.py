"""MLP top-k calibration: the fitted k meets the target on sequences it was not fitted on, the table
round-trips and answers for any batch size, bad inputs fail clearly, and evaluation applies it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from polar_sparsity.data.store import ActivationStore
from polar_sparsity.models.families import family_for_config
from polar_sparsity.models.loading import load_hf_config
from polar_sparsity.routers.bundle import BundleError, load_routers
from polar_sparsity.routers.data import RouterDataModule, RouterTarget
from polar_sparsity.sparsity.calibration import (
    CalibrationEntry,
    CalibrationError,
    CalibrationSettings,
    CalibrationTable,
    calibrate,
    calibration_path,
    draw_batches,
    fit_k,
    held_out_rows,
    load_calibration,
    recall_curve,
    save_calibration,
    split_fit_check,
)
from polar_sparsity.sparsity.selection import topk_mask

from .conftest import VAL_FRACTION, collect_store

SETTINGS = CalibrationSettings(batch_sizes=(1, 4, 8), target_recall=0.95, granularity=64, batches=48)


@pytest.fixture(scope="module")
def table(opt_mlp_bundle: tuple[Path, Path]) -> CalibrationTable:
    store, bundle = opt_mlp_bundle
    return calibrate(bundle, store, SETTINGS, model="tiny-opt")


def _union_recall_on_fresh_batches(
    store: ActivationStore, layer: int, router, rows: np.ndarray, b: int, k: int
):
    """Mean union recall of the batch-summed top-k, computed here from the store and router directly."""
    sequence_ids = np.asarray(store.sequence_ids())
    batches = draw_batches(rows, sequence_ids, b, 64, np.random.default_rng(1234))
    recalls = []
    for batch in batches:
        x = torch.from_numpy(np.asarray(store.router_inputs(layer)[np.sort(batch)], dtype=np.float32))
        probabilities = torch.sigmoid(router.scores(x))
        kept = torch.zeros(store.geometry.ffn_dim, dtype=torch.bool)
        kept[torch.topk(probabilities.sum(0), k).indices] = True
        union = torch.from_numpy(store.unpack_mlp(store.mlp_active_packed(layer)[np.sort(batch)]).any(0))
        recalls.append(float((kept & union).sum() / union.sum()) if union.any() else 1.0)
    return float(np.mean(recalls))


def test_fit_rows_are_unseen_by_router_training(opt_mlp_bundle: tuple[Path, Path]) -> None:
    store_root, bundle = opt_mlp_bundle
    store = ActivationStore(store_root)
    router = load_routers(bundle, "mlp", layers=[2])[2]
    target = RouterTarget("mlp", 2, store.geometry.ffn_dim, None, 8, 8, "max")
    data = RouterDataModule(store_root, target, 256, None, VAL_FRACTION, router.meta["train"]["seed"])
    held_out = held_out_rows(store, router.meta)
    assert np.array_equal(np.sort(held_out), np.sort(data.val_rows))
    assert not np.intersect1d(held_out, data.train_rows).size
    sequence_ids = np.asarray(store.sequence_ids())
    fit, check = split_fit_check(held_out, sequence_ids, 0.25, seed=0)
    assert not np.intersect1d(sequence_ids[fit], sequence_ids[check]).size
    assert len(fit) + len(check) == len(held_out)


def test_calibrated_k_meets_the_target_on_sequences_it_was_not_fitted_on(
    opt_mlp_bundle: tuple[Path, Path], table: CalibrationTable
) -> None:
    store_root, bundle = opt_mlp_bundle
    store = ActivationStore(store_root)
    routers = load_routers(bundle, "mlp")
    sequence_ids = np.asarray(store.sequence_ids())
    assert table.layers == (0, 1, 2, 3) and table.batch_sizes == (1, 4, 8)
    sparse = 0
    for (layer, b), entry in table.entries.items():
        assert entry.k % 64 == 0 and entry.density == entry.k / 1024
        assert entry.at_full_width == (entry.k == 1024)
        if entry.at_full_width:
            continue
        sparse += 1
        assert entry.recall >= SETTINGS.target_recall
        _, check = split_fit_check(held_out_rows(store, routers[layer].meta), sequence_ids, 0.25, seed=0)
        unseen = _union_recall_on_fresh_batches(store, layer, routers[layer], check, b, entry.k)
        # Fresh batches of unseen sequences: a sampling estimate, so a small tolerance below the target.
        assert unseen >= SETTINGS.target_recall - 0.01, (layer, b, entry, unseen)
        assert entry.check_recall >= SETTINGS.target_recall - 0.01, entry
    assert sparse >= 6  # the sparse layers (1-3) stay below full width at small batch sizes


def test_union_density_grows_with_batch_size(table: CalibrationTable) -> None:
    for layer in table.layers:
        union = [table.entries[(layer, b)].union_density for b in table.batch_sizes]
        k = [table.entries[(layer, b)].k for b in table.batch_sizes]
        assert union == sorted(union) and union[0] < union[-1]
        assert k[0] <= k[-1]


def test_recall_curve_equals_topk_mask_for_every_k() -> None:
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(5, 40, generator=generator)
    union = torch.rand(5, 40, generator=generator) < 0.3
    curve = recall_curve(scores, union)
    for k in range(1, 41):
        kept = topk_mask(scores, k)
        expected = ((kept & union).sum(-1).double() / union.sum(-1).double()).mean()
        assert abs(float(curve[k - 1]) - float(expected)) < 1e-12


def test_smallest_granular_k_and_full_width_when_unreachable() -> None:
    generator = torch.Generator().manual_seed(0)
    union = torch.zeros(4, 256, dtype=torch.bool)
    union[:, :100] = True
    good = torch.where(union, 1.0, 0.0) + 0.01 * torch.rand(4, 256, generator=generator)
    assert fit_k([(good, union)], 0.99, 32, 256) == (128, 1.0)  # 100 needed: next multiple of 32
    assert fit_k([(good[:2], union[:2]), (good[2:], union[2:])], 0.5, 32, 256) == (64, 0.64)
    # The router ranks the truly active neurons last: only the full width reaches the target.
    assert fit_k([(-good, union)], 0.99, 32, 256) == (256, 1.0)


def test_table_round_trip_and_nearest_batch_size_at_or_above(tmp_path: Path, table: CalibrationTable) -> None:
    bundle = tmp_path / "bundle"
    (bundle / "mlp").mkdir(parents=True)
    for name in table.meta["routers"]:
        (bundle / name).write_bytes(b"")
    assert load_calibration(bundle) is None
    save_calibration(table, bundle)
    loaded = load_calibration(bundle, model="tiny-opt")
    assert loaded is not None and loaded.entries == table.entries and loaded.meta["model"] == "tiny-opt"
    assert loaded.keep(2, 1) == table.entries[(2, 1)].k
    assert loaded.keep(2, 2) == table.entries[(2, 4)].k  # nearest calibrated batch size at or above
    assert loaded.keep(2, 5) == table.entries[(2, 8)].k
    assert loaded.keep(2, 500) == table.entries[(2, 8)].k  # beyond the range: the largest
    assert loaded.calibrated_batch_size(3) == 4 and loaded.calibrated_batch_size(9) == 8
    with pytest.raises(KeyError, match=r"layer 7 is not in the calibration table \(layers \[0, 1, 2, 3\]\)"):
        loaded.keep(7, 1)
    with pytest.raises(CalibrationError, match="calibrated for model 'tiny-opt', not 'opt-125m'"):
        load_calibration(bundle, model="opt-125m")
    payload = json.loads(calibration_path(bundle).read_text())
    del payload["entries"][3]
    calibration_path(bundle).write_text(json.dumps(payload))
    with pytest.raises(CalibrationError, match="is corrupt: missing"):
        load_calibration(bundle)
    calibration_path(bundle).write_text("{not json")
    with pytest.raises(CalibrationError, match="not readable JSON"):
        load_calibration(bundle)


def test_bundle_without_mlp_routers(tmp_path: Path, opt_mlp_bundle: tuple[Path, Path]) -> None:
    store, _ = opt_mlp_bundle
    (tmp_path / "mha").mkdir()
    with pytest.raises(BundleError, match="has no mlp routers"):
        calibrate(tmp_path, store, SETTINGS)


def test_gated_model_store_has_no_mlp_activity(tmp_path: Path, opt_mlp_bundle: tuple[Path, Path]) -> None:
    _, bundle = opt_mlp_bundle
    llama_store = collect_store(tmp_path, "tiny-llama", samples=64)
    with pytest.raises(CalibrationError, match="holds no MLP activity: its model's MLP is gated"):
        calibrate(bundle, llama_store, SETTINGS)


def test_bad_settings_and_too_few_rows(opt_mlp_bundle: tuple[Path, Path]) -> None:
    store, bundle = opt_mlp_bundle
    with pytest.raises(ValueError, match=r"calibrate.target_recall=1.5 must be in \(0, 1\]"):
        CalibrationSettings(target_recall=1.5)
    with pytest.raises(ValueError, match=r"calibrate.batch_sizes=\[4, 4\] must be distinct positive"):
        CalibrationSettings(batch_sizes=(4, 4))
    with pytest.raises(CalibrationError, match="batch size 100000 needs 100000 held-out rows"):
        calibrate(bundle, store, CalibrationSettings(batch_sizes=(100000,)), layers=[1])


def test_entry_fields_are_what_the_engine_reads(table: CalibrationTable) -> None:
    entry = table.entry(1, 3)
    assert isinstance(entry, CalibrationEntry) and entry.batch_size == 4
    assert entry.mlp_bytes == 2 * entry.k * 256 * 2
    assert table.target_recall == 0.95 and table.ffn_dim == 1024
    assert set(table.meta["routers"]) == {f"mlp/layer_{layer:03d}.safetensors" for layer in range(4)}


# --- evaluate.py: sparsity.mlp_batch_size ----------------------------------------------------------


def _evaluate_plan(tmp_path: Path, bundle: Path, *overrides: str):
    from polar_sparsity.evaluation.runner import build_plan
    from tests.evaluation.conftest import evaluate_settings

    settings, _ = evaluate_settings(tmp_path, f"paths.routers={bundle}", "sparsity.attn_topk=1.0", *overrides)
    config = load_hf_config(settings.model)
    geometry = family_for_config(config).geometry(config)
    return (*build_plan(settings, geometry), geometry)


def test_evaluate_uses_the_calibrated_k_of_the_batch_size(
    tmp_path: Path, opt_mlp_bundle: tuple[Path, Path], table: CalibrationTable
) -> None:
    _, bundle = opt_mlp_bundle
    save_calibration(table, bundle)
    plan, record, geometry = _evaluate_plan(tmp_path, bundle, "sparsity.mlp_batch_size=3")
    assert plan.mlp_keep == {layer: table.entries[(layer, 4)].k for layer in range(4)}
    assert plan.mlp_layers(geometry) == [layer for layer in range(4) if table.entries[(layer, 4)].k < 1024]
    assert record["calibration"]["calibrated_batch_size"] == 4


def test_evaluate_without_a_table_or_on_a_gated_model(
    tmp_path: Path, opt_mlp_bundle: tuple[Path, Path]
) -> None:
    _, bundle = opt_mlp_bundle
    empty = tmp_path / "no-table"
    (empty / "mlp").mkdir(parents=True)
    for layer_file in (bundle / "mlp").glob("layer_*.safetensors"):
        (empty / "mlp" / layer_file.name).write_bytes(layer_file.read_bytes())
    with pytest.raises(ValueError, match=r"sparsity.mlp_batch_size=8 needs the MLP calibration table .* run"):
        _evaluate_plan(tmp_path, empty, "sparsity.mlp_batch_size=8")
    with pytest.raises(
        ValueError, match="sparsity.mlp_batch_size=8 needs a ReLU MLP; this model's MLP is gated"
    ):
        _evaluate_plan(tmp_path, bundle, "model=tiny-llama", "sparsity.mlp_batch_size=8")
    with pytest.raises(ValueError, match="both set the MLP's k"):
        _evaluate_plan(tmp_path, bundle, "sparsity.mlp_batch_size=8", "sparsity.mlp_topk=0.5")


# --- the entry point and the masks --------------------------------------------------------------


def _calibrate_settings(tmp_path: Path, *overrides: str):
    from hydra import compose, initialize_config_dir

    from polar_sparsity.config import resolved_config, to_settings
    from polar_sparsity.schema import CalibrateRunConfig

    from .conftest import ROOT

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "calibrate", overrides=[f"paths.artifacts={tmp_path}", "logger=none", "device=cpu", *overrides]
        )
    return to_settings(cfg, CalibrateRunConfig), resolved_config(cfg)


def test_calibrate_entry_point_writes_table_csv_and_plot(
    tmp_path: Path, opt_mlp_bundle: tuple[Path, Path]
) -> None:
    import shutil

    from polar_sparsity.sparsity.calibrate_task import run_calibrate

    store, bundle = opt_mlp_bundle
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    settings, resolved = _calibrate_settings(
        tmp_path, f"paths.store={store}", f"paths.routers={copy}", "calibrate.batch_sizes=[2,1]",
        "calibrate.granularity=256", "calibrate.batches=8", "calibrate.layers=[1,3]",
    )  # fmt: skip
    payload = run_calibrate(settings, resolved)
    table = load_calibration(copy, model="tiny-opt")
    assert table is not None and table.to_dict() == json.loads(json.dumps(payload))
    assert table.layers == (1, 3) and table.batch_sizes == (1, 2) and table.granularity == 256
    assert {e.k for e in table.entries.values()} <= {256, 512, 768, 1024}
    for name in ("calibration.csv", "calibration.png"):
        assert (copy / "mlp" / name).stat().st_size > 0
    meta = table.meta
    assert meta["store"]["rows"] == ActivationStore(store).num_samples and meta["objective"] == "recall"
    assert meta["routers"]["mlp/layer_001.safetensors"] == _sha256(copy / "mlp" / "layer_001.safetensors")


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("calibrate.target_recall=0", r"calibrate.target_recall=0.0 must be in \(0, 1\]"),
        (
            "calibrate.batch_sizes=[0,4]",
            "calibrate.batch_sizes=\\[0, 4\\] must be distinct positive integers",
        ),
        ("calibrate.granularity=0", "calibrate.granularity=0 must be a positive integer"),
    ],
)
def test_calibrate_config_is_validated(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _calibrate_settings(tmp_path, override)


def test_unknown_objective_names_the_valid_ones(tmp_path: Path) -> None:
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as info:
        _calibrate_settings(tmp_path, "calibrate.objective=latncy")
    assert "expected one of [recall, latency]" in str(info.value.__cause__)


def test_per_layer_k_masks_exactly_k_neurons_per_token() -> None:
    from polar_sparsity.schema import Mode
    from polar_sparsity.sparsity import SparsityPlan, apply_sparsity
    from tests.helpers import tiny_model

    _, model = tiny_model("opt")
    adapter = family_for_config(model.config)
    geometry = adapter.geometry(model.config)
    routers = {}
    for layer in range(geometry.num_layers):
        torch.manual_seed(layer)
        net = torch.nn.Linear(geometry.hidden_size, geometry.ffn_dim)
        scorer = {"scores": lambda self, x, net=net: net(x), "num_outputs": geometry.ffn_dim}
        routers[layer] = type("Scorer", (), scorer)()
    plan = SparsityPlan(Mode.sparse, attn_topk=1.0, mlp_batch_size=4, mlp_keep={0: 10, 1: geometry.ffn_dim})
    plan.mlp_routers = routers
    assert plan.mlp_layers(geometry) == [0]  # a full-width layer stays dense
    seen = []
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), apply_sparsity(model, adapter, geometry, plan) as controller:
        # Registered after the masking hook, so it sees the masked activations.
        handle = adapter.mlp_down_proj(model, 0).register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        model(ids)
    handle.remove()
    assert controller.stats.mlp_kept == 10 * 12 and controller.stats.mlp_total == geometry.ffn_dim * 12
    assert int((seen[0] != 0).sum(-1).max()) <= 10


def test_cost_benchmark_runs_at_a_small_shape(capsys: pytest.CaptureFixture[str]) -> None:
    from polar_sparsity.sparsity.calibration_bench import main

    shape = ["--hidden-size", "32", "--ffn-dim", "256", "--layers", "2", "--seq-len", "32"]
    main([*shape, "--rows", "1536", "--store-rows", "3072"])
    out = capsys.readouterr().out
    assert "MLP top-k calibration cost (2x extrapolation)" in out and "est. s/layer" in out


def test_evaluate_refuses_a_table_fitted_for_other_router_weights(
    tmp_path: Path, opt_mlp_bundle: tuple[Path, Path], table: CalibrationTable
) -> None:
    import copy
    import shutil

    _, bundle = opt_mlp_bundle
    retrained = tmp_path / "bundle"
    shutil.copytree(bundle, retrained)
    stale = copy.deepcopy(table)
    stale.meta["routers"]["mlp/layer_002.safetensors"] = "0" * 64
    save_calibration(stale, retrained)
    assert stale.entries[(2, 1)].k < 1024  # layer 2's router is used at B=1
    with pytest.raises(ValueError, match=r"fitted for other weights of \['mlp/layer_002.safetensors'\]"):
        _evaluate_plan(tmp_path, retrained, "sparsity.mlp_batch_size=1")


def test_decoding_engine_takes_the_calibrated_k_of_its_batch_size(
    tmp_path: Path, opt_mlp_bundle: tuple[Path, Path], table: CalibrationTable
) -> None:
    """The engine's plan keeps table.keep(layer, B) for its own batch size; an explicit mlp_topk wins."""
    import shutil

    from polar_sparsity.decode import build_plan as build_decode_plan
    from polar_sparsity.schema import SparsityConfig

    _, bundle = opt_mlp_bundle
    copy = tmp_path / "bundle"
    shutil.copytree(bundle / "mlp", copy / "mlp")
    save_calibration(table, copy)
    from tests.evaluation.conftest import evaluate_settings

    settings, _ = evaluate_settings(tmp_path)
    config = load_hf_config(settings.model)
    geometry = family_for_config(config).geometry(config)
    sparsity = SparsityConfig(attn_topk=1.0)
    plan = build_decode_plan("sparse", sparsity, geometry, copy, "tiny-opt", "cpu", torch.float32)
    for batch in (1, 3, 4, 300):
        for layer in range(geometry.num_layers):
            assert plan.neurons_kept(layer, batch, geometry) == table.keep(layer, batch)
    fixed = build_decode_plan(
        "sparse",
        SparsityConfig(attn_topk=1.0, mlp_topk=0.25),
        geometry,
        copy,
        "tiny-opt",
        "cpu",
        torch.float32,
    )
    assert fixed.neurons_kept(0, 4, geometry) == 256
