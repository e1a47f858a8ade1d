"""Lightning inference: ``Trainer.predict`` completes batches of prompts through the decoding engine.

``PromptDataModule`` tokenises prompts and batches them; ``GenerationModule.predict_step`` decodes one
batch with the engine and returns a ``PredictedBatch``. The engine picks its ops from where the
Trainer runs: ``decode.backend=auto`` swaps the Triton kernels in on a CUDA device and keeps the torch
references on the CPU. The model and the sparsity plan are loaded by the caller on the device the
Trainer uses (``generate.py`` does this from the config)::

    loaded = load_model(model_cfg, "cuda")
    plan = build_plan(Mode.sparse, sparsity, loaded.geometry, bundle_dir, "tiny-opt", device, dtype)
    data = PromptDataModule(["The import statement"], loaded.tokenizer, batch_size=8)
    module = GenerationModule(loaded, plan, DecodeConfig(max_new_tokens=32), max_seq_len=512)
    batches = L.Trainer(accelerator="gpu", devices=1, logger=False).predict(module, datamodule=data)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from polar_sparsity.decode.prompts import completion_text, encode_prompts
from polar_sparsity.models.loading import LoadedModel
from polar_sparsity.schema import DecodeConfig


@dataclass
class PredictedBatch:
    """One batch's completions (one record per prompt, in prompt order) and the engine's measurements."""

    records: list[dict[str, Any]]
    generation: Any  # polar_sparsity.decode.Generation: timings, decode steps, measured density


class PromptDataModule(L.LightningDataModule):
    """Prompts -> batches of ``{"index", "prompt", "input_ids"}`` (lists, unpadded: the engine pads)."""

    def __init__(self, prompts: list[str], tokenizer: Any, batch_size: int) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be a positive integer")
        self.prompts, self.tokenizer, self.batch_size = list(prompts), tokenizer, batch_size
        self.token_ids: list[list[int]] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.token_ids is None:
            self.token_ids = encode_prompts(self.tokenizer, self.prompts)

    def predict_dataloader(self) -> DataLoader:
        self.setup("predict")
        items = [
            {"index": i, "prompt": prompt, "input_ids": ids}
            for i, (prompt, ids) in enumerate(zip(self.prompts, self.token_ids, strict=True))
        ]
        return DataLoader(items, batch_size=self.batch_size, shuffle=False, collate_fn=collate_prompts)


def collate_prompts(items: list[dict[str, Any]]) -> dict[str, list]:
    """Keep each field as a list: prompts have different lengths and the engine does its own padding."""
    return {key: [item[key] for item in items] for key in ("index", "prompt", "input_ids")}


class GenerationModule(L.LightningModule):
    """``predict_step``: a batch of prompts -> their completions, through one ``DecodeEngine``.

    The engine (static KV cache for ``max_seq_len`` positions, CUDA graphs when enabled) is built once,
    at the start of prediction, on the device of the loaded model, which must be the Trainer's device.
    Batch ``i`` samples with ``seed + i`` (greedy decoding ignores the seed); ``step_progress`` shows
    a bar over each batch's decode steps beside Lightning's bar over batches.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        plan: Any,
        decode: DecodeConfig,
        max_seq_len: int,
        seed: int = 0,
        step_progress: bool = False,
    ) -> None:
        super().__init__()
        self.loaded, self.plan, self.decode, self.max_seq_len = loaded, plan, decode, max_seq_len
        self.seed, self.step_progress = seed, step_progress
        self.engine: Any = None

    def on_predict_start(self) -> None:
        if self.engine is None:
            self.engine = self.build_engine(self.trainer.strategy.root_device)

    def build_engine(self, device: torch.device) -> Any:
        """The decoding engine on ``device`` (where the model and plan were loaded)."""
        from polar_sparsity.decode import DecodeEngine

        model_device = self.loaded.input_device
        if (model_device.type, model_device.index or 0) != (device.type, device.index or 0):
            raise ValueError(
                f"the model is loaded on {model_device} but the Trainer runs on {device}: load the model "
                f"and build the plan with device={device}, or give the Trainer the model's device"
            )
        return DecodeEngine.from_hf(
            self.loaded,
            self.plan,
            max_batch_size=self.decode.batch_size,
            max_seq_len=self.max_seq_len,
            backend=self.decode.backend.value,
            cuda_graphs=self.decode.cuda_graphs,
        )

    def predict_step(self, batch: dict[str, list], batch_idx: int) -> PredictedBatch:
        return generate_batch(
            self.engine, self.loaded.tokenizer, batch, self.decode, self.seed + batch_idx, self.step_progress
        )


def generate_batch(
    engine: Any,
    tokenizer: Any,
    batch: dict[str, list],
    decode: DecodeConfig,
    seed: int,
    progress: bool = False,
) -> PredictedBatch:
    """One batch of prompts through the engine (the module's ``predict_step`` and the Python API)."""
    generation = engine.generate(
        batch["input_ids"],
        max_new_tokens=decode.max_new_tokens,
        temperature=decode.temperature,
        top_p=decode.top_p,
        seed=seed,
        eos_token_id=tokenizer.eos_token_id,
        progress=progress,
    )
    return PredictedBatch(batch_records(tokenizer, batch, generation), generation)


def batch_records(tokenizer: Any, batch: dict[str, list], generation: Any) -> list[dict[str, Any]]:
    """One JSON-ready record per prompt: the text, its completion, the token ids, why it stopped."""
    return [
        {
            "index": index,
            "prompt": prompt,
            "completion": completion_text(tokenizer, new_tokens),
            "prompt_token_ids": list(prompt_ids),
            "token_ids": list(new_tokens),
            "finish_reason": reason,
        }
        for index, prompt, prompt_ids, new_tokens, reason in zip(
            batch["index"],
            batch["prompt"],
            batch["input_ids"],
            generation.new_tokens,
            generation.finish_reasons,
            strict=True,
        )
    ]
