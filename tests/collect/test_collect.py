"""collect end to end on the shipped tiny models and on a random-weight hub architecture."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from polar_sparsity.collect.runner import run_collect
from polar_sparsity.config import resolved_config, to_settings
from polar_sparsity.data.store import MANIFEST, ActivationStore, StoreError, StoreWriter
from polar_sparsity.schema import CollectRunConfig

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["collect.samples=600", "collect.seq_len=64", "collect.batch_size=4", "logger=none"]


def _settings(tmp_path: Path, *overrides: str) -> tuple[CollectRunConfig, dict]:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("collect", overrides=[f"paths.artifacts={tmp_path}", *SMALL, *overrides])
    return to_settings(cfg, CollectRunConfig), resolved_config(cfg)


def test_cli_default_is_tiny_opt_offline(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    command = [
        sys.executable,
        "collect.py",
        f"paths.artifacts={tmp_path}",
        "collect.samples=1500",
        "collect.seq_len=128",
        "logger=csv",
    ]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Per-layer summary (tiny-opt on python-docs: 1500 tokens)" in result.stdout
    store_dir = tmp_path / "stores" / "tiny-opt" / "python-docs"
    manifest = json.loads((store_dir / MANIFEST).read_text())
    assert manifest["rows"] == 1500 and manifest["geometry"]["num_heads"] == 8
    assert (store_dir / "summary.png").stat().st_size > 0
    rows = (store_dir / "summary.csv").read_text().splitlines()
    densities = [float(line.split(",")[1]) for line in rows[1:]]
    assert len(densities) == 4 and max(densities) < 0.5  # a trained ReLU MLP is sparse
    metrics = list((tmp_path / "runs" / "collect").glob("*/csv/version_0/metrics.csv"))
    assert metrics and "collect/mlp_density" in metrics[0].read_text()


def test_tiny_llama_gqa_store(tmp_path: Path) -> None:
    settings, resolved = _settings(tmp_path, "model=tiny-llama")
    rows = run_collect(settings, resolved)
    store = ActivationStore(settings.paths.store)
    assert store.num_samples == 600 and not store.has_mlp
    assert store.geometry.num_kv_heads == 2 and store.head_norms(3).shape == (600, 8)
    assert all(np.isnan(r["mlp_density"]) for r in rows)
    assert all(0.5 < r["head_top50_share"] < 1.0 for r in rows)
    # Rows are never padding: every position lies inside its sequence.
    assert store.positions()[:].max() < 64


def test_random_weight_hub_architecture_uses_shipped_tokenizer(tmp_path: Path) -> None:
    settings, resolved = _settings(
        tmp_path, "model=opt-125m", "model.weights=random", "model.dtype=float32", "collect.samples=200"
    )
    run_collect(settings, resolved)
    manifest = ActivationStore(settings.paths.store).manifest
    assert manifest["geometry"]["num_layers"] == 12 and manifest["geometry"]["ffn_dim"] == 3072
    assert "shipped offline-corpus tokenizer" in manifest["tokenizer"]
    assert manifest["weights_source"] == "random weights (seed 0)"


def test_rerun_is_a_no_op_and_other_model_is_refused(tmp_path: Path) -> None:
    store = tmp_path / "shared-store"
    settings, resolved = _settings(tmp_path, f"paths.store={store}")
    run_collect(settings, resolved)
    manifest = (store / MANIFEST).read_text()
    run_collect(settings, resolved)  # complete and identical: summarised, not rewritten
    assert (store / MANIFEST).read_text() == manifest

    other, other_resolved = _settings(tmp_path, f"paths.store={store}", "model=tiny-llama")
    with pytest.raises(StoreError, match="model: store has 'tiny-opt', this run 'tiny-llama'"):
        run_collect(other, other_resolved)
    assert (store / MANIFEST).read_text() == manifest


def test_interrupted_run_resumes_to_the_same_store(tmp_path: Path, monkeypatch) -> None:
    whole, resolved = _settings(tmp_path, f"paths.store={tmp_path / 'whole'}")
    run_collect(whole, resolved)

    parts = [f"paths.store={tmp_path / 'parts'}", "collect.checkpoint_seconds=0"]
    interrupted, resolved = _settings(tmp_path, *parts)
    original_append = StoreWriter.append
    calls = {"n": 0}

    def append_then_crash(self, *args, **kwargs):
        if calls["n"] == 1:
            raise KeyboardInterrupt
        calls["n"] += 1
        return original_append(self, *args, **kwargs)

    monkeypatch.setattr(StoreWriter, "append", append_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run_collect(interrupted, resolved)
    monkeypatch.setattr(StoreWriter, "append", original_append)
    with pytest.raises(StoreError, match=r"incomplete \(256/600 samples\).*collect.resume=true"):
        run_collect(interrupted, resolved)

    resumed, resolved = _settings(tmp_path, *parts, "collect.resume=true")
    run_collect(resumed, resolved)
    a, b = ActivationStore(tmp_path / "whole"), ActivationStore(tmp_path / "parts")
    for layer in range(4):
        np.testing.assert_array_equal(a.router_inputs(layer)[:], b.router_inputs(layer)[:])
        np.testing.assert_array_equal(a.mlp_active_packed(layer)[:], b.mlp_active_packed(layer)[:])
    np.testing.assert_array_equal(a.sequence_ids()[:], b.sequence_ids()[:])


# --- real processes: kill -9, resume, overwrite ---------------------------------------------------

# Enough batches that a run is still going when the test kills it (checkpointed after every batch).
LONG = ["collect.samples=20000", "collect.seq_len=64", "collect.batch_size=2", "collect.checkpoint_seconds=0"]


def _collect_process(artifacts: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "collect.py", f"paths.artifacts={artifacts}", "logger=none", *overrides]
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(process: subprocess.Popen) -> tuple[int, str]:
    out, err = process.communicate(timeout=600)
    return process.returncode, out + err


def _kill_once_rows_are_recorded(process: subprocess.Popen, store: Path) -> None:
    """SIGKILL the collect as soon as it has checkpointed rows, while it is still running."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        progress = store / "progress.json"
        if progress.exists() and json.loads(progress.read_text() or "{}").get("rows", 0) > 0:
            break
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before it could be killed: " + _finish(process)[1][-2000:]
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (store / MANIFEST).exists(), "the run finished before the kill landed"


