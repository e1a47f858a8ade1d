"""model.num_layers=N keeps the first N layers at their real shape; a bad N is refused first."""

from __future__ import annotations

import pytest

from polar_sparsity.models.loading import load_hf_config, load_model
from tests.evaluation.conftest import evaluate_settings


def test_fewer_layers_keep_real_shapes(tmp_path) -> None:
    settings, _ = evaluate_settings(tmp_path, "model=tiny-opt", "model.num_layers=2")
    loaded = load_model(settings.model, device="cpu")
    assert loaded.geometry.num_layers == 2
    assert len(loaded.adapter.layers(loaded.model)) == 2
    assert loaded.geometry.hidden_size == 256 and loaded.geometry.ffn_dim == 1024


def test_random_weights_fewer_layers(tmp_path) -> None:
    settings, _ = evaluate_settings(tmp_path, "model=opt-66b", "model.weights=random", "model.num_layers=3")
    config = load_hf_config(settings.model)
    assert config.num_hidden_layers == 3 and config.hidden_size == 9216


@pytest.mark.parametrize("bad", [0, 5])
def test_bad_layer_count_is_refused(tmp_path, bad: int) -> None:
    with pytest.raises(ValueError, match=f"model.num_layers={bad}"):
        settings, _ = evaluate_settings(tmp_path, "model=tiny-opt", f"model.num_layers={bad}")
        load_hf_config(settings.model)
