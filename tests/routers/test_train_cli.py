"""train.py from the command line: sweeps, the per-layer summary, and the failure policy."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from .conftest import ROOT

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}


def _train(tmp_path: Path, store: Path, sweep: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "train.py", f"paths.artifacts={tmp_path}", f"paths.store={store}",
               f"hydra.sweep.dir={sweep}", "logger=csv", "router.lr=3e-3", "router.max_epochs=1",
               "trainer.enable_progress_bar=false", *overrides, "-m"]  # fmt: skip
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def _rows(sweep: Path) -> list[dict[str, str]]:
    with (sweep / "summary.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_sweep_prints_and_logs_one_per_layer_table(tmp_path: Path, opt_store: Path) -> None:
    sweep = tmp_path / "sweep"
    result = _train(tmp_path, opt_store, sweep, "router=mha", "layer=range(0,2)")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Router sweep summary (2 jobs)" in result.stdout
    rows = _rows(sweep)
    assert [(r["layer"], r["status"]) for r in rows] == [("0", "ok"), ("1", "ok")]
    assert all(float(r["topk_recall"]) > float(r["topk_recall_random"]) for r in rows)
    assert (sweep / "summary.png").stat().st_size > 0
    bundle = tmp_path / "routers" / "tiny-opt" / "python-docs" / "mha" / "topk=0.5"
    assert sorted(p.name for p in bundle.iterdir()) == ["layer_000.safetensors", "layer_001.safetensors"]
    # Each job logged its own run; the summary went to one more run in the sweep dir.
    assert len(list(sweep.glob("layer=*/csv/version_0/metrics.csv"))) == 2
    summary_metrics = (sweep / "csv" / "version_0" / "metrics.csv").read_text()
    assert "routers/mha/topk_recall_static" in summary_metrics


def test_a_failing_job_does_not_take_the_sweep_down(tmp_path: Path, opt_store: Path) -> None:
    sweep = tmp_path / "sweep"
    result = _train(tmp_path, opt_store, sweep, "router=mha", "layer=9,1")
    assert result.returncode != 0  # Hydra reports the failed job at the end of the multirun
    assert "layer=9 is outside tiny-opt" in result.stderr
    rows = {r["layer"]: r for r in _rows(sweep)}
    assert rows["1"]["status"] == "ok" and rows["9"]["status"] == "failed"
    assert "layer=9 is outside tiny-opt" in rows["9"]["error"]
    assert (
        tmp_path / "routers" / "tiny-opt" / "python-docs" / "mha" / "topk=0.5" / "layer_001.safetensors"
    ).exists()


@pytest.mark.parametrize(("launcher", "plugin"), [("parallel", "JoblibLauncher"), ("slurm", "SlurmLauncher")])
def test_launcher_configs_compose(launcher: str, plugin: str) -> None:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["layer=0", f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(plugin)
    assert cfg.hydra.callbacks.router_summary._target_ == "polar_sparsity.routers.summary.SweepSummary"
