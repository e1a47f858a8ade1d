"""On a GPU, Trainer.predict swaps the Triton kernels in: the engine runs them, with CUDA graphs."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from polar_sparsity.decode.lightning import GenerationModule, PromptDataModule
from polar_sparsity.decode.runner import generation_plan
from polar_sparsity.models.loading import load_model
from tests.decode.conftest import generate_settings
from tests.evaluation.conftest import write_head_bundle

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run `pytest -m gpu` on a GPU)"),
]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_trainer_predict_on_a_gpu_runs_the_triton_kernels(tmp_path: Path, dtype: str) -> None:
    write_head_bundle(tmp_path / "routers" / "tiny-opt" / "python-docs", "tiny-opt", [1, 2, 3], 256, 8)
    settings, _ = generate_settings(
        tmp_path, "mode=sparse", "device=cuda", f"model.dtype={dtype}", "decode.max_new_tokens=16"
    )
    device = torch.device("cuda")
    loaded = load_model(settings.model, "cuda")
    data = PromptDataModule(["The import statement", "A dictionary maps", "Open file"], loaded.tokenizer, 2)
    module = GenerationModule(loaded, generation_plan(settings, device), settings.decode, max_seq_len=64)
    trainer = L.Trainer(accelerator="gpu", devices=1, logger=False, enable_progress_bar=False)
    batches = trainer.predict(module, datamodule=data)
    assert module.engine.backend == "triton" and module.engine.cuda_graphs
    records = [record for batch in batches for record in batch.records]
    assert [r["index"] for r in records] == [0, 1, 2]
    assert all(0 < len(r["token_ids"]) <= 16 for r in records)
    assert all(batch.generation.attn_density[2] == 0.5 for batch in batches)
