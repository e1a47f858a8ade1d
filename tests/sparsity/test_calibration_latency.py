"""calibrate.objective=latency: k from a measured cost table (largest grid k within the budget), the
recall it buys, and clear errors for a missing or malformed cost table."""

from __future__ import annotations

from pathlib import Path

import pytest

from polar_sparsity.sparsity.calibration import CalibrationError, CalibrationSettings, calibrate
from polar_sparsity.sparsity.cost_table import CostTable, CostTableError, read_cost_table, write_cost_table

BATCH_SIZES = (1, 4, 8)
FFN_DIM, GRANULARITY = 1024, 64  # tiny-opt's MLP width; the grid is 64, 128, ..., 1024
GRID = list(range(GRANULARITY, FFN_DIM + 1, GRANULARITY))


def linear_cost(k: int, batch_size: int) -> float:
    """Sparse MLP latency linear in k, steeper for larger batches."""
    return 10.0 + 0.05 * k * (1 + batch_size / 8)


def synthetic_table(path: Path, dense_us: float) -> Path:
    table = CostTable(
        sparse_us={b: {k: linear_cost(k, b) for k in GRID} for b in BATCH_SIZES},
        dense_us=dict.fromkeys(BATCH_SIZES, dense_us),
        source="synthetic",
    )
    return write_cost_table(table, path)


def latency_settings(budget: float) -> CalibrationSettings:
    return CalibrationSettings(
        batch_sizes=BATCH_SIZES,
        granularity=GRANULARITY,
        batches=48,
        objective="latency",
        latency_budget=budget,
    )


def test_latency_objective_keeps_the_largest_k_within_the_budget(
    tmp_path: Path, opt_mlp_bundle: tuple[Path, Path]
) -> None:
    store, bundle = opt_mlp_bundle
    costs = read_cost_table(synthetic_table(tmp_path / "cost.csv", dense_us=60.0))
    table = calibrate(bundle, store, latency_settings(0.5), layers=[0, 1], model="tiny-opt", cost_table=costs)
    assert table.meta["objective"] == "latency" and table.meta["cost_source"] == str(tmp_path / "cost.csv")
    for (layer, batch_size), entry in table.entries.items():
        expected = max(k for k in GRID if linear_cost(k, batch_size) <= 30.0)
        assert entry.k == expected == table.keep(layer, batch_size)
        assert entry.latency_us == pytest.approx(linear_cost(expected, batch_size))
        assert not entry.over_budget
        assert 0.0 < entry.recall <= 1.0 and 0.0 < entry.check_recall <= 1.0
        assert entry.mlp_bytes == 2 * expected * 256 * 2
    # Larger batches cost more per neuron, so the budget buys fewer neurons.
    assert table.keep(0, 1) > table.keep(0, 4) > table.keep(0, 8)


def test_full_budget_with_slow_dense_gives_full_width_and_tiny_dense_flags_the_smallest(
    tmp_path: Path, opt_mlp_bundle: tuple[Path, Path]
) -> None:
    store, bundle = opt_mlp_bundle
    slow_dense = read_cost_table(synthetic_table(tmp_path / "slow.csv", dense_us=1000.0))
    table = calibrate(
        bundle, store, latency_settings(1.0), layers=[2], model="tiny-opt", cost_table=slow_dense
    )
    assert all(e.k == FFN_DIM and e.at_full_width and e.recall == 1.0 for e in table.entries.values())
    fast_dense = read_cost_table(synthetic_table(tmp_path / "fast.csv", dense_us=1.0))
    table = calibrate(
        bundle, store, latency_settings(1.0), layers=[2], model="tiny-opt", cost_table=fast_dense
    )
    assert all(e.k == GRANULARITY and e.over_budget for e in table.entries.values())


