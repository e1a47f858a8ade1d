"""Files shipped inside the package (tiny models, tokenizer, corpus, evaluation tasks)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def asset_path(relative: str) -> str:
    """Absolute path of a file or folder under ``polar_sparsity/assets``."""
    path = Path(str(resources.files("polar_sparsity") / "assets" / relative))
    if not path.exists():
        raise FileNotFoundError(f"packaged asset {relative!r} not found at {path}")
    return str(path)


def shipped_tokenizer_path() -> str:
    """The byte-level BPE tokenizer trained on the offline corpus (vocabulary 2048)."""
    return asset_path("tokenizer")