def _array_bytes(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*.npy"))}


def test_kill_9_then_resume_gives_the_uninterrupted_store(tmp_path: Path) -> None:
    whole = _collect_process(tmp_path, f"paths.store={tmp_path / 'whole'}", *LONG)
    parts = tmp_path / "parts"
    killed = _collect_process(tmp_path, f"paths.store={parts}", *LONG)
    _kill_once_rows_are_recorded(killed, parts)

    settings, resolved = _settings(tmp_path, f"paths.store={parts}", *LONG)
    with pytest.raises(StoreError, match=r"incomplete \(\d+/20000 samples\).*collect.resume=true"):
        run_collect(settings, resolved)  # an incomplete store is never reused silently
    code, output = _finish(_collect_process(tmp_path, f"paths.store={parts}", *LONG, "collect.resume=true"))
    assert code == 0, output[-3000:]
    code, output = _finish(whole)
    assert code == 0, output[-3000:]
    assert _array_bytes(parts) == _array_bytes(tmp_path / "whole")
    assert ActivationStore(parts).num_samples == 20000


def test_overwrite_checks_first_and_only_ever_replaces_a_finished_store(tmp_path: Path) -> None:
    store = tmp_path / "store"
    settings, resolved = _settings(tmp_path, f"paths.store={store}")
    run_collect(settings, resolved)
    before = {**_array_bytes(store), MANIFEST: (store / MANIFEST).read_bytes()}
    user_dir = tmp_path / "mine"
    user_dir.mkdir()
    (user_dir / "f").write_text("x")

    # A device that is not there, and a folder that is not a store: refused, nothing deleted.
    on_gpu = _collect_process(tmp_path, f"paths.store={store}", "collect.overwrite=true", "device=cuda")
    on_user_dir = _collect_process(tmp_path, f"paths.store={user_dir}", "collect.overwrite=true", *SMALL[:3])
    code, output = _finish(on_gpu)
    assert code != 0 and "CUDA is not available" in output
    code, output = _finish(on_user_dir)
    assert code != 0 and "is not an activation store of this project" in output
    assert (user_dir / "f").read_text() == "x"
    assert {**_array_bytes(store), MANIFEST: (store / MANIFEST).read_bytes()} == before

    # Killed while building the replacement: the old store is still complete and unchanged.
    replacing = _collect_process(tmp_path, f"paths.store={store}", "collect.overwrite=true", *LONG)
    _kill_once_rows_are_recorded(replacing, tmp_path / ".store.overwrite")
    assert ActivationStore(store).num_samples == 600
    assert {**_array_bytes(store), MANIFEST: (store / MANIFEST).read_bytes()} == before

    # Finished: the new store replaces the old one, and nothing is left beside it.
    settings, resolved = _settings(
        tmp_path, f"paths.store={store}", "collect.overwrite=true", "collect.samples=900"
    )
    run_collect(settings, resolved)
    assert ActivationStore(store).num_samples == 900
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".store")) == [".store.lock"]
