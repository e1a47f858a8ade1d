"""generate: complete prompts with the decoding engine, dense or sparse, through ``Trainer.predict``.

Order of work: the prompts and the router bundle are checked before the model loads; then the
prompts are tokenised and their lengths checked against the model; then Lightning runs
``GenerationModule.predict_step`` batch by batch; then the outputs (generations JSONL, results JSON,
summary tables, logger).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import Logger, WandbLogger

from polar_sparsity.decode.lightning import GenerationModule, PredictedBatch, PromptDataModule
from polar_sparsity.decode.prompts import check_lengths, resolve_prompts
from polar_sparsity.evaluation.results import package_versions
from polar_sparsity.models.families import family_for_config
from polar_sparsity.models.loading import LoadedModel, load_hf_config, load_model, resolve_device, torch_dtype
from polar_sparsity.reporting import format_table, write_json_atomic, write_jsonl
from polar_sparsity.schema import GenerateRunConfig, Mode
from polar_sparsity.tracking import log_rows

log = logging.getLogger(__name__)

GENERATIONS_FILE = "generations.jsonl"
RESULTS_FILE = "generate_results.json"
DENSITY_TITLE = "density per layer: share of heads (KV groups) and MLP neurons computed at decode steps"


def run_generate(
    settings: GenerateRunConfig, resolved_config: dict[str, Any], logger: Logger | None = None
) -> dict[str, Any]:
    """Generate for every prompt; returns the results payload (also written as JSON beside the JSONL)."""
    started = time.perf_counter()
    out_dir = output_dir(settings)
    prompts = resolve_prompts(settings.prompts, settings.prompts_file)
    device = resolve_device(settings.device)
    plan = generation_plan(settings, device)
    loaded = load_model(settings.model, settings.device, settings.seed)
    log.info("weights: %s; tokenizer: %s", loaded.weights_source, loaded.tokenizer_source)

    # The KV cache holds one batch: no more rows than there are prompts.
    decode = replace(settings.decode, batch_size=min(settings.decode.batch_size, len(prompts)))
    data = PromptDataModule(prompts, loaded.tokenizer, decode.batch_size)
    data.setup("predict")
    max_seq_len = check_lengths(data.token_ids, decode.max_new_tokens, max_positions(loaded))
    module = GenerationModule(loaded, plan, decode, max_seq_len, settings.seed, step_progress=True)
    batches = predict(module, data, device, out_dir)

    records = [record for batch in batches for record in batch.records]
    generations_path = write_jsonl(out_dir / GENERATIONS_FILE, records)
    summary = run_summary(batches)
    density = layer_density(batches)
    payload = {
        "mode": settings.mode.value,
        "model": settings.model.name,
        "weights_source": loaded.weights_source,
        "tokenizer_source": loaded.tokenizer_source,
        "device": str(device),
        "backend": module.engine.backend,
        "sparsity": asdict(settings.sparsity) if settings.mode == Mode.sparse else None,
        "router_bundle": settings.paths.routers if settings.mode == Mode.sparse else None,
        "summary": summary,
        "density": density,
        "generations": str(generations_path),
        "config": resolved_config,
        "versions": package_versions(),
        "seconds": round(time.perf_counter() - started, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    results_path = write_json_atomic(out_dir / RESULTS_FILE, payload)
    print(format_table([summary], title=_title(settings, payload)))
    print(format_table(density, title=DENSITY_TITLE))
    print(f"generations: {generations_path}\nresults: {results_path}")
    print(f"generate took {payload['seconds']:.1f}s")
    _log(logger, summary, density, records)
    return payload


def output_dir(settings: GenerateRunConfig) -> Path:
    """``output_dir`` when given, else the Hydra run dir."""
    if settings.output_dir is not None:
        return Path(settings.output_dir)
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def generation_plan(settings: GenerateRunConfig, device: torch.device) -> Any:
    """The engine's sparsity plan, routers loaded on ``device``; a bad bundle fails before the model loads."""
    from polar_sparsity.decode import build_plan

    hf_config = load_hf_config(settings.model)
    geometry = family_for_config(hf_config).geometry(hf_config)
    return build_plan(
        settings.mode,
        settings.sparsity,
        geometry,
        settings.paths.routers,
        settings.model.name,
        device,
        torch_dtype(settings.model.dtype),
    )


