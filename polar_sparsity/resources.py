"""Files shipped inside the package (tiny models, tokenizer, corpus, evaluation tasks).

Standard library only: the corpus and the GPU-side code import it on machines without Hydra.
"""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"


def asset_path(relative: str) -> str:
    """Absolute path of an existing file or folder under ``polar_sparsity/assets``."""
    path = ASSETS_DIR / relative
    if not path.exists():
        raise FileNotFoundError(f"packaged asset {relative!r} not found at {path}")
    return str(path)
