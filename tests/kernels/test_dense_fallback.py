"""Never slower than dense: the crossover from timings, the cost-model rule, measured crossovers."""

import pytest
import torch

from polar_sparsity.kernels import _tuning, dense_fallback

CPU = torch.device("cpu")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    monkeypatch.setattr(_tuning, "_SETTINGS", {"cache_dir": str(tmp_path), "mode": "tune"})
    monkeypatch.setattr(dense_fallback, "_SEEN", {})
    return tmp_path


def test_crossover_interpolates_between_last_win_and_first_loss():
    # sparse 30/60/90/120 us vs dense 100 us: sparse wins up to 0.6, loses at 0.8 -> meets at 0.6667.
    x = dense_fallback.crossover_from_timings([0.2, 0.4, 0.6, 0.8], [30, 60, 90, 120], 100.0)
    assert x == pytest.approx(0.6 + 0.2 * 10 / 30)


def test_crossover_stops_at_the_first_loss_and_handles_the_ends():
    # A noisy late win after a loss is not trusted: the scan ends at the first loss.
    assert dense_fallback.crossover_from_timings([0.2, 0.4, 0.6], [50, 110, 90], 100.0) == pytest.approx(
        0.2 + 0.2 * 50 / 60
    )
    assert dense_fallback.crossover_from_timings([0.1, 0.5], [120, 200], 100.0) == 0.0
    assert dense_fallback.crossover_from_timings([0.5, 1.0], [40, 90], 100.0) == 1.0


def test_cost_model_rule_is_conservative_and_depends_on_batch(fresh):
    # Small batch: sparse up to 1 / (1.7 * 1.2) = 0.49 of the neurons.
    assert dense_fallback.use_sparse_mlp(16, 450, 1000, 4096, False, CPU)
    assert not dense_fallback.use_sparse_mlp(16, 500, 1000, 4096, False, CPU)
    # Batch 256: the selective GEMMs lose to compute-bound cuBLAS much earlier.
    assert not dense_fallback.use_sparse_mlp(256, 300, 1000, 4096, False, CPU)
    assert dense_fallback.use_sparse_mlp(256, 150, 1000, 4096, False, CPU)
    x, source = dense_fallback.mlp_crossover(64, 1000, 4096, True, CPU)
    assert source == "model" and x == pytest.approx(1 / (2.0 * 1.2))
    assert dense_fallback.use_sparse_attention(64, 2, 8, 8, 128, 8192, CPU)
    assert not dense_fallback.use_sparse_attention(64, 40, 72, 1, 128, 2048, CPU)


def test_measured_crossover_from_the_cache_wins_over_the_model(fresh):
    cache = _tuning.user_cache(CPU)
    cache.put({dense_fallback.mlp_key(64, 36864, 9216, False): 0.85}, section="crossovers")
    cache.put({dense_fallback.attention_key(64, 72, 1, 128, 1920): 0.3}, section="crossovers")
    assert dense_fallback.mlp_crossover(64, 36864, 9216, False, CPU) == (0.85, "measured")
    assert dense_fallback.use_sparse_mlp(50, 29000, 36864, 9216, False, CPU)  # same bucket of M
    assert not dense_fallback.use_sparse_attention(64, 25, 72, 1, 128, 1920, CPU)
    assert dense_fallback.use_sparse_attention(64, 21, 72, 1, 128, 1920, CPU)
    _tuning.set_mode("heuristic")  # heuristic only: nothing measured is used
    assert dense_fallback.mlp_crossover(64, 36864, 9216, False, CPU)[1] == "model"


def test_counts_are_validated():
    with pytest.raises(ValueError, match="n_sel=0.*1..1000"):
        dense_fallback.use_sparse_mlp(16, 0, 1000, 4096, False, CPU)
    with pytest.raises(ValueError, match="n_sel=9.*1..8"):
        dense_fallback.use_sparse_attention(4, 9, 8, 8, 128, 1024, CPU)


@pytest.mark.gpu
def test_measured_crossovers_on_gpu(tmp_path, monkeypatch):
    """On a GPU: measuring stores a crossover the decision then uses."""
    monkeypatch.setattr(_tuning, "_SETTINGS", {"cache_dir": str(tmp_path), "mode": "cached"})
    monkeypatch.setattr(dense_fallback, "_SEEN", {})
    dev = torch.device("cuda")
    res = dense_fallback.measure_mlp_crossover(16, 8192, 2048, False, dev, densities=(0.2, 0.6, 1.0))
    assert 0.0 <= res["crossover"] <= 1.0
    assert dense_fallback.mlp_crossover(16, 8192, 2048, False, dev) == (res["crossover"], "measured")
    res = dense_fallback.measure_attention_crossover(8, 8, 4, 128, 1024, dev, densities=(0.25, 1.0))
    assert dense_fallback.attention_crossover(8, 8, 4, 128, 1024, dev) == (res["crossover"], "measured")
