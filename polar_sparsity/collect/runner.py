"""collect: run a model over a token stream and write the activation store."""

from __future__ import annotations

import faulthandler
import logging
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import polar_sparsity
from polar_sparsity.collect.capture import Captured, capture_activations
from polar_sparsity.collect.checks import check_batch_memory, check_seq_len, sequences_needed
from polar_sparsity.collect.summary import plot_summary, store_summary
from polar_sparsity.data.store import (
    IDENTITY,
    MANIFEST,
    ActivationStore,
    StoreSpec,
    StoreWriter,
    finish_interrupted_swap,
    read_json,
    staging_dir,
)
from polar_sparsity.data.store_lock import store_lock
from polar_sparsity.data.tokens import batched, load_texts, packed_sequences
from polar_sparsity.models.families import MlpKind, family_for_config
from polar_sparsity.models.loading import (
    LoadedModel,
    load_hf_config,
    load_model,
    load_tokenizer,
    resolve_device,
    torch_dtype,
)
from polar_sparsity.reporting import format_table, write_csv
from polar_sparsity.schema import CollectRunConfig

log = logging.getLogger(__name__)


def store_spec(settings: CollectRunConfig) -> StoreSpec:
    """What the store will hold, from the model's config alone (no weights loaded yet)."""
    hf_config = load_hf_config(settings.model)
    check_seq_len(settings.collect.seq_len, hf_config, "collect.seq_len")
    geometry = family_for_config(hf_config).geometry(hf_config)
    return StoreSpec(
        model=settings.model.name,
        weights=settings.model.weights.value,
        data=settings.data.name,
        split=settings.data.split,
        seq_len=settings.collect.seq_len,
        samples=settings.collect.samples,
        dtype=settings.collect.store_dtype.value,
        geometry=geometry.as_dict(),
    )


def _is_complete_copy(root: Path, spec: StoreSpec) -> bool:
    """A finished store of exactly this spec: nothing to do (re-running a pipeline is cheap)."""
    if not (root / MANIFEST).exists():
        return False
    return not spec.mismatches(read_json(root / IDENTITY))


def run_collect(
    settings: CollectRunConfig, resolved_config: dict[str, Any], logger: Any = None
) -> list[dict[str, Any]]:
    """Collect (or finish) the store at ``paths.store``; returns the per-layer summary rows.

    Everything that can fail early (device, model config, sequence length, stream size, memory,
    disk, what is at the path) is checked before the store is touched; the store's lock is held
    from then until the summary is written.
    """
    faulthandler.enable()  # a fatal signal (e.g. a bus error) still prints where it happened
    root = Path(settings.paths.store).resolve()  # a symlinked store is replaced where it really is
    device = resolve_device(settings.device)
    spec = store_spec(settings)
    if not root.exists() and staging_dir(root).exists():
        with store_lock(root):
            if finish_interrupted_swap(root):
                log.warning("store %s: finished an overwrite that was interrupted while swapping in", root)
    if not settings.collect.overwrite and _is_complete_copy(root, spec):
        # Read only: a finished store (possibly on a read-only disk) is summarised, never rewritten.
        log.info("store %s is already complete for this model and data; summarising it", root)
        return _summarise(ActivationStore(root), settings, logger, write=False)
    with store_lock(root):
        batch_size = _checked_batch_size(settings, spec, device)
        writer = StoreWriter(
            root,
            spec,
            resume=settings.collect.resume,
            overwrite=settings.collect.overwrite,
            checkpoint_seconds=settings.collect.checkpoint_seconds,
        )
        log.info("store %s: %.2f GiB for %d samples", root, spec.total_bytes() / 2**30, spec.samples)
        try:
            loaded = load_model(settings.model, settings.device, settings.seed)
            log.info("weights: %s; tokenizer: %s", loaded.weights_source, loaded.tokenizer_source)
            started = time.perf_counter()
            _fill(writer, loaded, settings, batch_size)
            writer.finish(_provenance(settings, loaded, resolved_config, time.perf_counter() - started))
        except BaseException:
            writer.abandon()  # overwrite: the old store stays as it was
            raise
        return _summarise(ActivationStore(root), settings, logger, write=True)


