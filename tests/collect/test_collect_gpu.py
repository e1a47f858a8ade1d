"""collect on a CUDA GPU gives the same store as on the CPU (run with `pytest -m gpu`)."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
import torch

from polar_sparsity.collect.runner import run_collect
from polar_sparsity.data.store import ActivationStore
from tests.collect.test_collect import _settings

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("model", ["tiny-opt", "tiny-llama"])
def test_gpu_store_matches_cpu_store(tmp_path: Path, model: str) -> None:
    stores = {}
    for device in ("cpu", "cuda"):
        settings, resolved = _settings(
            tmp_path,
            f"model={model}",
            f"device={device}",
            f"paths.store={tmp_path / device}",
            "collect.store_dtype=float32",
        )
        run_collect(settings, resolved)
        stores[device] = ActivationStore(tmp_path / device)
    cpu, gpu = stores["cpu"], stores["cuda"]
    assert gpu.manifest["device"].startswith("cuda")
    for layer in range(cpu.geometry.num_layers):
        np.testing.assert_allclose(
            gpu.router_inputs(layer)[:], cpu.router_inputs(layer)[:], rtol=1e-3, atol=1e-3
        )
        np.testing.assert_allclose(gpu.head_norms(layer)[:], cpu.head_norms(layer)[:], rtol=1e-3, atol=1e-3)
        if cpu.has_mlp:
            flips = np.unpackbits(gpu.mlp_active_packed(layer)[:] ^ cpu.mlp_active_packed(layer)[:]).mean()
            assert flips < 1e-3  # only activations within rounding of zero may differ


@pytest.mark.parametrize("model", ["opt-125m", "llama-2-7b", "llama-3.1-8b", "mistral-7b", "qwen2.5-7b"])
def test_random_weight_real_shapes_on_gpu(tmp_path: Path, model: str) -> None:
    settings, resolved = _settings(
        tmp_path,
        f"model={model}",
        "model.weights=random",
        "device=cuda",
        "collect.samples=1024",
        "collect.seq_len=256",
    )
    run_collect(settings, resolved)
    store = ActivationStore(settings.paths.store)
    geometry = store.geometry
    assert store.num_samples == 1024
    assert store.router_inputs(geometry.num_layers - 1).shape == (1024, geometry.hidden_size)
    assert np.isfinite(store.head_norms(0)[:]).all()
    gc.collect()  # the next parametrization loads another multi-GB model
    torch.cuda.empty_cache()