def max_positions(loaded: LoadedModel) -> int:
    """How many positions the model can attend over (prompt + generated tokens)."""
    return int(loaded.model.config.max_position_embeddings)


def predict(
    module: GenerationModule, data: PromptDataModule, device: torch.device, out_dir: Path
) -> list[PredictedBatch]:
    """``Trainer.predict`` on ``device``: a tqdm bar over batches, the engine's over each batch's steps."""
    cuda = device.type == "cuda"
    trainer = L.Trainer(
        accelerator="gpu" if cuda else device.type,
        devices=[device.index or 0] if cuda else 1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=str(out_dir),
        callbacks=[TQDMProgressBar()],  # tqdm like the engine's step bar, so the two bars stack
    )
    with warnings.catch_warnings():
        # Batches are token id lists already in memory: loader worker processes would only add start-up time.
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        return trainer.predict(module, datamodule=data)


# --- outputs ---------------------------------------------------------------------------------------


def run_summary(batches: list[PredictedBatch]) -> dict[str, Any]:
    """Totals over the batches: tokens, prefill and decode time, throughput, why sequences stopped."""
    generations = [batch.generation for batch in batches]
    new_tokens = sum(len(tokens) for g in generations for tokens in g.new_tokens)
    prefill = sum(g.prefill_seconds for g in generations)
    decode = sum(g.decode_seconds for g in generations)
    steps = sum(g.decode_steps for g in generations)
    reasons = Counter(reason for g in generations for reason in g.finish_reasons)
    return {
        "prompts": sum(len(g.new_tokens) for g in generations),
        "batches": len(generations),
        "new_tokens": new_tokens,
        "prefill_s": prefill,
        "decode_s": decode,
        "decode_steps": steps,
        "ms_per_step": 1000 * decode / steps if steps else None,
        "tokens_per_s": new_tokens / (prefill + decode) if prefill + decode > 0 else None,
        "stopped_eos": reasons.get("eos", 0),
        "stopped_length": reasons.get("length", 0),
    }


def layer_density(batches: list[PredictedBatch]) -> list[dict[str, Any]]:
    """Per layer: the share of heads (KV groups) and MLP neurons computed at decode steps.

    Batches are weighted by their decode work (rows x steps); a layer a batch does not report is dense.
    """
    generations = [batch.generation for batch in batches]
    weights = [len(g.new_tokens) * g.decode_steps for g in generations]
    layers = sorted({layer for g in generations for layer in (*g.attn_density, *g.mlp_density)})
    total = sum(weights)
    rows = []
    for layer in layers:
        row: dict[str, Any] = {"layer": layer}
        for name, field in (("attn_density", "attn_density"), ("mlp_density", "mlp_density")):
            values = [
                (getattr(g, field).get(layer, 1.0), w) for g, w in zip(generations, weights, strict=True)
            ]
            row[name] = sum(v * w for v, w in values) / total if total else None
        rows.append(row)
    return rows


def _title(settings: GenerateRunConfig, payload: dict[str, Any]) -> str:
    sp = settings.sparsity
    detail = (
        f" (attn_topk={sp.attn_topk}, mlp_topk={sp.mlp_topk}, dense attention layers "
        f"{sorted(sp.dense_attn_layers)})"
        if settings.mode == Mode.sparse
        else ""
    )
    return (
        f"{settings.model.name}, mode={settings.mode.value}{detail}, {payload['backend']} ops on "
        f"{payload['device']}, batch size <= {settings.decode.batch_size}"
    )


def _log(
    logger: Logger | None, summary: dict[str, Any], density: list[dict[str, Any]], records: list[dict]
) -> None:
    """The summary metrics, the per-layer density and (W&B) a table of the generations."""
    if logger is None:
        return
    log_rows(logger, "generate/density", density, step_key="layer")
    if isinstance(logger, WandbLogger):
        columns = ["index", "prompt", "completion", "finish_reason"]
        logger.log_table(
            key="generate/generations", columns=columns, data=[[r[c] for c in columns] for r in records]
        )
    logger.log_metrics({f"generate/{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
    logger.save()
