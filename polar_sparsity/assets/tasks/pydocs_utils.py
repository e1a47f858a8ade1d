"""Loaders for the offline task suite, called by lm-eval through ``custom_dataset: !function``.

Paths resolve from this file (inside the installed package), never from the working directory.
Rebuild the data with ``python -m polar_sparsity.evaluation.build_tasks``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parent / "data"


def load_dataset(data_file: str, **_metadata: Any):
    """The task's JSONL file as a DatasetDict with a single ``test`` split."""
    import datasets

    path = DATA_DIR / data_file
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; run python -m polar_sparsity.evaluation.build_tasks")
    return datasets.DatasetDict({"test": datasets.Dataset.from_json(str(path))})


def process_perplexity(doc: dict[str, Any], results: list[float]) -> dict[str, tuple[float, int]]:
    """Per-document log-likelihood with the word and byte counts lm-eval's perplexities weight by."""
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["text"].strip()))
    num_bytes = len(doc["text"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, num_bytes),
        "bits_per_byte": (loglikelihood, num_bytes),
    }