def test_bad_latency_inputs_fail_clearly(tmp_path: Path, opt_mlp_bundle: tuple[Path, Path]) -> None:
    store, bundle = opt_mlp_bundle
    for budget in (0.0, 1.5):
        with pytest.raises(ValueError, match="latency_budget"):
            latency_settings(budget)
    with pytest.raises(ValueError, match="objective"):
        CalibrationSettings(objective="speed")
    with pytest.raises(CalibrationError, match="calibrate.cost_table=PATH"):
        calibrate(bundle, store, latency_settings(0.5), layers=[0], model="tiny-opt")
    with pytest.raises(CostTableError, match="does not exist"):
        read_cost_table(tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("shape,M,latency_us\nx,1,3.0\n")
    with pytest.raises(CostTableError, match=r"bad.csv lacks columns \['batch_size', 'k', 'dense_us'\]"):
        read_cost_table(bad)
    partial = CostTable(sparse_us={1: {64: 1.0}}, dense_us={1: 2.0}, source="partial.csv")
    with pytest.raises(CostTableError, match="partial.csv has no latency for batch_size=1 at k=\\[128"):
        calibrate(bundle, store, latency_settings(0.5), layers=[0], model="tiny-opt", cost_table=partial)


def test_latency_settings_are_validated_at_config_time(tmp_path: Path) -> None:
    from .test_calibration import _calibrate_settings

    with pytest.raises(ValueError, match=r"calibrate.latency_budget=1.5 must be in \(0, 1\]"):
        _calibrate_settings(tmp_path, "calibrate.objective=latency", "calibrate.latency_budget=1.5")
    missing = tmp_path / "nope.csv"
    with pytest.raises(CostTableError, match="nope.csv' does not exist"):
        _calibrate_settings(tmp_path, "calibrate.objective=latency", f"calibrate.cost_table={missing}")
    bad = tmp_path / "gemm.csv"
    bad.write_text("batch_size,k,latency_us\n1,64,3.0\n")
    with pytest.raises(CostTableError, match=r"gemm.csv lacks columns \['dense_us'\]"):
        _calibrate_settings(tmp_path, "calibrate.objective=latency", f"calibrate.cost_table={bad}")
    good = synthetic_table(tmp_path / "cost.csv", dense_us=60.0)
    settings, _ = _calibrate_settings(tmp_path, "calibrate.objective=latency", f"calibrate.cost_table={good}")
    assert settings.calibrate.cost_table == str(good) and settings.calibrate.latency_budget == 0.5


def test_calibrate_entry_point_without_gpu_or_cost_table_says_what_to_provide(
    tmp_path: Path, opt_mlp_bundle: tuple[Path, Path]
) -> None:
    from polar_sparsity.sparsity.calibrate_task import run_calibrate

    from .test_calibration import _calibrate_settings

    store, bundle = opt_mlp_bundle
    settings, resolved = _calibrate_settings(
        tmp_path, f"paths.store={store}", f"paths.routers={bundle}", "calibrate.objective=latency"
    )
    with pytest.raises(CalibrationError, match="calibrate.cost_table=PATH.*or run on a CUDA GPU"):
        run_calibrate(settings, resolved)


@pytest.mark.gpu
def test_cost_table_measured_on_cuda_for_a_small_shape(tmp_path: Path) -> None:
    import torch

    from polar_sparsity.sparsity.cost_table import measure_cost_table

    ks = [128, 256, 512, 1024]
    table = measure_cost_table((1, 16), ks, ffn_dim=1024, hidden_size=256, device=torch.device("cuda"))
    assert sorted(table.sparse_us) == [1, 16] and all(sorted(table.sparse_us[b]) == ks for b in (1, 16))
    assert all(us > 0 for row in table.sparse_us.values() for us in row.values())
    assert all(us > 0 for us in table.dense_us.values())
    again = read_cost_table(write_cost_table(table, tmp_path / "cost.csv"))
    assert sorted(again.sparse_us) == sorted(table.sparse_us)
    for batch, row in table.sparse_us.items():
        assert again.sparse_us[batch] == pytest.approx(row)
    assert again.dense_us == pytest.approx(table.dense_us)


def test_calibrate_entry_point_with_a_cost_table_writes_the_latency_table(
    tmp_path: Path, opt_mlp_bundle: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    from polar_sparsity.sparsity.calibrate_task import run_calibrate
    from polar_sparsity.sparsity.calibration import load_calibration

    from .test_calibration import _calibrate_settings

    store, bundle = opt_mlp_bundle
    copy = shutil.copytree(bundle, tmp_path / "bundle")  # the session bundle stays as other tests need it
    costs = synthetic_table(tmp_path / "cost.csv", dense_us=60.0)
    settings, resolved = _calibrate_settings(
        tmp_path, f"paths.store={store}", f"paths.routers={copy}", "calibrate.objective=latency",
        f"calibrate.cost_table={costs}", "calibrate.batch_sizes=[1,8]", "calibrate.granularity=64",
        "calibrate.batches=48", "calibrate.layers=[0]",
    )  # fmt: skip
    run_calibrate(settings, resolved)
    table = load_calibration(copy, model="tiny-opt")
    assert table is not None and table.meta["objective"] == "latency"
    assert table.meta["settings"]["latency_budget"] == 0.5 and table.meta["cost_source"] == str(costs)
    assert table.keep(0, 1) == 320 and table.keep(0, 8) == 192
    assert "latency_us" in capsys.readouterr().out
