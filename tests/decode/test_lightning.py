"""Trainer.predict with the prompt DataModule, and the Python API: the same completions, in order."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from polar_sparsity.decode.api import SparseGenerator
from polar_sparsity.decode.lightning import GenerationModule, PromptDataModule
from polar_sparsity.decode.prompts import check_lengths
from polar_sparsity.decode.runner import generation_plan
from polar_sparsity.models.loading import load_model
from tests.decode.conftest import generate_settings
from tests.evaluation.conftest import write_head_bundle

PROMPTS = ["The import statement", "Return a new list containing", "A dictionary maps"]


def test_datamodule_batches_prompts_in_order() -> None:
    from polar_sparsity.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    data = PromptDataModule(PROMPTS, tokenizer, batch_size=2)
    batches = list(data.predict_dataloader())
    assert [b["index"] for b in batches] == [[0, 1], [2]]
    assert [b["prompt"] for b in batches] == [PROMPTS[:2], PROMPTS[2:]]
    assert batches[0]["input_ids"][0][0] == tokenizer.bos_token_id


def test_trainer_predict_matches_the_api_and_hf_greedy(tmp_path: Path) -> None:
    bundle = tmp_path / "routers" / "tiny-opt" / "python-docs"
    write_head_bundle(bundle, "tiny-opt", layers=[1, 2, 3], in_features=256, units=8, topk=0.5)
    overrides = ("mode=sparse", "decode.batch_size=2", "decode.max_new_tokens=10")
    settings, _ = generate_settings(tmp_path, *overrides)
    loaded = load_model(settings.model, "cpu")
    plan = generation_plan(settings, torch.device("cpu"))
    data = PromptDataModule(PROMPTS, loaded.tokenizer, settings.decode.batch_size)
    data.setup("predict")
    max_seq_len = check_lengths(data.token_ids, settings.decode.max_new_tokens, 512)
    module = GenerationModule(loaded, plan, settings.decode, max_seq_len)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    batches = trainer.predict(module, datamodule=data)
    records = [r for batch in batches for r in batch.records]
    assert [r["index"] for r in records] == [0, 1, 2] and [r["prompt"] for r in records] == PROMPTS
    assert all(batch.generation.attn_density[1] == 0.5 for batch in batches)

    # The API composes the same config and batches the same way: the same greedy tokens.
    generator = SparseGenerator.load(
        "tiny-opt", "sparse", overrides=[f"paths.artifacts={tmp_path}"], device="cpu",
        decode={"batch_size": 2, "max_new_tokens": 10},
    )  # fmt: skip
    assert generator.generate_records(PROMPTS) == records
    assert generator.generate(PROMPTS) == [r["completion"] for r in records]


def test_api_dense_greedy_equals_hugging_face_generate(tmp_path: Path) -> None:
    generator = SparseGenerator.load("tiny-opt", overrides=[f"paths.artifacts={tmp_path}"], device="cpu")
    (record,) = generator.generate_records("The with statement", max_new_tokens=12)
    model, tokenizer = generator.loaded.model, generator.loaded.tokenizer
    prompt = torch.tensor([record["prompt_token_ids"]])
    with torch.no_grad():
        reference = model.generate(
            prompt,
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    assert record["token_ids"] == reference[0, prompt.shape[1] :].tolist()
    sampled = generator.generate(["The with statement"] * 2, temperature=1.0, top_p=0.9, seed=3)
    assert sampled == generator.generate(["The with statement"] * 2, temperature=1.0, top_p=0.9, seed=3)