def _checked_batch_size(settings: CollectRunConfig, spec: StoreSpec, device: torch.device) -> int:
    """Sequences per forward pass: never more than the whole run needs, and known to fit in memory."""
    cfg = settings.collect
    tokenizer, _ = load_tokenizer(settings.model)
    needed = sequences_needed(settings.data, tokenizer, cfg.seq_len, spec.geometry["vocab_size"], cfg.samples)
    batch = min(cfg.batch_size, needed)
    if settings.model.device_map is None:  # sharded models spread the pass over devices: no estimate
        model_bytes = torch_dtype(settings.model.dtype).itemsize
        check_batch_memory(spec.geometry, batch, cfg.batch_size, cfg.seq_len, model_bytes, device)
    return batch


def _fill(writer: StoreWriter, loaded: LoadedModel, settings: CollectRunConfig, batch_size: int) -> None:
    """Stream batches through the model until the store holds ``collect.samples`` tokens."""
    cfg = settings.collect
    texts = load_texts(settings.data)
    sequences = packed_sequences(texts, loaded.tokenizer, cfg.seq_len, loaded.geometry.vocab_size)
    for _ in range(writer.sequences):  # resume: skip what an earlier run already stored
        next(sequences)
    store_mlp = loaded.geometry.mlp_kind == MlpKind.relu
    sequence_index = writer.sequences
    progress = tqdm(
        total=writer.spec.samples, initial=writer.rows, unit="tok", desc=f"collect {settings.model.name}"
    )
    with (
        capture_activations(loaded.model, loaded.adapter, loaded.geometry) as captured,
        torch.inference_mode(),
    ):
        for batch in batched(sequences, batch_size, loaded.tokenizer.pad_token_id):
            if writer.remaining == 0:
                break
            # The hooks capture everything; the vocabulary logits are unused (one position's are cheap).
            inputs = {k: v.to(loaded.input_device) for k, v in batch.items()}
            loaded.model(**inputs, use_cache=False, logits_to_keep=1)
            keep = batch["attention_mask"].reshape(-1).bool()
            ids, positions = _row_provenance(batch["attention_mask"], sequence_index)
            sequence_index += len(batch["input_ids"])
            written = writer.append(
                ids, positions, *_kept_rows(captured, keep, store_mlp), sequences_done=sequence_index
            )
            captured.clear()
            progress.update(written)
    progress.close()


def _row_provenance(attention_mask: torch.Tensor, first_sequence: int) -> tuple[np.ndarray, np.ndarray]:
    """Sequence id and position of every non-padding token, in the captured row order."""
    mask = attention_mask.bool()
    batch, length = mask.shape
    sequence_ids = (first_sequence + torch.arange(batch)).unsqueeze(1).expand(batch, length)
    positions = torch.arange(length).unsqueeze(0).expand(batch, length)
    return sequence_ids[mask].numpy().astype(np.int32), positions[mask].numpy().astype(np.int32)


def _kept_rows(captured: Captured, keep: torch.Tensor, store_mlp: bool):
    """The non-padding rows of every captured tensor (layers may sit on different devices)."""

    def rows(tensor: torch.Tensor) -> torch.Tensor:
        return tensor[keep.to(tensor.device)]

    router_inputs = [rows(layer.router_input) for layer in captured.layers]
    head_norms = [rows(layer.head_norms) for layer in captured.layers]
    mlp = [rows(layer.mlp_active) for layer in captured.layers] if store_mlp else None
    return router_inputs, head_norms, mlp


def _provenance(
    settings: CollectRunConfig, loaded: LoadedModel, resolved_config: dict[str, Any], seconds: float
):
    return {
        "weights_source": loaded.weights_source,
        "tokenizer": loaded.tokenizer_source,
        "device": str(loaded.input_device),
        "model_dtype": settings.model.dtype.value,
        "collect": asdict(settings.collect) | {"store_dtype": settings.collect.store_dtype.value},
        "config": resolved_config,
        "package_version": polar_sparsity.__version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "seconds": round(seconds, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _summarise(
    store: ActivationStore, settings: CollectRunConfig, logger: Any, write: bool
) -> list[dict[str, Any]]:
    """Print (and log) the per-layer table; ``write``: also (re)write summary.csv/png in the store."""
    from polar_sparsity.tracking import log_image, log_rows

    rows = store_summary(store)
    title = f"{settings.model.name} on {settings.data.name}: {store.num_samples} tokens"
    csv_path, png_path = store.root / "summary.csv", store.root / "summary.png"
    if write:
        write_csv(csv_path, rows)
        plot_summary(rows, title, png_path)
    print(format_table(rows, title=f"Per-layer summary ({title})"))
    print(f"store: {store.root}\nsummary: {csv_path}\nplot: {png_path}")
    log_rows(logger, "collect", rows, step_key="layer")
    if png_path.exists():
        log_image(logger, "collect/summary", png_path)
    return rows
