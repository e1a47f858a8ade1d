"""collect refuses what cannot finish before it touches a store: positions, stream size, memory; and a
finished store is only read when collect runs again."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from polar_sparsity.collect import checks, runner
from polar_sparsity.collect.runner import run_collect
from polar_sparsity.data.store import MANIFEST, ActivationStore

from .test_collect import _settings


def test_more_samples_than_the_stream_holds_fails_before_any_store(tmp_path: Path) -> None:
    settings, resolved = _settings(tmp_path, "data.split=test", "collect.samples=10000000")
    with pytest.raises(
        ValueError,
        match=r"collect.samples=10000000 but data=python-docs \(split 'test'\) holds only \d+ tokens",
    ):
        run_collect(settings, resolved)
    assert not Path(settings.paths.store).exists()


def test_sequences_longer_than_the_model_fail_before_any_store(tmp_path: Path) -> None:
    settings, resolved = _settings(tmp_path, "collect.seq_len=513")
    with pytest.raises(ValueError, match=r"collect.seq_len=513 is longer than the model's 512 positions"):
        run_collect(settings, resolved)
    assert not Path(settings.paths.store).exists()
    settings, resolved = _settings(tmp_path, "model=tiny-llama", "collect.seq_len=4096")
    with pytest.raises(ValueError, match=r"collect.seq_len=4096 is longer than the model's 512 positions"):
        run_collect(settings, resolved)


def test_perplexity_sequences_longer_than_the_model_fail_before_loading(tmp_path: Path) -> None:
    from polar_sparsity.evaluation.runner import run_evaluate

    from ..evaluation.conftest import evaluate_settings

    settings, resolved = evaluate_settings(
        tmp_path, "mode=dense", "eval.tasks=[]", "eval.perplexity.seq_len=1024"
    )
    with pytest.raises(
        ValueError, match=r"eval.perplexity.seq_len=1024 is longer than the model's 512 positions"
    ):
        run_evaluate(settings, resolved)
    assert not (tmp_path / "run").exists()


def test_a_batch_that_cannot_fit_in_memory_is_refused_early(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(checks, "available_memory", lambda device: 64 * 2**20)
    settings, resolved = _settings(tmp_path, "collect.batch_size=4000", "collect.samples=200000")
    with pytest.raises(
        ValueError, match=r"collect.batch_size=4000 needs about .* GiB .* use collect.batch_size=\d+ or less"
    ):
        run_collect(settings, resolved)
    assert not Path(settings.paths.store).exists()


def test_a_batch_never_packs_more_sequences_than_the_run_needs(tmp_path: Path, monkeypatch) -> None:
    used = []
    fill = runner._fill
    monkeypatch.setattr(
        runner, "_fill", lambda writer, loaded, s, batch: used.append(batch) or fill(writer, loaded, s, batch)
    )
    settings, resolved = _settings(tmp_path, "collect.batch_size=100000")  # 600 tokens of 64
    run_collect(settings, resolved)
    assert used == [10] and ActivationStore(settings.paths.store).num_samples == 600


def test_memory_estimate_grows_with_the_batch() -> None:
    geometry = {"num_layers": 32, "hidden_size": 4096, "num_heads": 32, "ffn_dim": 11008, "mlp_kind": "gated",
                "vocab_size": 32000}  # fmt: skip
    one = checks.forward_bytes(geometry, 1, 512, 2)
    assert checks.forward_bytes(geometry, 8, 512, 2) == 8 * one and 50 * 2**20 < one < 2**30


def test_rerun_of_a_finished_store_only_reads_it(tmp_path: Path, monkeypatch) -> None:
    settings, resolved = _settings(tmp_path)
    run_collect(settings, resolved)
    store = Path(settings.paths.store)
    stamps = {p: p.stat().st_mtime_ns for p in store.rglob("*")}

    def refuse(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(runner, "write_csv", refuse)
    monkeypatch.setattr(runner, "plot_summary", refuse)
    monkeypatch.setattr(runner, "store_lock", refuse)
    rows = run_collect(settings, resolved)
    assert len(rows) == 4 and {p: p.stat().st_mtime_ns for p in store.rglob("*")} == stamps
    assert (store / MANIFEST).exists() and os.access(store / "summary.csv", os.R_OK)
