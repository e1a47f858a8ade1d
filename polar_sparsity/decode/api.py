"""The Python API for embedding the decoder: load once, then ``generate`` as often as needed.

    from polar_sparsity.decode.api import SparseGenerator

    generator = SparseGenerator.load("tiny-opt", mode="sparse", sparsity={"attn_topk": 0.5})
    generator.generate(["The import statement", "A dictionary maps"], max_new_tokens=32)

``load`` composes the same config as ``generate.py`` (``conf/generate.yaml`` of the source checkout),
so every option has the CLI's name, default and validation: ``model`` and ``data`` pick config files,
keyword arguments set values (nested dicts for groups: ``decode={"batch_size": 16}``), and
``overrides`` takes Hydra override strings (``["paths.routers=/my/bundle"]``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from polar_sparsity.decode.lightning import PromptDataModule, generate_batch
from polar_sparsity.decode.prompts import check_lengths
from polar_sparsity.decode.runner import generation_plan, max_positions
from polar_sparsity.models.loading import LoadedModel, load_model, resolve_device
from polar_sparsity.schema import GenerateRunConfig, check_prompts

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# The KV cache is preallocated for max_seq_len positions: all of a long-context model's (128k for
# Llama-3.1) would not fit, so by default a generator holds at most this many.
DEFAULT_MAX_SEQ_LEN = 4096


def compose_settings(
    model: str = "tiny-opt", mode: str = "dense", overrides: Sequence[str] = (), **values: Any
) -> GenerateRunConfig:
    """``generate.py``'s validated config without the command line (no run dir, no logger)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup
    from omegaconf import OmegaConf

    from polar_sparsity.config import to_settings

    if not CONF_DIR.is_dir():
        raise FileNotFoundError(
            f"no Hydra configs at {CONF_DIR}: the API needs a source checkout of the project"
        )
    # Inside a running Hydra app (a user's own @hydra.main script) Hydra is initialised already: set
    # its state aside for this composition and put it back after.
    outer = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("generate", overrides=[f"model={model}", f"mode={mode}", "logger=none", *overrides])
    finally:
        restore_gh_from_backup(outer)
    if values:
        cfg = OmegaConf.merge(cfg, OmegaConf.create(values))
    return to_settings(cfg, GenerateRunConfig)


class SparseGenerator:
    """A loaded model, its sparsity plan and one decoding engine; ``generate`` completes prompts."""

    def __init__(
        self, settings: GenerateRunConfig, loaded: LoadedModel, engine: Any, max_seq_len: int
    ) -> None:
        self.settings, self.loaded, self.engine, self.max_seq_len = settings, loaded, engine, max_seq_len

    @classmethod
    def load(
        cls,
        model: str = "tiny-opt",
        mode: str = "dense",
        *,
        overrides: Sequence[str] = (),
        max_seq_len: int | None = None,
        **values: Any,
    ) -> SparseGenerator:
        """Compose the config, check the router bundle, load the model and build the engine once.

        ``max_seq_len``: the longest prompt + completion the engine holds (its KV cache size);
        None: the model's maximum, at most ``DEFAULT_MAX_SEQ_LEN``.
        """
        from polar_sparsity.decode import DecodeEngine

        settings = compose_settings(model, mode, overrides, **values)
        device = resolve_device(settings.device)
        plan = generation_plan(settings, device)  # bundle errors before the model loads
        loaded = load_model(settings.model, settings.device, settings.seed)
        limit = max_positions(loaded)
        if max_seq_len is None:
            max_seq_len = min(limit, DEFAULT_MAX_SEQ_LEN)
        if not 0 < max_seq_len <= limit:
            raise ValueError(f"max_seq_len={max_seq_len} must be in 1..{limit} (the model's positions)")
        engine = DecodeEngine.from_hf(
            loaded,
            plan,
            max_batch_size=settings.decode.batch_size,
            max_seq_len=max_seq_len,
            backend=settings.decode.backend.value,
            cuda_graphs=settings.decode.cuda_graphs,
        )
        return cls(settings, loaded, engine, max_seq_len)

    def generate(
        self,
        prompts: str | Sequence[str],
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> list[str]:
        """Completions, one per prompt and in order; unset options keep the loaded config's values."""
        records = self.generate_records(
            prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed
        )
        return [record["completion"] for record in records]

    def generate_records(
        self,
        prompts: str | Sequence[str],
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> list[dict[str, Any]]:
        """Like ``generate``, with what ``generate.py`` writes per prompt: token ids and finish reason.

        Prompts are decoded ``decode.batch_size`` at a time; batch ``i`` samples with ``seed + i``.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        check_prompts(prompts, "prompts")
        given = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
        options = dataclasses.replace(
            self.settings.decode, **{k: v for k, v in given.items() if v is not None}
        )
        seed = self.settings.seed if seed is None else seed
        data = PromptDataModule(prompts, self.loaded.tokenizer, options.batch_size)
        data.setup("predict")
        check_lengths(data.token_ids, options.max_new_tokens, self.max_seq_len)
        records: list[dict[str, Any]] = []
        for number, batch in enumerate(data.predict_dataloader()):
            records += generate_batch(
                self.engine, self.loaded.tokenizer, batch, options, seed + number
            ).records
        return records
